"""Multi-label classification: a set of classes per sample. One logit per class, binary cross-entropy (optionally
focal or asymmetric), a threshold per class chosen on the validation split once training is done (kept with the
run's checkpoints); mean average precision, micro and macro F1, per-class AP."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from transferctl import agreement
from transferctl.data.samples import Samples
from transferctl.engine.evaluate import Evaluation, predict
from transferctl.engine.train import Selection
from transferctl.errors import UsageError
from transferctl.registry import HEADS, TASKS
from transferctl.tasks.base import Task

if TYPE_CHECKING:
    from transferctl.modalities.base import ReadBatch
    from transferctl.runs import Run

DEFAULT_THRESHOLD = 0.5  # before thresholds are fitted (validation during training), and for a class the val split lacks


def average_precision(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per class (columns): the average precision of ranking samples by `scores` against 0/1 `truth`, as scikit-learn's
    `average_precision_score` computes it (precision at each distinct score, weighted by the recall it adds; tied
    scores count as one threshold); NaN for a class without positives."""
    per_class = []
    for column in range(scores.shape[1]):
        ranked, order = scores[:, column].double().sort(descending=True, stable=True)
        hits = truth[order, column].double().cumsum(0)
        if hits[-1] == 0:
            per_class.append(torch.tensor(torch.nan, dtype=torch.float64))
            continue
        cut = torch.cat([ranked[1:] != ranked[:-1], torch.tensor([True])])  # the last row of each run of tied scores
        taken = torch.arange(1, len(ranked) + 1, dtype=torch.float64)[cut]
        precision, recall = hits[cut] / taken, hits[cut] / hits[-1]
        gained = recall - torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
        per_class.append((gained * precision).sum())
    return torch.stack(per_class) if per_class else torch.zeros(0, dtype=torch.float64)


