"""What a method is to the rest of transferctl: the one place a command, the config, the assembly layer,
evaluation and export ask about how a run trains.

A method is a registered class (`@METHODS.register("name")`); its constructor's keyword arguments are its
config options (`method: {name: ..., option: value}`). Class attributes declare what the tool needs before
anything is built: which command runs it, its default head, loss and augmentation, whether it trains a task
(whose head, loss, metrics and export it then takes), the views a batch needs and whether batches must be
full. Instances build the objective of a run, evaluate its checkpoints and say what an export holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from transferctl import agreement
from transferctl.data.augment import BatchAugment
from transferctl.data.datasets import seeded_subset
from transferctl.data.samples import Samples
from transferctl.data.stream import is_streamed
from transferctl.engine.evaluate import Evaluation, knn_accuracy
from transferctl.engine.train import Objective
from transferctl.modalities.base import Modality
from transferctl.models.heads import Network

if TYPE_CHECKING:
    from transferctl.build import Trained, Training
    from transferctl.config import Config
    from transferctl.distributed import World
    from transferctl.runs import Run
    from transferctl.tasks.base import Task


@dataclass
class Parts:
    """What a method's objective is built from: the assembly layer fills it (`build.build_training`)."""

    cfg: Config
    device: torch.device
    modality: Modality
    train: Samples
    val: Samples
    unlabeled: Samples | None  # the pool of semi-supervised fine-tuning, when the method asked for one
    network: Network
    forward: nn.Module  # what training calls: the network, or its DDP / compiled wrapper
    criterion: nn.Module
    augment: BatchAugment
    channels_last: bool
    total_steps: int  # the optimizer steps the run takes (`Steps.total`): what a schedule inside the objective spans
    # the encoder weights training started from, read again (None: a random start): L2-SP, label propagation
    starting_encoder: Callable[[], dict[str, torch.Tensor]] | None = None


@dataclass(frozen=True)
class Export:
    """What an export of a method's run holds: the whole network, or its encoder alone, and its output; and how
    the export's outputs are compared with the run's beyond their values (parity)."""

    encoder_only: bool
    output: str  # the output's name: "embeddings", "logits", ...
    kind: str  # the model card's kind: "encoder", "classifier", ...
    # {name: (agreeing, counted)} of one batch: an encoder's strongest feature by default; a task's own (`Task.compare`)
    compare: agreement.Compare = agreement.top1
    minimum_agreement: Mapping[str, float] = field(default_factory=lambda: {"top1_agreement": 1.0})
    variable_length: bool = False  # its inputs may have any length (`Modality.length_axes` stay dynamic in exports)
    compares_values: bool = True  # parity bounds the outputs' largest difference too (`Task.compares_values`)


