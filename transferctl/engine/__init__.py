"""The training engine (a loop that knows no method, task or modality) and the evaluation pieces that methods and tasks share."""

from transferctl.engine.evaluate import Evaluation, embed, knn_accuracy
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
    "Evaluation",
    "FitResult",
    "Objective",
    "Reporter",
    "Selection",
    "Settings",
    "SilentReporter",
    "Steps",
    "embed",
    "fit",
    "knn_accuracy",
    "pick_device",
    "plan_steps",
]
