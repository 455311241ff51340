"""The training loop: batches by index from device-resident data, batched augmentation, one objective.

The loop avoids a host-device sync per step: losses accumulate on the device and are read only
every `train.log_every` steps and at epoch ends.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from transferctl import distributed
from transferctl.data import BatchAugment, ImageData, num_batches
from transferctl.data.pipeline import MemoryPipeline, Pipeline
from transferctl.engine.averaging import WeightAverage
from transferctl.engine.evaluate import classify
from transferctl.engine.finetuning import PseudoLabels, WeightAnchor
from transferctl.errors import RunFailed, UsageError
from transferctl.models import Network


class Reporter(Protocol):
    """Receives progress; the CLI shows it, the Python API may ignore it."""

    def start(self, total_steps: int, description: str) -> None: ...
    def progress(self, step: int, values: dict[str, float]) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def start(self, total_steps: int, description: str) -> None: ...
    def progress(self, step: int, values: dict[str, float]) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


def pick_device(name: str) -> torch.device:
    """'auto' picks cuda > mps > cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())  # under torchrun: this rank's GPU
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device={name}: CUDA is not available here; use train.device=auto or cpu")
    if name.startswith("cuda:") and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise UsageError(f"train.device={name}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("train.device=mps: MPS is not available here; use train.device=auto or cpu")
    return torch.device(name)


class Objective(Protocol):
    """What one training step optimizes, and how the held-out split scores the model."""

    contrastive: bool
    views: int  # augmented views of each image a step needs

    def loss(self, views: tuple[torch.Tensor, ...], labels: torch.Tensor, step: int) -> torch.Tensor: ...
    def validate(self, val: ImageData, batch_size: int, network: Network | None = None) -> dict[str, float]: ...
    def epoch_metrics(self) -> dict[str, float]: ...


@dataclass
class ContrastiveObjective:
    """SimCLR: two augmented views of every image, projected and contrasted with NT-Xent.

    `forward` is what training calls (the network, or its DDP / compiled wrapper); `network` the plain one.
    Across ranks, NT-Xent gathers every rank's embeddings: negatives come from the global batch.
    """

    network: Network
    criterion: nn.Module
    augment: BatchAugment  # for validation views
    forward: nn.Module | None = None
    gather: bool = False
    contrastive: bool = True
    views: int = 2

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.network

    def loss(self, views: tuple[torch.Tensor, ...], labels: torch.Tensor, step: int) -> torch.Tensor:
        z1, z2 = self.forward(torch.cat(views)).chunk(2)
        return self.criterion(z1, z2, gather=self.gather)

    @torch.no_grad()
    def validate(self, val: ImageData, batch_size: int, network: Network | None = None) -> dict[str, float]:
        """NT-Xent on the held-out images (every rank: all of them), with a fixed augmentation seed so epochs compare.
        `network` (default: the trained one) is what is scored, e.g. the weight average."""
        network = network or self.network
        network.eval()
        size = min(batch_size, len(val))
        views = MemoryPipeline(val, self.augment, views=2, batch_size=size, seed=0, drop_last=True)
        total, count = torch.zeros((), device=val.images.device), 0
        for pair, labels in views.batches(epoch=0):
            z1, z2 = network(torch.cat(pair)).chunk(2)
            total += self.criterion(z1, z2) * len(labels)
            count += len(labels)
        return {"val_loss": total.item() / max(count, 1)}

    def epoch_metrics(self) -> dict[str, float]:
        return {}


@dataclass
class ClassificationObjective:
    """Supervised training or fine-tuning (or a linear probe): augmented images, class logits, cross-entropy.

    Fine-tuning may add: `head_warmup_steps` of linear probing first (the encoder frozen, so a random
    head's large early gradients cannot wreck pretrained features), an L2-SP `anchor`, and
    `pseudo_labels` on unlabeled images.
    """

    network: Network
    criterion: nn.Module
    forward: nn.Module | None = None
    head_warmup_steps: int = 0
    anchor: WeightAnchor | None = None
    pseudo_labels: PseudoLabels | None = None
    contrastive: bool = False
    views: int = 1

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.network

    def loss(self, views: tuple[torch.Tensor, ...], labels: torch.Tensor, step: int) -> torch.Tensor:
        warming_up = step < self.head_warmup_steps
        if self.head_warmup_steps:
            self.network.frozen_encoder = warming_up
            self.network.encoder.train(not warming_up)  # frozen: batch-norm statistics stay as pretrained
        (x,) = views
        loss = self.criterion(self.forward(x), labels)
        if self.pseudo_labels is not None:
            loss = loss + self.pseudo_labels.loss(self.forward, step)
        if self.anchor is not None and not warming_up:
            # while frozen the penalty is 0; its zero gradients would still tick Adam's step counts and upset DDP
            loss = loss + self.anchor.penalty()
        return loss

    def validate(self, val: ImageData, batch_size: int, network: Network | None = None) -> dict[str, float]:
        result = classify(network or self.network, val, batch_size)
        return {"val_loss": result.loss, "val_accuracy": result.accuracy}

    def epoch_metrics(self) -> dict[str, float]:
        """The share of unlabeled images whose pseudo-label passed the threshold, over the steps since the last call."""
        if self.pseudo_labels is None:
            return {}
        passed, seen = self.pseudo_labels.take_counts()
        return {"pseudo_label_rate": _global_mean(torch.as_tensor(passed, device=self._device()), seen)}

    def _device(self) -> torch.device:
        return next(self.network.parameters()).device


@dataclass
class Settings:
    """How long and how to train; from the config's data and train sections."""

    batch_size: int
    eval_batch_size: int
    epochs: int
    max_steps: int | None
    seed: int
    log_every: int
    val_every: int
    checkpoint_every: int | None = None
    on_nan: str = "stop"
    precision: str = "32"  # 32, bf16 (autocast) or 16 (autocast and a gradient scaler; CUDA)
    ema_decay: float = 0.0  # > 0: validate and save an exponential moving average of the weights


@dataclass
class Position:
    """Where training stands: what a checkpoint needs, beside weights and RNG, to continue exactly."""

    step: int = 0
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # batches done in the unfinished epoch
    epoch_loss_sum: float = 0.0  # their loss, summed over images
    epoch_images: int = 0  # images in those batches (the last batch of an epoch may be short)
    skipped_steps: int = 0  # in the unfinished epoch (train.on_nan=skip)
    lr: float = 0.0  # the learning rate of the last step taken
    best: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    position: Position
    images_per_s: float = 0.0
    stopped: bool = False  # by a signal (on any rank), before the last step


def half_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype of a `train.precision` setting; None for float32."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)


def drops_last_batch(settings: Settings, train_size: int, contrastive: bool) -> bool:
    """NT-Xent wants full batches of negatives; batch norm cannot train on a last batch of one image;
    ranks must all get a share of every batch."""
    short_last = train_size > settings.batch_size and train_size % settings.batch_size == 1
    return contrastive or short_last or distributed.world().distributed


def total_steps(settings: Settings, train_size: int, contrastive: bool) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) for a training set of `train_size` images."""
    per_epoch = num_batches(train_size, settings.batch_size, drops_last_batch(settings, train_size, contrastive))
    if per_epoch == 0:
        raise UsageError(f"data.batch_size={settings.batch_size} is larger than the {train_size} training images; lower it")
    return per_epoch, capped_steps(settings, per_epoch)


def capped_steps(settings: Settings, per_epoch: int) -> int:
    """Optimizer steps of the whole run: its epochs, or max_steps if that comes first."""
    return int(min(settings.epochs * per_epoch, settings.max_steps or math.inf))


def rng_state(pipeline: Pipeline) -> dict[str, Any]:
    """Every random state a run draws from, in types that load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "pipeline": pipeline.state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }


