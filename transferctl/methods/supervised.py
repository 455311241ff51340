"""Supervised pretraining: a task's head and loss (classification unless `task` says otherwise) trained on the
labelled training split; the encoder is what fine-tuning takes from the run. `TaskObjective` is the objective of
every method that trains a task."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transferctl.data.samples import Batch, Samples
from transferctl.engine.evaluate import Evaluation
from transferctl.engine.train import Selection, global_mean
from transferctl.methods.base import Export, Method, Parts
from transferctl.models.heads import Network
from transferctl.registry import METHODS
from transferctl.tasks.base import Task

if TYPE_CHECKING:
    from transferctl.build import Trained
    from transferctl.methods.finetune.labels_only import LabelsOnlyCheck
    from transferctl.methods.finetune.pseudo_labels import PseudoLabels
    from transferctl.methods.finetune.weight_anchor import WeightAnchor
    from transferctl.runs import Run


@dataclass
class TaskObjective:
    """The task's loss of the head's outputs on a batch's (single view of) inputs and targets.

    Fine-tuning may add: `head_warmup_steps` of linear probing first (the encoder frozen, so a random head's
    large early gradients cannot wreck pretrained features), an L2-SP `anchor`, and `pseudo_labels` on
    unlabeled samples.
    """

    network: Network
    task: Task
    criterion: nn.Module
    forward: nn.Module  # what training calls: the network, or its DDP / compiled wrapper
    description: str = "training"
    head_warmup_steps: int = 0
    anchor: WeightAnchor | None = None
    pseudo_labels: PseudoLabels | None = None
    labels_only: LabelsOnlyCheck | None = None  # with pseudo-labels: the comparison `after_training` reports

    @property
    def selection(self) -> Selection:
        return self.task.selection

    @property
    def validation_metrics(self) -> Mapping[str, bool]:
        return self.task.validation_metrics

    def prepare(self) -> None:
        if self.pseudo_labels is not None:
            self.pseudo_labels.prepare()
        if self.labels_only is not None:
            self.labels_only.prepare()

    def after_training(self, network: Callable[[], nn.Module]) -> dict[str, Any]:
        return {"unlabeled_check": self.labels_only.report(network())} if self.labels_only is not None else {}

    def train_mode(self, network: Network) -> None:
        network.train()
        if network.frozen_encoder:
            network.encoder.eval()  # a linear probe (or a head warm-up) keeps the encoder's batch-norm statistics

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        warming_up = step < self.head_warmup_steps
        if self.head_warmup_steps:
            self.network.frozen_encoder = warming_up
            self.network.encoder.train(not warming_up)  # frozen: batch-norm statistics stay as pretrained
        batch = self.task.prepare(batch)
        (x,) = batch.inputs
        loss = self.task.training_loss(self.criterion, self.forward(x, **batch.side), batch, self.network)
        if self.pseudo_labels is not None:
            loss = loss + self.pseudo_labels.loss(self.forward, step)
        if self.anchor is not None and not warming_up:
            # while frozen the penalty is 0; its zero gradients would still tick Adam's step counts and upset DDP
            loss = loss + self.anchor.penalty()
        return loss

    def validate(self, val: Samples, batch_size: int, network: nn.Module) -> dict[str, float]:
        return self.task.validate(network, val, batch_size)

    def epoch_metrics(self) -> dict[str, float]:
        """The share of pseudo-labels that passed the threshold (one per unlabeled sample, or as the task counts them),
        over the steps since the last call."""
        if self.pseudo_labels is None:
            return {}
        passed, seen = self.pseudo_labels.take_counts()
        device = next(self.network.parameters()).device
        return {"pseudo_label_rate": global_mean(torch.as_tensor(passed, device=device), seen)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TaskMethod(Method):
    """A method that trains a task's head: the task's objective, evaluation and export."""

    trains_task = True
    default_task = "classification"
    augmentation = "light"

    task: Task

    def objective(self, parts: Parts) -> TaskObjective:
        return TaskObjective(parts.network, self.task, parts.criterion, parts.forward)

    def evaluate(self, trained: Trained, run: Run) -> Evaluation:
        return self.task.evaluate(trained.served(), trained.split(train=False), trained.cfg.data.eval_batch_size, run)

    def export(self) -> Export:
        task = self.task
        return Export(
            False,
            task.output,
            task.exported_as,
            compare=task.compare,
            minimum_agreement=task.minimum_agreement,
            variable_length=task.variable_length,
            compares_values=task.compares_values,
        )


@METHODS.register("supervised")
@dataclass
class Supervised(TaskMethod):
    """Supervised pretraining: the task (default: classification) trained on the labels; the encoder is handed on."""

    task: Task
