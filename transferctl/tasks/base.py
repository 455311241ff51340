"""What a task is to the rest of transferctl: the target a head is trained for, and everything that follows
from it: the default head and loss, the kind of targets it needs and how a batch of them is collated, its loss of
a batch, its validation metric, its evaluation, the state it fits on the training split (and after training),
what its outputs mean (`decode`: one record per sample) and how two models' outputs are compared
(`compare`: what export parity counts).

A task is a registered class (`@TASKS.register("name")`); its constructor's keyword arguments are its config
options (`task: {name: ..., option: value}`). Methods that train a task (`supervised`, `finetune`) hand these
questions to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from transferctl import agreement
from transferctl.data.samples import Batch, Samples, TargetKindName
from transferctl.data.targets import Targets
from transferctl.engine.train import Selection

if TYPE_CHECKING:
    from transferctl.engine.evaluate import Evaluation
    from transferctl.modalities.base import ReadBatch
    from transferctl.runs import Run


class Task:
    """Base class of a registered task; see `transferctl/tasks/classification.py`."""

    head: ClassVar[str]  # default head
    loss: ClassVar[str]  # default loss
    serves: ClassVar[str]  # the kind of head and loss it needs (`register(serves=...)` on heads and losses)
    target_kind: ClassVar[TargetKindName]  # the targets it trains on
    selection: ClassVar[Selection]  # the validation metric that picks best.pt
    validation_metrics: ClassVar[Mapping[str, bool]]  # what `validate` returns: {name: higher is better}
    output: ClassVar[str]  # the name of an export's output
    exported_as: ClassVar[str]  # the model card's kind
    pseudo_labels: ClassVar[bool] = False  # its outputs are class scores that pseudo-labels can be read from
    # pseudo-labels read per sample from class scores (what `align` and `propagate` act on); False: the task reads
    # its own (`pseudo_label_loss`: tags per token)
    pseudo_labels_per_sample: ClassVar[bool] = True
    augmentation: ClassVar[str | None] = None  # the augmentation role of its default (None: the method's)
    # the share of each `compare` count that an export's parity check requires
    minimum_agreement: ClassVar[Mapping[str, float]] = {"top1_agreement": 1.0}
    # parity also bounds the largest difference of the outputs' values (not where an output may gain or lose a row:
    # detections near a threshold)
    compares_values: ClassVar[bool] = True
    # the fine-tune recipe `finetune` starts from (a built-in recipe's name or a YAML file's path); None: the defaults
    recipe: ClassVar[str | None] = None
    variable_length: ClassVar[bool] = False  # takes inputs of any length: an export keeps their length axes dynamic
    fits_after_training: ClassVar[bool] = False  # `fit_after_training` fits state once training is done

    def num_outputs(self, data: Samples) -> int:
        raise NotImplementedError

    def served(self, network: nn.Module) -> nn.Module:
        """What a trained network serves (evaluation, predict, exports): its outputs by default; a task whose outputs
        need decoding first (detection: boxes after NMS) puts that decoding behind the network."""
        return network

    def fit(self, train: Samples) -> dict[str, Any]:
        """Fit what the task needs from the training split (a regression target's mean and std), keep it, and return
        it for the checkpoints; a trained run's task gets it back through `load_fitted`."""
        return {}

    def load_fitted(self, state: dict[str, Any]) -> None:
        """Take back the state `fit` returned, from a trained run's checkpoint (evaluation, export)."""

    def initialize(self, network: nn.Module) -> None:
        """Put what `fit` found into a new network before training (a regression head's target mean and std)."""

    def pseudo_label_loss(
        self,
        network: nn.Module,
        forward: nn.Module,
        weak: torch.Tensor,
        strong: torch.Tensor,
        side: dict[str, torch.Tensor],
        threshold: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Of a task whose pseudo-labels are not one class per sample (`pseudo_labels_per_sample` False): the
        unlabeled batch's loss (before fine-tuning's weight) of the strong views toward the confident predictions on
        the weak ones (`forward`: what training calls, `network`'s head its parts; `side`: the samples' side
        information), and which of the batch's samples (or of their parts: tokens) passed `threshold`: what
        `pseudo_label_rate` counts."""
        raise NotImplementedError

    def breaking_effects(self) -> frozenset[str]:
        """The augmentation effects (`BatchAugment.effects`) that would make its targets untrue: a rotation
        changes an angle. Training refuses an augmentation with any of them."""
        return frozenset()

    def collate(self, targets: Targets) -> Any:
        """A batch's targets as the loss and metrics take them: stacked targets as they are; a TargetList's items
        padded, concatenated or listed as the task needs (boxes, transcripts, the labels of words)."""
        return targets

    def prepare(self, batch: Batch) -> Batch:
        """The training batch the network sees: as it is by default; a task may cut it (tagging: to its longest text)."""
        return batch

    def training_loss(self, criterion: nn.Module, outputs: torch.Tensor, batch: Batch, network: nn.Module | None = None) -> torch.Tensor:
        """The loss of a training batch's outputs: by default `batch_loss` of its collated targets. A task that needs
        more of the batch (the inputs' lengths, its side information) or of the `network` that gave them (how many
        frames its encoder makes of an input) overrides this."""
        return self.batch_loss(criterion, outputs, self.collate(batch.targets))

    def batch_loss(self, criterion: nn.Module, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        return criterion(outputs, targets)

    def fit_after_training(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, Any]:
        """State fitted on the held-out split with a trained checkpoint's network (per-class thresholds of multi-label
        outputs), merged into `fit`'s state in that checkpoint and given back through `load_fitted`. Called, for
        best.pt and last.pt, once training is done, by a task that sets `fits_after_training`."""
        return {}

    def decode(
        self, outputs: torch.Tensor, fitted: Mapping[str, Any], top_k: int = 1, batch: ReadBatch | None = None
    ) -> list[dict[str, Any]]:
        """One record per sample of a batch of outputs: what a prediction reports (a label and its score, a value in
        the target's units, a mask, ...), JSON-ready but for values that are files of their own
        (`predictions.Artifact`: a mask). `fitted`: the trained run's data state (`classes`, `target_names`, the
        modality's). `batch`: the inputs as read, where the outputs should be put back on them (an image's own
        pixels: `ReadBatch.placements`); without it, outputs stay in the model's coordinates."""
        raise NotImplementedError(f"task {type(self).__name__} does not decode its outputs")

    def draw(self, image: Any, record: dict[str, Any]) -> Any:
        """The input image (PIL, RGB) with its record drawn on it (`predict --save-images`); tasks that draw override it."""
        raise NotImplementedError(f"task {type(self).__name__} draws nothing on its inputs")

    def compare(self, expected: torch.Tensor, actual: torch.Tensor) -> agreement.Counts:
        """How two models' outputs of one batch agree beyond their values ({name: (agreeing, counted)}): an export
        against its run, a run against its export. By default each row's argmax (classes)."""
        return agreement.top1(expected, actual)

    def validate(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, float]:
        """Metrics of the held-out split, each named `val_<metric>`; `selection.metric` among them."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, test: Samples, batch_size: int, run: Run) -> Evaluation:
        raise NotImplementedError

    def card(self, data: Samples) -> dict[str, Any]:
        """The model card's entries about the outputs (classes, units, ...)."""
        return {}
