"""The training engine and the evaluation protocols."""

from transferctl.engine.evaluate import Classification, classify, embed, knn_accuracy
from transferctl.engine.train import (
    ClassificationObjective,
    ContrastiveObjective,
    FitResult,
    Reporter,
    SilentReporter,
    fit,
    pick_device,
)

__all__ = [
    "Classification",
    "ClassificationObjective",
    "ContrastiveObjective",
    "FitResult",
    "Reporter",
    "SilentReporter",
    "classify",
    "embed",
    "fit",
    "knn_accuracy",
    "pick_device",
]
