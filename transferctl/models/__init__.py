"""Encoders, heads, and the Network that joins them."""

from transferctl.models.encoders import cnn, mlp, resnet18  # noqa: F401  (registers)
from transferctl.models.heads import Network, classifier_head, projection_head  # noqa: F401
from transferctl.models.hf import hf  # noqa: F401  (registers)
from transferctl.models.sequence import conv1d, gru, lstm  # noqa: F401  (registers)
from transferctl.models.timm_models import timm_model  # noqa: F401  (registers)
from transferctl.models.transformer import transformer  # noqa: F401  (registers)
