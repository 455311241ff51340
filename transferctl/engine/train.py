"""The training loop: batches by index from device-resident data, batched augmentation, one objective.

The loop avoids a host-device sync per step: losses accumulate on the device and are read only
every `train.log_every` steps and at epoch ends.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from transferctl.data import BatchAugment, ImageData, iterate_batches, normalize, num_batches
from transferctl.engine.evaluate import classify
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
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device={name}: CUDA is not available here; use train.device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("train.device=mps: MPS is not available here; use train.device=auto or cpu")
    return torch.device(name)


class Objective(Protocol):
    """What one training step optimizes, and how the held-out split scores the model."""

    contrastive: bool

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...
    def validate(self, val: ImageData, batch_size: int) -> dict[str, float]: ...


def _to_input(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


@dataclass
class ContrastiveObjective:
    """SimCLR: two augmented views of every image, projected and contrasted with NT-Xent."""

    model: Network
    criterion: nn.Module
    augment: BatchAugment
    mean: tuple[float, ...]
    std: tuple[float, ...]
    contrastive: bool = True

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = _to_input(images)
        views = torch.cat([self.augment(x, generator), self.augment(x, generator)])
        z = self.model(normalize(views, self.mean, self.std))
        z1, z2 = z.chunk(2)
        return self.criterion(z1, z2)

    @torch.no_grad()
    def validate(self, val: ImageData, batch_size: int) -> dict[str, float]:
        """NT-Xent on the held-out images, with a fixed augmentation seed so epochs compare."""
        self.model.eval()
        generator = torch.Generator(device=val.images.device).manual_seed(0)
        total, count = torch.zeros((), device=val.images.device), 0
        for images, labels in iterate_batches(val, min(batch_size, len(val)), drop_last=True):
            total += self.loss(images, labels, generator) * len(images)
            count += len(images)
        return {"val_loss": total.item() / max(count, 1)}


@dataclass
class ClassificationObjective:
    """Supervised training or fine-tuning: augmented images, class logits, cross-entropy."""

    model: Network
    criterion: nn.Module
    augment: BatchAugment
    mean: tuple[float, ...]
    std: tuple[float, ...]
    frozen_encoder: bool = False
    contrastive: bool = False

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = normalize(self.augment(_to_input(images), generator), self.mean, self.std)
        if self.frozen_encoder:
            with torch.no_grad():
                features = self.model.encoder(x)
            return self.criterion(self.model.head(features), labels)
        return self.criterion(self.model(x), labels)

    def validate(self, val: ImageData, batch_size: int) -> dict[str, float]:
        result = classify(self.model, val, batch_size)
        return {"val_loss": result.loss, "val_accuracy": result.accuracy}


@dataclass
class FitResult:
    steps: int
    epochs: int
    best: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)
    images_per_s: float = 0.0


def _is_better(row: dict[str, Any], best: dict[str, Any], contrastive: bool) -> bool:
    if not best:
        return True
    if contrastive or "val_accuracy" not in row:
        return row.get("val_loss", math.inf) <= best.get("val_loss", math.inf)
    return row["val_accuracy"] >= best["val_accuracy"]


def fit(
    objective: Objective,
    model: Network,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train: ImageData,
    val: ImageData | None,
    *,
    batch_size: int,
    eval_batch_size: int,
    epochs: int,
    max_steps: int | None,
    seed: int,
    log_every: int,
    val_every: int,
    on_epoch_end: Callable[[dict[str, Any], bool, dict[str, Any]], None],
    reporter: Reporter,
) -> FitResult:
    """Train for `epochs` (or `max_steps`), validating every `val_every` epochs.

    `on_epoch_end(row, is_best, state)` is where the caller persists metrics and checkpoints.
    """
    device = train.images.device
    drop_last = objective.contrastive  # NT-Xent wants full batches of negatives
    per_epoch = num_batches(len(train), batch_size, drop_last)
    if per_epoch == 0:
        raise UsageError(f"data.batch_size={batch_size} is larger than the {len(train)} training images; lower it")
    total_steps = min(epochs * per_epoch, max_steps or math.inf)
    epochs = math.ceil(total_steps / per_epoch)
    augment_generator = torch.Generator(device=device).manual_seed(seed + 1)
    frozen = getattr(objective, "frozen_encoder", False)

    reporter.start(int(total_steps), "pretraining" if objective.contrastive else "training")
    result = FitResult(steps=0, epochs=0)
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        if frozen:
            model.encoder.eval()  # a linear probe keeps the encoder's batch-norm statistics
        order_generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        epoch_start, running, seen, window_start = time.perf_counter(), torch.zeros((), device=device), 0, time.perf_counter()
        for images, labels in iterate_batches(train, batch_size, generator=order_generator, drop_last=drop_last):
            loss = objective.loss(images, labels, augment_generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.detach()
            seen += 1
            result.steps += 1
            if result.steps % log_every == 0 or result.steps == total_steps:
                value = running.item() / seen
                if not math.isfinite(value):
                    raise RunFailed(f"loss became {value} at step {result.steps}; lower optimizer.lr or check the data")
                elapsed = time.perf_counter() - window_start
                reporter.progress(
                    result.steps,
                    {"loss": value, "lr": optimizer.param_groups[-1]["lr"], "images_per_s": seen * batch_size / max(elapsed, 1e-9)},
                )
            if result.steps >= total_steps:
                break
        epoch_time = time.perf_counter() - epoch_start
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": result.steps,
            "train_loss": running.item() / max(seen, 1),
            "lr": optimizer.param_groups[-1]["lr"],
            "images_per_s": seen * batch_size / max(epoch_time, 1e-9),
            "epoch_time_s": round(epoch_time, 3),
        }
        if not math.isfinite(row["train_loss"]):
            raise RunFailed(f"loss became {row['train_loss']} in epoch {epoch + 1}; lower optimizer.lr or check the data")
        last_epoch = result.steps >= total_steps
        if val is not None and len(val) and ((epoch + 1) % val_every == 0 or last_epoch):
            row.update(objective.validate(val, eval_batch_size))
        is_best = "val_loss" in row and _is_better(row, result.best, objective.contrastive)
        if is_best:
            result.best = row
        result.last, result.epochs = row, epoch + 1
        reporter.epoch(row)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": result.steps,
            "epoch": epoch + 1,
            "torch_rng": torch.get_rng_state(),
            "augment_rng": augment_generator.get_state().cpu(),
        }
        on_epoch_end(row, is_best or (val is None or not len(val)), state)
        if last_epoch:
            break
    reporter.finish()
    total_time = time.perf_counter() - started
    result.images_per_s = result.steps * batch_size / max(total_time, 1e-9)
    return result


__all__ = ["fit", "pick_device", "ContrastiveObjective", "ClassificationObjective", "Reporter", "SilentReporter"]
