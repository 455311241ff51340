"""Tasks: what a head is trained for (classification, regression, segmentation, detection, token classification), each a registered
class in a module of its own."""

from transferctl.tasks import classification, detection, regression, segmentation, token_classification  # noqa: F401  (registers)
from transferctl.tasks.base import Task

__all__ = ["Task"]
