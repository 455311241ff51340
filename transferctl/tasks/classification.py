"""Classification: one class per sample; class logits, cross-entropy, accuracy and a confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from transferctl import plots
from transferctl.data.samples import Samples
from transferctl.engine.evaluate import Evaluation, classify
from transferctl.engine.train import Selection
from transferctl.registry import TASKS
from transferctl.tasks.base import Task

if TYPE_CHECKING:
    from transferctl.runs import Run


@TASKS.register("classification")
@dataclass
class Classification(Task):
    """One class per sample: logits from a linear head, cross-entropy; accuracy, per-class accuracy, confusion matrix."""

    head = "linear"
    loss = "cross_entropy"
    serves = "classification"
    target_kind = "class"
    selection = Selection("val_accuracy", higher_is_better=True)
    output = "logits"
    exported_as = "classifier"
    pseudo_labels = True
    recipe = "finetune"  # transferctl/recipes/finetune.yaml: 10 labels per class, a standardized linear head, ...

    def num_outputs(self, data: Samples) -> int:
        return data.num_classes

    def validate(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, float]:
        result = classify(network, val, batch_size)
        return {"val_loss": result.loss, "val_accuracy": result.accuracy}

    def evaluate(self, model: nn.Module, test: Samples, batch_size: int, run: Run) -> Evaluation:
        result = classify(model, test, batch_size)
        classes = list(test.classes)
        run.write_json(
            "confusion.json", {"classes": classes, "per_class_accuracy": result.per_class_accuracy, "confusion": result.confusion}
        )
        plots.write_confusion(run, classes, result.confusion)
        per_class = dict(zip(classes, result.per_class_accuracy, strict=True))
        return Evaluation({"accuracy": result.accuracy, "loss": result.loss}, {"per_class_accuracy": per_class})

    def card(self, data: Samples) -> dict[str, Any]:
        return {"classes": list(data.classes)}
