"""Classification: one class per sample; class logits, cross-entropy, accuracy and a confusion matrix."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from transferctl import plots
from transferctl.data.samples import Samples
from transferctl.distributed import sum_over_shares
from transferctl.engine.evaluate import Evaluation, over_my_share
from transferctl.engine.train import Selection
from transferctl.modalities import modality_of
from transferctl.registry import TASKS
from transferctl.tasks.base import Task

if TYPE_CHECKING:
    from transferctl.modalities.base import ReadBatch
    from transferctl.runs import Run


@dataclass
class ClassScores:
    accuracy: float
    loss: float
    per_class_accuracy: list[float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    balanced_accuracy: float  # the mean of the per-class accuracies (recalls) over the classes present
    f1_macro: float  # the mean F1 over the classes present or predicted

    def headline(self) -> dict[str, float]:
        """The numbers that sum it up: on imbalanced data accuracy alone says little."""
        return {"accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy, "f1_macro": self.f1_macro, "loss": self.loss}


def confusion_scores(confusion: torch.Tensor) -> tuple[list[float], float, float]:
    """(per-class recall, balanced accuracy, macro F1) of a confusion matrix (rows: true, columns: predicted), as
    scikit-learn's `balanced_accuracy_score` and `f1_score(average="macro")` count them: classes absent from the
    truth leave the balanced accuracy out, classes neither true nor predicted leave macro F1 out."""
    confusion = confusion.double()
    hits, true, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    recall = hits / true.clamp_min(1)
    present = true > 0
    balanced = recall[present].mean().item() if present.any() else 0.0
    f1 = 2 * hits / (true + predicted).clamp_min(1)
    seen = present | (predicted > 0)
    return recall.tolist(), balanced, (f1[seen].mean().item() if seen.any() else 0.0)


@torch.no_grad()
def classify(model: nn.Module, data: Samples, batch_size: int) -> ClassScores:
    """Top-1 accuracy, mean cross-entropy and the confusion matrix of `model` on `data` (every rank scores its share;
    the counts are summed, so every rank ends with those of all samples)."""
    model.eval()
    modality = modality_of(data)
    k = data.num_classes
    confusion = torch.zeros(k, k, dtype=torch.long, device=data.targets.device)
    total_loss = torch.zeros((), device=data.targets.device)
    for inputs, labels, side in over_my_share(data, batch_size, with_side=True):
        logits = model(modality.model_input(inputs, data), **side)
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum")
        confusion += torch.bincount(labels * k + logits.argmax(1), minlength=k * k).view(k, k)
    confusion, total_loss = sum_over_shares(confusion, len(data)).cpu(), sum_over_shares(total_loss, len(data))
    per_class, balanced, f1_macro = confusion_scores(confusion)
    return ClassScores(
        accuracy=confusion.diag().sum().item() / max(confusion.sum().item(), 1),
        loss=total_loss.item() / max(len(data), 1),
        per_class_accuracy=per_class,
        confusion=confusion.tolist(),
        balanced_accuracy=balanced,
        f1_macro=f1_macro,
    )


@TASKS.register("classification")
@dataclass
class Classification(Task):
    """One class per sample: logits from a linear head, cross-entropy; accuracy, per-class accuracy, confusion matrix."""

    head = "linear"
    loss = "cross_entropy"
    serves = "classification"
    target_kind = "class"
    selection = Selection("val_accuracy", higher_is_better=True)
    validation_metrics: ClassVar[Mapping[str, bool]] = {
        "val_loss": False,
        "val_accuracy": True,
        "val_balanced_accuracy": True,
        "val_f1_macro": True,
    }
    output = "logits"
    exported_as = "classifier"
    pseudo_labels = True
    recipe = "finetune"  # transferctl/recipes/finetune.yaml: 10 labels per class, a standardized linear head, ...

    def num_outputs(self, data: Samples) -> int:
        return data.num_classes

    def validate(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, float]:
        result = classify(network, val, batch_size)
        return {
            "val_loss": result.loss,
            "val_accuracy": result.accuracy,
            "val_balanced_accuracy": result.balanced_accuracy,
            "val_f1_macro": result.f1_macro,
        }

    def evaluate(self, model: nn.Module, test: Samples, batch_size: int, run: Run) -> Evaluation:
        result = classify(model, test, batch_size)
        classes = list(test.classes)
        run.write_json(
            "confusion.json", {"classes": classes, "per_class_accuracy": result.per_class_accuracy, "confusion": result.confusion}
        )
        title = f"accuracy {result.accuracy:.3f}, balanced {result.balanced_accuracy:.3f}, macro F1 {result.f1_macro:.3f}"
        plots.write_confusion(run, classes, result.confusion, title)
        per_class = dict(zip(classes, result.per_class_accuracy, strict=True))
        return Evaluation(result.headline(), {"per_class_accuracy": per_class})

    def decode(
        self, outputs: torch.Tensor, fitted: Mapping[str, Any], top_k: int = 1, batch: ReadBatch | None = None
    ) -> list[dict[str, Any]]:
        """The most likely class and its softmax probability; with `top_k` > 1 the k most likely, best first."""
        classes = list(fitted["classes"])
        scores, indices = outputs.float().softmax(1).topk(min(top_k, len(classes)), dim=1)
        records = []
        for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True):
            record: dict[str, Any] = {"label": classes[row_indices[0]], "score": row_scores[0]}
            if top_k > 1:
                record["top_k"] = [{"label": classes[i], "score": score} for i, score in zip(row_indices, row_scores, strict=True)]
            records.append(record)
        return records

    def card(self, data: Samples) -> dict[str, Any]:
        return {"classes": list(data.classes)}
