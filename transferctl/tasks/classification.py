"""Classification: one class per sample; class logits, cross-entropy, accuracy and a confusion matrix."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    per_class = confusion.diag().double() / confusion.sum(1).clamp_min(1)
    return ClassScores(
        accuracy=confusion.diag().sum().item() / max(confusion.sum().item(), 1),
        loss=total_loss.item() / max(len(data), 1),
        per_class_accuracy=per_class.tolist(),
        confusion=confusion.tolist(),
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