def f1_scores(decided: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(micro F1, macro F1, per-class F1) of 0/1 decisions against 0/1 truth (a class neither true nor decided: F1 1,
    as nothing was missed; scikit-learn's zero_division=1)."""
    decided, truth = decided.double(), truth.double()
    hits, true, chosen = (decided * truth).sum(0), truth.sum(0), decided.sum(0)
    per_class = torch.where(true + chosen > 0, 2 * hits / (true + chosen).clamp_min(1), 1.0)
    micro = (2 * hits.sum() / (true.sum() + chosen.sum()).clamp_min(1)).item()
    return micro, per_class.mean().item(), per_class


def best_thresholds(probabilities: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """Per class, the probability threshold that maximizes the class's F1 on these samples (the midpoint between the
    last score taken and the next one down); DEFAULT_THRESHOLD for a class without positives."""
    thresholds = []
    for column in range(probabilities.shape[1]):
        scores, labels = probabilities[:, column].double(), truth[:, column].double()
        if labels.sum() == 0:
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        order = scores.argsort(descending=True, stable=True)
        ranked, hits = scores[order], labels[order].cumsum(0)
        taken = torch.arange(1, len(scores) + 1, dtype=torch.float64)
        f1 = 2 * hits / (taken + labels.sum())
        f1[:-1][ranked[1:] == ranked[:-1]] = -1  # a cut inside a run of tied scores is not a threshold
        best = int(f1.argmax())
        below = ranked[best + 1].item() if best + 1 < len(ranked) else 0.0
        thresholds.append((ranked[best].item() + below) / 2)
    return thresholds


class ClassMapsHead(nn.Module):
    """A score per class at every position of the deepest feature map (a 1x1 conv), pooled over positions by
    log-sum-exp (Pinheiro and Collobert 2015): `sharpness` near 0 is the mean, large is the maximum. A class is
    present when some place shows it, which global average pooling dilutes when objects are small and several."""

    def __init__(self, channels: int, num_outputs: int, sharpness: float, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(channels, num_outputs, 1)
        self.sharpness = sharpness

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        scores = self.classify(self.dropout(maps[-1])).flatten(2).float()  # (N, classes, positions); pooled in float32 under bf16
        r = self.sharpness
        return (torch.logsumexp(r * scores, dim=2) - math.log(scores.shape[2])) / r


@HEADS.register("class_maps", serves=("multilabel",), reads="feature_maps")
def class_maps_head(
    stage_channels: tuple[int, ...],
    num_outputs: int,
    sharpness: Annotated[float, Field(gt=0.0, le=100.0)] = 5.0,
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0,
) -> nn.Module:
    """One logit per class: a linear classifier at every position of the deepest feature map, pooled by log-sum-exp."""
    return ClassMapsHead(stage_channels[-1], num_outputs, sharpness, dropout)


@TASKS.register("multilabel")
@dataclass
class MultiLabel(Task):
    """A set of classes per sample: sigmoid outputs; a threshold per class fitted on the validation split after
    training (each class's F1-best). `allow_empty`: samples with no class at all may occur (in data and predictions)."""

    allow_empty: bool = True
    head = "linear"
    loss = "binary_cross_entropy"
    serves = "multilabel"
    target_kind = "class_set"
    selection = Selection("val_map", higher_is_better=True)
    validation_metrics: ClassVar[Mapping[str, bool]] = {"val_loss": False, "val_map": True, "val_f1_micro": True, "val_f1_macro": True}
    output = "logits"
    exported_as = "multilabel_classifier"
    fits_after_training = True
    minimum_agreement: ClassVar[Mapping[str, float]] = {"label_agreement": 1.0}

    def __post_init__(self) -> None:
        self.thresholds: list[float] = []

    def num_outputs(self, data: Samples) -> int:
        return data.num_classes

    def fit(self, train: Samples) -> dict[str, Any]:
        if not self.allow_empty:
            empty = (train.targets.sum(1) == 0).nonzero().flatten()
            if len(empty):
                raise UsageError(
                    f"data: {len(empty)} training samples have no label (the first: sample {int(empty[0])}) and task.allow_empty is "
                    f"false; label them, or set task.allow_empty=true"
                )
        self.thresholds = [DEFAULT_THRESHOLD] * train.num_classes
        return {"thresholds": self.thresholds}

    def load_fitted(self, state: dict[str, Any]) -> None:
        self.thresholds = list(state.get("thresholds", []))

    def batch_loss(self, criterion: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return criterion(outputs.float(), targets.float())

    def fit_after_training(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, Any]:
        if not len(val):
            return {}
        probabilities = predict(network, val, batch_size).sigmoid().cpu()
        self.thresholds = best_thresholds(probabilities, val.targets.cpu())
        return {"thresholds": self.thresholds}

    def decisions(self, logits: torch.Tensor) -> torch.Tensor:
        """0/1 per class: its probability at or above its threshold; without allow_empty, the likeliest class at least."""
        thresholds = torch.tensor(self.thresholds or [DEFAULT_THRESHOLD] * logits.shape[1], device=logits.device)
        probabilities = logits.float().sigmoid()
        decided = probabilities >= thresholds
        if not self.allow_empty:
            decided[torch.arange(len(logits)), probabilities.argmax(1)] = True
        return decided

    def scores(self, logits: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
        ap = average_precision(logits.float().sigmoid().cpu(), truth.cpu())
        micro, macro, per_class_f1 = f1_scores(self.decisions(logits).cpu(), truth.cpu())
        loss = F.binary_cross_entropy_with_logits(logits.float(), truth.float().to(logits.device)).item()
        return {"map": ap.nanmean().item(), "f1_micro": micro, "f1_macro": macro, "loss": loss, "ap": ap, "f1": per_class_f1}

    def validate(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, float]:
        scored = self.scores(predict(network, val, batch_size), val.targets)
        return {f"val_{name}": scored[name] for name in ("loss", "map", "f1_micro", "f1_macro")}

    def evaluate(self, model: nn.Module, test: Samples, batch_size: int, run: Run) -> Evaluation:
        scored = self.scores(predict(model, test, batch_size), test.targets)
        classes = list(test.classes)
        per_class = {
            name: {"ap": None if torch.isnan(ap) else ap.item(), "f1": f1.item(), "threshold": threshold, "test_samples": int(count)}
            for name, ap, f1, threshold, count in zip(
                classes, scored["ap"], scored["f1"], self.thresholds, test.targets.sum(0), strict=True
            )
        }
        run.write_json("per_class.json", {"classes": per_class})
        metrics = {name: scored[name] for name in ("map", "f1_micro", "f1_macro", "loss")}
        return Evaluation(metrics, {"per_class": per_class})

    def compare(self, expected: torch.Tensor, actual: torch.Tensor) -> agreement.Counts:
        """The decisions (class in or out, at the fitted thresholds) that both models take alike."""
        same = self.decisions(expected) == self.decisions(actual)
        return {"label_agreement": (int(same.sum()), same.numel())}

    def decode(
        self, outputs: torch.Tensor, fitted: Mapping[str, Any], top_k: int = 1, batch: ReadBatch | None = None
    ) -> list[dict[str, Any]]:
        """The chosen `labels` (best first) and every class's probability (`scores`)."""
        classes = list(fitted["classes"])
        probabilities, decided = outputs.float().sigmoid(), self.decisions(outputs)
        records = []
        for row, chosen in zip(probabilities.tolist(), decided.tolist(), strict=True):
            labels = sorted((c for c, take in zip(classes, chosen, strict=True) if take), key=lambda c: -row[classes.index(c)])
            records.append({"labels": labels, "scores": dict(zip(classes, row, strict=True))})
        return records

    def card(self, data: Samples) -> dict[str, Any]:
        return {
            "classes": list(data.classes),
            "thresholds": dict(zip(data.classes, self.thresholds, strict=False)),
            "activation": "sigmoid",
        }
