"""Fine-tuning: a new task head (classification unless `task` says otherwise) on an encoder pretrained by another
run (`--from`) or loaded from `model.weights`, or on a random one: the from-scratch baseline. The `finetune`
section adds what protects and extends few labels: a head warm-up, an encoder learning-rate scale, L2-SP,
and pseudo-labels on the unlabeled training samples (with distribution alignment and label propagation).

The package holds what only fine-tuning adds to a task's objective: `weight_anchor` (L2-SP), `pseudo_labels`
(FixMatch) and `propagation` (label propagation, the pseudo-labels' second opinion)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from transferctl.data.pipeline import UnlabeledStream
from transferctl.data.samples import Samples
from transferctl.data.stream import is_streamed
from transferctl.distributed import world
from transferctl.engine.evaluate import embed
from transferctl.engine.train import half_precision, training_precision
from transferctl.errors import ConfigError
from transferctl.methods.base import Parts
from transferctl.methods.finetune.labels_only import LabelsOnlyCheck
from transferctl.methods.finetune.propagation import propagate_labels
from transferctl.methods.finetune.pseudo_labels import PseudoLabels
from transferctl.methods.finetune.weight_anchor import WeightAnchor
from transferctl.methods.supervised import TaskMethod, TaskObjective
from transferctl.models import lora
from transferctl.models.heads import Network
from transferctl.models.weights import has_pretrained_encoder
from transferctl.registry import AUGMENTATIONS, METHODS
from transferctl.tasks.base import Task

if TYPE_CHECKING:
    from transferctl.config import Config
    from transferctl.distributed import World


@METHODS.register("finetune")
@dataclass
class Finetune(TaskMethod):
    """Fine-tuning: a new task head on a pretrained (or random) encoder; options in the `finetune` section."""

    task: Task
    command = "finetune"
    augment_sections: ClassVar[Mapping[str, str]] = {"finetune.unlabeled.augment": "strong"}  # the unlabeled samples' strong view

    def check(self, cfg: Config, ranks: World) -> None:
        options = cfg.finetune
        unlabeled = options.unlabeled
        if unlabeled.weight and unlabeled.batch_size % ranks.size:
            raise ConfigError(
                f"finetune.unlabeled.batch_size: {unlabeled.batch_size} does not split evenly over {ranks.size} processes; "
                f"make it a multiple of {ranks.size}"
            )
        if unlabeled.weight and not self.task.pseudo_labels:
            raise ConfigError(
                f"finetune.unlabeled.weight: pseudo-labels need class scores, and task '{cfg.task.name}' has none; set it to 0"
            )
        per_sample = [key for key in ("align", "propagate") if getattr(unlabeled, key)]
        if unlabeled.weight and per_sample and not self.task.pseudo_labels_per_sample:
            raise ConfigError(
                f"{' and '.join(f'finetune.unlabeled.{key}' for key in per_sample)}: "
                f"{'they act' if len(per_sample) > 1 else 'it acts'} on one class per sample, and task '{cfg.task.name}' reads "
                f"pseudo-labels of its own; set {'them' if len(per_sample) > 1 else 'it'} to false"
            )
        if options.lora is not None and (options.freeze_encoder or options.l2_sp):
            key = "freeze_encoder" if options.freeze_encoder else "l2_sp"
            raise ConfigError(f"finetune.lora: LoRA already keeps the encoder's weights fixed; drop finetune.{key}")
        if options.l2_sp and not has_pretrained_encoder(cfg):
            raise ConfigError(
                "finetune.l2_sp pulls the encoder toward pretrained weights, and this run has none; "
                "use --from RUN (or model.weights) or set it to 0"
            )

    def notes(self, cfg: Config) -> list[str]:
        options, notes = cfg.finetune, []
        if not has_pretrained_encoder(cfg) and (options.encoder_lr_scale != 1.0 or options.head_warmup_steps):
            notes.append(
                "random initial encoder: finetune.encoder_lr_scale and head_warmup_steps do not apply (nothing pretrained to protect)"
            )
        if options.unlabeled.weight and options.unlabeled.check and not self.task.pseudo_labels_per_sample:
            notes.append(
                f"finetune.unlabeled.check compares with a labels-only classifier of whole samples, which task "
                f"'{cfg.task.name}' has not: not checked (set it to false to silence this)"
            )
        unused = [key for key in ("align", "propagate") if getattr(options.unlabeled, key)]
        if unused and not options.unlabeled.weight:
            keys = " and ".join(f"finetune.unlabeled.{key}" for key in unused)
            notes.append(f"{keys} take effect only with pseudo-labels: finetune.unlabeled.weight is 0, so they do nothing")
        return notes

    def wants_unlabeled_pool(self, cfg: Config) -> bool:
        return cfg.finetune.unlabeled.weight > 0

    def encoder_optimization(self, cfg: Config) -> tuple[float, float | None]:
        # The LR scale and the head warm-up protect pretrained features; a randomly initialised encoder (the
        # from-scratch baseline) has none, so it trains at the full rate from the first step.
        pretrained = has_pretrained_encoder(cfg)
        scale = cfg.finetune.encoder_lr_scale if pretrained else 1.0
        return scale, 0.0 if pretrained and cfg.finetune.l2_sp else None  # L2-SP replaces the pull toward zero

    def encoder_layer_decay(self, cfg: Config) -> float | None:
        return cfg.finetune.layer_decay

    def prepare_network(self, network: Network, cfg: Config) -> None:
        if cfg.finetune.freeze_encoder:
            network.freeze_encoder()
        if cfg.finetune.lora is not None:  # after the starting weights: the adapters start at zero beside them
            lora.add_adapters(network.encoder, cfg.finetune.lora)

    def some_steps_frozen(self, cfg: Config) -> bool:
        return head_warmup_steps(cfg) > 0

    def objective(self, parts: Parts) -> TaskObjective:
        return TaskObjective(
            parts.network,
            self.task,
            parts.criterion,
            parts.forward,
            head_warmup_steps=head_warmup_steps(parts.cfg),
            anchor=_weight_anchor(parts),
            pseudo_labels=_pseudo_labels(parts, self.task),
            labels_only=_labels_only_check(parts, self.task),
        )


def head_warmup_steps(cfg: Config) -> int:
    """A frozen encoder (linear probe) is frozen throughout; a random one has nothing to protect."""
    return cfg.finetune.head_warmup_steps if has_pretrained_encoder(cfg) and not cfg.finetune.freeze_encoder else 0


def _weight_anchor(parts: Parts) -> WeightAnchor | None:
    """L2-SP's anchor: the pretrained encoder (read again, so a resumed run anchors where the first one did)."""
    strength = parts.cfg.finetune.l2_sp
    if not strength:
        return None
    return WeightAnchor.toward(parts.network.encoder, parts.starting_encoder(), strength)


