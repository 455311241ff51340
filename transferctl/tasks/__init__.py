"""Tasks: what a head is trained for (classification, multi-label classification, regression, segmentation,
detection, token classification, speech recognition), each a registered class in a module of its own."""

from transferctl.tasks import (  # noqa: F401  (registers)
    classification,
    detection,
    multilabel,
    regression,
    segmentation,
    speech_recognition,
    token_classification,
)
from transferctl.tasks.base import Task

__all__ = ["Task"]
