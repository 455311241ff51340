"""The training engine (a loop that knows no method, task or modality) and the evaluation protocols."""

from transferctl.engine.evaluate import Classification, Evaluation, classify, embed, knn_accuracy
from transferctl.engine.train import (
    FitResult,
    Objective,
    Reporter,
    Selection,
    Settings,
    SilentReporter,
    Steps,
    fit,
    pick_device,
    plan_steps,
)

__all__ = [
    "Classification",
    "Evaluation",
    "FitResult",
    "Objective",
    "Reporter",
    "Selection",
    "Settings",
    "SilentReporter",
    "Steps",
    "classify",
    "embed",
    "fit",
    "knn_accuracy",
    "pick_device",
    "plan_steps",
]