def _labels_only_check(parts: Parts, task: Task) -> LabelsOnlyCheck | None:
    """With pseudo-labels (and `finetune.unlabeled.check`): the labels-only head the finished run is compared with
    (a classifier of whole samples: not for a task that reads pseudo-labels of its own)."""
    if parts.unlabeled is None or not parts.cfg.finetune.unlabeled.check or not task.pseudo_labels_per_sample:
        return None
    train = parts.train.to(parts.device)
    return LabelsOnlyCheck.of(parts.network.encoder, parts.starting_encoder, train, parts.val, parts.cfg.data.eval_batch_size)


def _pseudo_labels(parts: Parts, task: Task) -> PseudoLabels | None:
    options = parts.cfg.finetune.unlabeled
    if parts.unlabeled is None:
        return None  # finetune.unlabeled is off: the samples were not even kept
    strong = AUGMENTATIONS.build(options.augment.name, options.augment.options, **parts.modality.augment_context(parts.train))
    broken = sorted(strong.effects() & task.breaking_effects())
    if broken and not task.pseudo_labels_per_sample:  # the weak view's per-token labels must stay on the strong view's tokens
        raise ConfigError(
            f"finetune.unlabeled.augment: '{options.augment.name}' would move task '{parts.cfg.task.name}''s pseudo-labels "
            f"off their places ({', '.join(broken)}); mask tokens only: finetune.unlabeled.augment.name=text_light "
            f"finetune.unlabeled.augment.delete_p=0"
        )
    ranks = world()
    pool = parts.unlabeled.to(parts.device)  # once: the stream and the propagation share it
    stream = UnlabeledStream(
        pool,
        parts.augment,
        strong,
        parts.modality,
        batch_size=options.batch_size,
        seed=parts.cfg.train.seed,
        channels_last=parts.channels_last,
        rank=ranks.rank,
        world=ranks.size,
    )
    shares = None
    if options.align:
        counts = torch.bincount(parts.train.targets, minlength=parts.train.num_classes).float()
        shares = (counts / counts.sum()).to(parts.device)  # once here, not every step
    if options.propagate and is_streamed(pool):
        raise ConfigError(
            "finetune.unlabeled.propagate: label propagation needs every sample's features at once, which a streamed split "
            "does not hold; set it to false, or use data.pipeline=memory"
        )
    propagate = (lambda: _propagated_labels(parts, pool)) if options.propagate else None
    own = None if task.pseudo_labels_per_sample else functools.partial(task.pseudo_label_loss, parts.network)
    return PseudoLabels(
        stream, options.weight, options.threshold, options.warmup_steps, class_shares=shares, propagate=propagate, task_loss=own
    )


def _propagated_labels(parts: Parts, pool: Samples) -> torch.Tensor:
    """Each pool sample's class distribution by label propagation over the starting encoder's features: the
    pretrained one (read again, so a resumed run propagates as the first one did) or, from scratch, the seeded
    random one."""
    encoder = copy.deepcopy(parts.network.encoder)
    if parts.starting_encoder is not None:
        encoder.load_state_dict(parts.starting_encoder())
    encoder.to(parts.device)
    cfg, train = parts.cfg, parts.train
    batch = cfg.data.eval_batch_size
    half = half_precision(training_precision(cfg.train.precision, parts.device))
    with torch.autocast(parts.device.type, dtype=half, enabled=half is not None):
        labelled, unlabeled = embed(encoder, train.to(parts.device), batch), embed(encoder, pool, batch)
    return propagate_labels(labelled, train.targets.to(parts.device), unlabeled, train.num_classes)
