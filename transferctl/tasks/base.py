"""What a task is to the rest of transferctl: the target a head is trained for, and everything that follows
from it: the default head and loss, the kind of targets it needs, its loss of a batch, its validation metric,
its evaluation, the state it fits on the training split, and what an export of it returns.

A task is a registered class (`@TASKS.register("name")`); its constructor's keyword arguments are its config
options (`task: {name: ..., option: value}`). Methods that train a task (`supervised`, `finetune`) hand these
questions to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from transferctl.data.samples import Samples, TargetKind
from transferctl.engine.train import Selection

if TYPE_CHECKING:
    from transferctl.engine.evaluate import Evaluation
    from transferctl.runs import Run


class Task:
    """Base class of a registered task; see `transferctl/tasks/classification.py`."""

    head: ClassVar[str]  # default head
    loss: ClassVar[str]  # default loss
    serves: ClassVar[str]  # the kind of head and loss it needs (`register(serves=...)` on heads and losses)
    target_kind: ClassVar[TargetKind]  # the targets it trains on
    selection: ClassVar[Selection]  # the validation metric that picks best.pt
    output: ClassVar[str]  # the name of an export's output
    exported_as: ClassVar[str]  # the model card's kind
    pseudo_labels: ClassVar[bool] = False  # its outputs are class scores that pseudo-labels can be read from
    augmentation: ClassVar[str | None] = None  # the augmentation role of its default (None: the method's)
    agreement: ClassVar[str | None] = "top1"  # what an export's parity check compares beyond the outputs' values
    # the fine-tune recipe `finetune` starts from (a built-in recipe's name or a YAML file's path); None: the defaults
    recipe: ClassVar[str | None] = None

    def num_outputs(self, data: Samples) -> int:
        raise NotImplementedError

    def fit(self, train: Samples) -> dict[str, Any]:
        """Fit what the task needs from the training split (a regression target's mean and std), keep it, and return
        it for the checkpoints; a trained run's task gets it back through `load_fitted`."""
        return {}

    def load_fitted(self, state: dict[str, Any]) -> None:
        """Take back the state `fit` returned, from a trained run's checkpoint (evaluation, export)."""

    def initialize(self, network: nn.Module) -> None:
        """Put what `fit` found into a new network before training (a regression head's target mean and std)."""

    def breaking_effects(self) -> frozenset[str]:
        """The augmentation effects (`BatchAugment.effects`) that would make its targets untrue: a rotation
        changes an angle. Training refuses an augmentation with any of them."""
        return frozenset()

    def batch_loss(self, criterion: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return criterion(outputs, targets)

    def validate(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, float]:
        """Metrics of the held-out split, each named `val_<metric>`; `selection.metric` among them."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, test: Samples, batch_size: int, run: Run) -> Evaluation:
        raise NotImplementedError

    def card(self, data: Samples) -> dict[str, Any]:
        """The model card's entries about the outputs (classes, units, ...)."""
        return {}
