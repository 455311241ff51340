"""A test plugin: a task whose target is a variable-length list per sample (the digits of an `mnist_scenes` canvas,
in reading order), with its own head, loss, collate, decode, metric and comparison. It touches no file of
transferctl: everything goes through the second seam (target kinds, `Task.collate`, `Task.decode`, `Task.compare`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferctl.data import iterate_batches
from transferctl.engine import Evaluation, Selection
from transferctl.modalities import modality_of
from transferctl.registry import HEADS, LOSSES, TASKS
from transferctl.tasks import Task


class DigitSlots(nn.Module):
    """`slots` positions, each a choice among the classes and an "end" (the last index): (N, classes + 1, slots)."""

    def __init__(self, feature_dim: int, num_outputs: int, slots: int):
        super().__init__()
        self.linear = nn.Linear(feature_dim, slots * (num_outputs + 1))
        self.slots, self.choices = slots, num_outputs + 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features).view(-1, self.choices, self.slots)


@HEADS.register("digit_slots", serves=("digit_sequence",))
def digit_slots(feature_dim: int, num_outputs: int, slots: int = 4) -> nn.Module:
    """A class (or the end) at each of `slots` positions (the task's `slots`), from the pooled features."""
    return DigitSlots(feature_dim, num_outputs, slots)


@LOSSES.register(serves=("digit_sequence",))
def slot_cross_entropy() -> nn.Module:
    """Cross-entropy at every slot: (N, choices, slots) logits against (N, slots) class indices."""
    return nn.CrossEntropyLoss()


@TASKS.register("digits_in_order")
@dataclass
class DigitsInOrder(Task):
    """The digits of a scene, left to right (a plugin): a class or the end at each of `slots` slots."""

    slots: int = 4
    head = "digit_slots"
    loss = "slot_cross_entropy"
    serves = "digit_sequence"
    target_kind = "class_sequence"
    selection = Selection("val_sequence_accuracy", higher_is_better=True)
    output = "slot_logits"
    exported_as = "sequence_reader"
    minimum_agreement = {"sequence_agreement": 1.0}  # noqa: RUF012 (a class constant, as the base declares it)
    fits_after_training = True

    def num_outputs(self, data) -> int:
        return data.num_classes

    def breaking_effects(self) -> frozenset[str]:
        return frozenset({"crop", "rotation", "translate", "hflip"})  # the digits would not move with the image

    def fit(self, train) -> dict[str, Any]:
        self.end = train.num_classes  # the index after the classes
        return {"end": self.end}

    def load_fitted(self, state: dict[str, Any]) -> None:
        self.end = state["end"]

    def fit_after_training(self, network, val, batch_size: int) -> dict[str, Any]:
        """The held-out loss of the checkpoint's own weights, kept with it (a stand-in for fitted thresholds)."""
        return {"held_out_loss": self.score(network, val, batch_size)[1]}

    def collate(self, targets) -> torch.Tensor:
        """The digits (a TargetList of index tensors) padded with `end` to (N, slots): what the loss takes."""
        padded = torch.full((len(targets), self.slots), self.end, dtype=torch.long, device=targets.device)
        for row, digits in enumerate(targets):
            padded[row, : min(len(digits), self.slots)] = digits[: self.slots]
        return padded

    def validate(self, network, val, batch_size: int) -> dict[str, float]:
        right, loss = self.score(network, val, batch_size)
        return {"val_loss": loss, "val_sequence_accuracy": right}

    def evaluate(self, model, test, batch_size: int, run) -> Evaluation:
        right, loss = self.score(model, test, batch_size)
        return Evaluation({"sequence_accuracy": right, "loss": loss})

    @torch.no_grad()
    def score(self, network, data, batch_size: int) -> tuple[float, float]:
        """The share of scenes read exactly, and the mean per-slot cross-entropy."""
        network.eval()
        modality, right, loss = modality_of(data), 0, 0.0
        for inputs, targets in iterate_batches(data, batch_size):
            logits, truth = network(modality.model_input(inputs, data)).float(), self.collate(targets)
            right += int((logits.argmax(1) == truth).all(1).sum())
            loss += F.cross_entropy(logits, truth, reduction="sum").item() / truth.shape[1]
        return right / max(len(data), 1), loss / max(len(data), 1)

    def decode(self, outputs: torch.Tensor, fitted, top_k: int = 1) -> list[dict[str, Any]]:
        classes, records = list(fitted["classes"]), []
        for slots in outputs.argmax(1).tolist():
            digits = []
            for index in slots:
                if index >= len(classes):
                    break
                digits.append(classes[index])
            records.append({"digits": digits})
        return records

    def compare(self, expected: torch.Tensor, actual: torch.Tensor) -> dict[str, tuple[int, int]]:
        same = (expected.argmax(1) == actual.argmax(1)).all(1)  # the whole reading, not a row's argmax
        return {"sequence_agreement": (int(same.sum()), len(same))}

    def card(self, data) -> dict[str, Any]:
        return {"classes": list(data.classes), "output_meaning": "(N, classes + end, slots): a digit or the end at each slot"}