def restore_rng(state: dict[str, Any], pipeline: Pipeline) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    pipeline.restore(state["pipeline"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _is_better(row: dict[str, Any], best: dict[str, Any], contrastive: bool) -> bool:
    if not best:
        return True
    if contrastive or "val_accuracy" not in row:
        return row.get("val_loss", math.inf) <= best.get("val_loss", math.inf)
    return row["val_accuracy"] >= best["val_accuracy"]


def _global_mean(total: torch.Tensor, count: int) -> float:
    """Mean over all ranks of a per-image loss summed (`total`) over `count` local images."""
    both = distributed.all_sum(torch.stack([total.float(), torch.tensor(float(count), device=total.device)]))
    return (both[0] / both[1].clamp_min(1)).item()


def _check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise RunFailed(f"loss became {value} {where}; lower optimizer.lr, or set train.on_nan=skip to skip such steps")


def fit(
    objective: Objective,
    model: Network,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pipeline: Pipeline,
    val: ImageData | None,
    settings: Settings,
    *,
    save: Callable[[dict[str, Any], dict[str, Any] | None, bool], None],
    reporter: Reporter,
    resume: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> FitResult:
    """Train on `pipeline`'s batches for `settings.epochs` (or `max_steps`), validating every `val_every` epochs.

    `save(state, row, is_best)` persists a checkpoint: at every epoch end (with that epoch's metrics
    `row`), every `checkpoint_every` steps and when `should_stop()` turns true (with `row=None`).
    `resume` is a checkpoint written by `save`: training continues at its exact batch, with its RNG.
    """
    loop = _Loop(objective, model, optimizer, scheduler, pipeline, val, settings, save, reporter, should_stop)
    if resume is not None:
        loop.restore(resume)
    return loop.run()


class _Loop:
    """One training run's loop state; `fit` is its public face."""

    def __init__(self, objective, model, optimizer, scheduler, pipeline, val, settings, save, reporter, should_stop):
        self.objective, self.model, self.optimizer, self.scheduler = objective, model, optimizer, scheduler
        self.pipeline, self.val, self.settings = pipeline, val, settings
        self.save, self.reporter, self.should_stop = save, reporter, should_stop
        self.device = next(model.parameters()).device
        self.ranks = distributed.world()
        self.per_epoch = pipeline.batches_per_epoch()
        self.steps = capped_steps(settings, self.per_epoch)
        self.half = half_precision(settings.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "16")
        self.pos = Position(lr=optimizer.param_groups[-1]["lr"])
        self.average = WeightAverage(model, settings.ema_decay) if settings.ema_decay else None

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint.get("trained_model", checkpoint["model"]))
        if self.average is not None:
            self.average.network.load_state_dict(checkpoint["model"])
            self.average.updates = checkpoint["averaged_steps"]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint.get("scaler", {}))
        restore_rng(checkpoint["rng"], self.pipeline)
        self.pos = Position(**checkpoint["position"])

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds. `model` is what evaluation, export and fine-tuning use: the weight
        average when there is one (the trained weights are then kept as `trained_model`, to resume)."""
        averaged = {} if self.average is None else {
            "trained_model": self.model.state_dict(), "averaged_steps": self.average.updates,
        }
        return {
            "model": (self.model if self.average is None else self.average.network).state_dict(),
            **averaged,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(self.pipeline),
            "position": asdict(self.pos),
        }

    def stop_requested(self) -> bool:
        """All ranks stop at the same step; across ranks that agreement costs a collective, so it is
        polled at log and checkpoint steps only."""
        if not self.ranks.distributed:
            return self.should_stop()
        polls = self.pos.step % self.settings.log_every == 0 or (
            self.settings.checkpoint_every and self.pos.step % self.settings.checkpoint_every == 0
        )
        return bool(polls) and distributed.any_rank(self.should_stop(), self.device)

    def run(self) -> FitResult:
        self.reporter.start(self.steps, "pretraining" if self.objective.contrastive else "training")
        started, images = time.perf_counter(), 0
        epochs = math.ceil(self.steps / self.per_epoch)
        try:
            for epoch in range(self.pos.epoch, epochs):
                if self.pos.step >= self.steps:
                    break
                done = self.epoch(epoch)
                if done is None:  # stopped mid-epoch, checkpoint written
                    return FitResult(self.pos, stopped=True)
                images += done
                if self.pos.step < self.steps and distributed.any_rank(self.should_stop(), self.device):
                    return FitResult(self.pos, stopped=True)
        finally:
            self.reporter.finish()
        return FitResult(self.pos, images / max(time.perf_counter() - started, 1e-9))

    def epoch(self, epoch: int) -> int | None:
        """Train the rest of `epoch`; the number of images it trained on (all ranks), or None if stopped."""
        pos, settings = self.pos, self.settings
        self.model.train()
        if self.model.frozen_encoder:
            self.model.encoder.eval()  # a linear probe keeps the encoder's batch-norm statistics
        running = torch.tensor(pos.epoch_loss_sum, device=self.device)
        epoch_start = window_start = time.perf_counter()
        first_images, window_images = pos.epoch_images, 0
        for views, labels in self.pipeline.batches(epoch, start_batch=pos.batch_in_epoch):
            running += self.step(views, labels)
            window_images += len(labels)
            if pos.step % settings.log_every == 0 or pos.step == self.steps:
                value = _global_mean(running, pos.epoch_images)
                _check_finite(value, f"at step {pos.step}")
                rate = self.ranks.size * window_images / max(time.perf_counter() - window_start, 1e-9)
                self.reporter.progress(pos.step, {"loss": value, "lr": pos.lr, "images_per_s": rate})
                window_start, window_images = time.perf_counter(), 0
            if pos.step >= self.steps:
                break
            stopping = self.stop_requested()
            if stopping or (settings.checkpoint_every and pos.step % settings.checkpoint_every == 0):
                pos.epoch_loss_sum = distributed.all_sum(running).item() / self.ranks.size  # restores on every rank
                _check_finite(pos.epoch_loss_sum, f"before step {pos.step}'s checkpoint")
                self.save(self.state(), None, False)
                if stopping:
                    return None
        images = self.ranks.size * (pos.epoch_images - first_images)
        self.end_epoch(epoch, running, images, time.perf_counter() - epoch_start)
        return images

    def step(self, views: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step; the batch's summed loss (zero for a skipped step)."""
        with torch.autocast(self.device.type, dtype=self.half, enabled=self.half is not None):
            loss = self.objective.loss(views, labels, self.pos.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.pos.lr = self.optimizer.param_groups[-1]["lr"]
        skip = self.settings.on_nan == "skip" and distributed.any_rank(not torch.isfinite(loss), self.device)  # a sync, only then
        if skip:
            self.pos.skipped_steps += 1
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.pos.epoch_images += len(labels)
            if self.average is not None:
                self.average.update()
        self.scheduler.step()
        self.pos.step += 1
        self.pos.batch_in_epoch += 1
        return torch.zeros((), device=self.device) if skip else loss.detach() * len(labels)

    def end_epoch(self, epoch: int, running: torch.Tensor, images: int, seconds: float) -> None:
        """Metrics row, validation, best tracking, and the epoch-end checkpoint.

        A run that reaches max_steps inside an epoch ends it with a row for the partial epoch, but its
        checkpoint stays at that batch, so extending the run finishes the epoch exactly.
        """
        pos = self.pos
        complete = pos.batch_in_epoch >= self.per_epoch
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": pos.step,
            "train_loss": _global_mean(running, pos.epoch_images) if pos.epoch_images else None,
            "lr": pos.lr,  # the rate of the epoch's last step
            "images_per_s": images / max(seconds, 1e-9),
            "epoch_time_s": round(seconds, 3),
            **self.objective.epoch_metrics(),
        }
        if pos.skipped_steps:
            row["skipped_steps"] = pos.skipped_steps
        if not complete:
            row["partial"] = True
        if row["train_loss"] is not None:
            _check_finite(row["train_loss"], f"in epoch {epoch + 1}")
        has_val = self.val is not None and len(self.val) > 0
        if has_val and ((epoch + 1) % self.settings.val_every == 0 or pos.step >= self.steps):
            scored = None if self.average is None else self.average.network
            row.update(self.objective.validate(self.val, self.settings.eval_batch_size, scored))
        is_best = (not has_val) or ("val_loss" in row and _is_better(row, pos.best, self.objective.contrastive))
        if complete:
            pos.epoch, pos.batch_in_epoch, pos.epoch_loss_sum, pos.epoch_images, pos.skipped_steps = epoch + 1, 0, 0.0, 0, 0
        else:
            pos.epoch_loss_sum = distributed.all_sum(running).item() / self.ranks.size
        pos.last = row
        if is_best:
            pos.best = row
        self.reporter.epoch(row)
        self.save(self.state(), row, is_best)


__all__ = [
    "fit", "pick_device", "total_steps", "ContrastiveObjective", "ClassificationObjective",
    "Position", "Settings", "Reporter", "SilentReporter",
]