class Method:
    """Base class of a registered method. Subclasses set the class attributes and implement `objective` and
    `evaluate`; see `transferctl/methods/simclr.py` for a pretraining method in one file."""

    command: ClassVar[str] = "pretrain"  # the verb that runs it: pretrain or finetune
    trains_task: ClassVar[bool] = False  # trains a task's head (the `task` section): its head, loss and metrics
    default_task: ClassVar[str | None] = None  # the task when the config names none
    head: ClassVar[str | None] = None  # default head; None: the task's
    loss: ClassVar[str | None] = None  # default loss; None: the task's
    serves: ClassVar[str | None] = None  # the kind of head and loss it needs; None: the task's
    augmentation: ClassVar[str] = "light"  # the role of data.augment's default in the modality's table
    # further augmentation sections it owns (dotted path -> role), resolved like data.augment
    augment_sections: ClassVar[Mapping[str, str]] = {}
    views: ClassVar[int] = 1  # augmented views of each sample a batch holds
    full_batches: ClassVar[bool] = False  # every batch full (an epoch's short last batch dropped)
    uses_labels: ClassVar[bool] = True  # trains on labels: data.labels_per_class subsets the training split
    plots_first_batch: ClassVar[bool] = False  # keep the first training batch's inputs for `write_plots`
    evaluation_splits: ClassVar[tuple[str, ...]] = ("test",)  # the splits `evaluate` reads (loaded before its run exists)

    task: Task | None = None

    # ------------------------------------------------------------------ before anything is built

    def check(self, cfg: Config, ranks: World) -> None:
        """Refuse options that cannot work together (a ConfigError), before anything is loaded or written."""

    def notes(self, cfg: Config) -> list[str]:
        """One-line notes on options that have no effect as configured: logged and shown, never fatal."""
        return []

    def wants_unlabeled_pool(self, cfg: Config) -> bool:
        """Whether the training split's samples without their labels are loaded too."""
        return False

    def encoder_optimization(self, cfg: Config) -> tuple[float, float | None]:
        """(learning-rate scale, weight decay or None for the optimizer's) of the encoder's parameters."""
        return 1.0, None

    def encoder_layer_decay(self, cfg: Config) -> float | None:
        """The layer-wise learning-rate decay of the encoder (None: one rate for all its layers)."""
        return None

    def prepare_network(self, network: Network, cfg: Config) -> None:
        """Adjust the network before training (freeze parts of it, ...)."""

    def some_steps_frozen(self, cfg: Config) -> bool:
        """Whether the encoder gets no gradients on some steps (which DDP must be told)."""
        return False

    def num_outputs(self, data: Samples) -> int:
        """The head's outputs."""
        return self.task.num_outputs(data) if self.task is not None else data.num_classes

    # ------------------------------------------------------------------ training

    def objective(self, parts: Parts) -> Objective:
        raise NotImplementedError

    def write_plots(self, run: Run, training: Training, first_inputs: tuple[torch.Tensor, ...] | None) -> None:
        """PNGs that only this method draws, after training: from the trained run (its network and data) and the
        first training batch's inputs (kept when `plots_first_batch`)."""

    # ------------------------------------------------------------------ trained runs

    def evaluate(self, trained: Trained, run: Run) -> Evaluation:
        """Score a trained run (`build.Trained`) on its test split; files it writes go through `run`."""
        raise NotImplementedError

    def export(self) -> Export:
        raise NotImplementedError

    def card(self, data: Samples) -> dict[str, Any]:
        """What the model card says about the outputs beyond their name and shape (a classifier's classes)."""
        return self.task.card(data) if self.task is not None else {"classes": None}


class OwnGenerator:
    """The part of an objective whose random draws (masks, corruptions) come from its own CPU generator, saved with
    the checkpoint: a resumed run draws what an uninterrupted one would, on any device. The class sets
    `generator_salt`, which keeps its stream apart from the run's other generators seeded from `seed`."""

    seed: int
    generator_salt: ClassVar[int]

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + self.generator_salt)

    def prepare(self) -> None: ...

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def knn_metrics(trained: Trained) -> dict[str, float]:
    """Weighted k-NN from the labelled training split's features onto the test split's: how pretraining methods
    score an encoder. Nothing for data without labels (texts pretrained on without a label column)."""
    cfg, bank, queries = trained.cfg, trained.split(train=True), trained.split(train=False)
    if not bank.num_classes or bank.target_kind != "class":
        return {}
    if is_streamed(bank) and len(bank) > cfg.eval.knn_bank:  # features of every sample at once: a bounded bank
        bank = bank.subset(seeded_subset(len(bank), cfg.eval.knn_bank, cfg.data.seed))
    accuracy = knn_accuracy(
        trained.served(), bank, queries, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature, batch_size=cfg.data.eval_batch_size
    )
    return {"knn_accuracy": accuracy}


def component_defaults(method: type[Method], task: type[Task] | None, modality: Modality) -> dict[str, Any]:
    """The head, loss and augmentation a config gets unless it names them, and the kind of head and loss it needs."""
    return {
        "head": method.head or (task.head if task else None),
        "loss": method.loss or (task.loss if task else None),
        "serves": method.serves or (task.serves if task else None),
        "augment": modality.augmentations.get((task.augmentation if task else None) or method.augmentation),
        "sections": {path: modality.augmentations.get(role) for path, role in method.augment_sections.items()},
    }
