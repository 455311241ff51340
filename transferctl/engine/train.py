"""The training loop: batches from a pipeline, one objective, checkpoints, validation and best tracking.

The loop knows no method, task or modality: an objective (built by a method) computes the loss of a batch
and scores the held-out split, and its `selection` picks `best.pt`. The loop avoids a host-device sync per
step: losses accumulate on the device and are read only every `train.log_every` steps and at epoch ends.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from transferctl import distributed
from transferctl.checkpoints import Checkpoint
from transferctl.data.pipeline import Pipeline
from transferctl.data.samples import Batch, Samples, num_batches
from transferctl.engine.averaging import WeightAverage
from transferctl.errors import RunFailed, UsageError
from transferctl.models.heads import Network


class Reporter(Protocol):
    """Receives progress; the CLI shows it, the Python API may ignore it."""

    def start(self, total_steps: int, description: str) -> None: ...
    def progress(self, step: int, values: dict[str, float]) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def start(self, total_steps: int, description: str) -> None: ...
    def progress(self, step: int, values: dict[str, float]) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def note(self, message: str) -> None: ...
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
        count = torch.cuda.device_count()
        raise UsageError(f"train.device={name}: this machine has {count} CUDA device(s); use cuda:0 to cuda:{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("train.device=mps: MPS is not available here; use train.device=auto or cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Selection:
    """Which validation metric picks `best.pt`, and whether higher is better."""

    metric: str
    higher_is_better: bool

    def better(self, row: dict[str, Any], best: dict[str, Any]) -> bool:
        """Whether `row` is at least as good as `best` (ties go to the later epoch)."""
        if not best:
            return True
        if self.higher_is_better:
            return row[self.metric] >= best.get(self.metric, -math.inf)
        return row[self.metric] <= best.get(self.metric, math.inf)


@dataclass(frozen=True)
class EarlyStop:
    """Stop once `metric` has not improved by more than `min_delta` for `patience` validations in a row; with a
    `cooldown`, first anneal the learning rate linearly to zero over that fraction of the steps trained so far (a
    warmup-stable-decay schedule whose decay starts where validation levels off: a run stopped at a high rate has
    not had the annealing a fixed schedule's last part gives)."""

    metric: str
    higher_is_better: bool
    patience: int
    min_delta: float = 0.0
    cooldown: float = 0.0

    def improves(self, value: float, best: float | None) -> bool:
        return improves(value, best, self.higher_is_better, self.min_delta)


def improves(value: float, best: float | None, higher_is_better: bool, min_delta: float = 0.0) -> bool:
    """Whether a validation `value` beats `best` (None: the first) by more than `min_delta`, in the metric's direction:
    early stopping's rule, and the plateau schedule's."""
    if best is None:
        return True
    return value > best + min_delta if higher_is_better else value < best - min_delta


class Objective(Protocol):
    """What a training step optimizes and how the held-out split scores the model: a method builds one.

    `prepare` runs once before `fit`, on the starting weights (before a checkpoint is restored): passes over
    the data that the loss needs, such as label propagation, belong there, so that `config check` skips them.
    `state_dict` is checkpointed with the run (random generators an objective draws from, ...).

    `train_mode`, `after_step` and `after_training` are optional hooks (`hook` finds them): an objective without them gets the
    bodies below."""

    description: str  # what the progress bar calls the run: "pretraining", "training"
    selection: Selection
    validation_metrics: Mapping[str, bool]  # what `validate` returns: {name: higher is better}

    def prepare(self) -> None: ...
    def loss(self, batch: Batch, step: int) -> torch.Tensor: ...
    def validate(self, val: Samples, batch_size: int, network: nn.Module) -> dict[str, float]: ...
    def epoch_metrics(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def train_mode(self, network: Network) -> None:
        """Put `network` in training mode, at each epoch's start (and in `config check`): all of it by default; an
        objective that keeps a part fixed (a frozen encoder's batch-norm statistics) puts that part in eval mode."""
        network.train()

    def after_training(self, network: Callable[[], nn.Module]) -> dict[str, Any]:
        """What the objective has to say about the finished run, for its summary.json (a `warning` entry, if any, is
        shown and logged too); `network()` gives the network with the weights evaluation reads (loading them: call it
        only when needed, on every rank). Called by the training recipe, not the loop; nothing by default."""
        return {}

    def after_step(self, step: int) -> None:
        """After each optimizer step the loop takes (`step`: its index, as `loss` got it), once the weights and
        their average are updated and before the schedule moves on: a momentum teacher follows the student here.
        Not called for a step skipped by `train.on_nan=skip`. Nothing by default."""


def hook(objective: Objective, name: str) -> Callable[..., None]:
    """`objective`'s optional hook `name` (`train_mode`, `after_step`), or `Objective`'s default when it has none."""
    own = getattr(objective, name, None)
    return own if own is not None else getattr(Objective, name).__get__(objective)


@dataclass(frozen=True)
class Steps:
    """How many optimizer steps a run takes, worked out once (`plan_steps`) for the loop, the pipeline and the
    schedule alike."""

    per_epoch: int
    total: int
    drop_last: bool  # the pipeline skips each epoch's short last batch


@dataclass
class Settings:
    """How to train: from the config's data and train sections, with the run's steps."""

    steps: Steps
    eval_batch_size: int
    log_every: int
    val_every: int  # epochs
    val_every_steps: int | None = None  # also validate every that many steps, inside epochs too
    early_stop: EarlyStop | None = None
    # (metric, higher is better) that a schedule with `observe` (plateau) is given after each validation
    schedule_metric: tuple[str, bool] | None = None
    checkpoint_every: int | None = None
    on_nan: str = "stop"
    precision: str = "32"  # 32, bf16 (autocast) or 16 (autocast and a gradient scaler; CUDA)
    ema_decay: float = 0.0  # > 0: validate and save an exponential moving average of the weights
    grad_clip_norm: float | None = None  # the gradients' global norm is clipped to it before each step


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
    # early stopping: the best value of its metric so far, validations since it improved, and the step it stopped at
    early_stop_best: float | None = None
    stale_validations: int = 0
    early_stopped_at: int | None = None
    # early stopping's cooldown: the rate falls linearly from the step patience ran out to zero at the step it ends
    cooldown_from: int | None = None
    cooldown_until: int | None = None


@dataclass
class FitResult:
    position: Position
    samples_per_s: float = 0.0
    stopped: bool = False  # by a signal (on any rank), before the last step

    @property
    def stopped_early(self) -> bool:
        return self.position.early_stopped_at is not None


def half_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype of a `train.precision` setting; None for float32."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)


def emulated_bf16(device: torch.device) -> bool:
    """Whether bfloat16 would be emulated on `device`: a CPU without bfloat16 instructions (AVX-512 BF16 or AMX),
    where oneDNN's bf16 convolutions and recurrent layers run many times slower than float32."""
    if device.type != "cpu":
        return False
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a build without oneDNN's query: take bf16 at its word
        return False


def training_precision(precision: str, device: torch.device) -> str:
    """The precision a run trains in on `device`: float32 where bf16 would be emulated (the run says so in a note)."""
    return "32" if precision == "bf16" and emulated_bf16(device) else precision


EMULATED_BF16_NOTE = (
    "train.precision: bf16 would be emulated on this CPU (no bfloat16 instructions), many times slower than float32: training in float32"
)


def plan_steps(train_size: int, batch_size: int, epochs: int, max_steps: int | None, *, full_batches: bool, ranks: int) -> Steps:
    """The steps of a run over `train_size` samples. Methods that need `full_batches` (NT-Xent's negatives) drop
    an epoch's short last batch; so does every run across ranks (each needs a share of every batch) and one
    whose last batch would hold a single sample (batch norm cannot train on it)."""
    short_last = train_size > batch_size and train_size % batch_size == 1
    drop_last = full_batches or short_last or ranks > 1
    per_epoch = num_batches(train_size, batch_size, drop_last)
    if per_epoch == 0:
        raise UsageError(f"data.batch_size={batch_size} is larger than the {train_size} training samples; lower it")
    return Steps(per_epoch, int(min(epochs * per_epoch, max_steps or math.inf)), drop_last)


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


def global_mean(total: torch.Tensor, count: int) -> float:
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
    val: Samples | None,
    settings: Settings,
    *,
    save: Callable[[dict[str, Any], dict[str, Any], dict[str, Any] | None, bool], None],
    reporter: Reporter,
    resume: Checkpoint | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> FitResult:
    """Train on `pipeline`'s batches for `settings.steps`, validating every `val_every` epochs.

    `save(weights, training, row, is_best)` persists a checkpoint: at every epoch end (with that epoch's
    metrics `row`), every `checkpoint_every` steps and when `should_stop()` turns true (with `row=None`).
    `weights` are the network's for use (the weight average, if kept); `training` is what resuming needs.
    `resume` is a checkpoint written from those: training continues at its exact batch, with its RNG.
    Call `objective.prepare()` first, on the starting weights (a resumed run prepares as its first start did).
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
        self.per_epoch, self.steps = settings.steps.per_epoch, settings.steps.total
        self.half = half_precision(settings.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "16")
        self.pos = Position(lr=optimizer.param_groups[-1]["lr"])
        self.average = WeightAverage(model, settings.ema_decay) if settings.ema_decay else None
        self.train_mode, self.after_step = hook(objective, "train_mode"), hook(objective, "after_step")

    def restore(self, checkpoint: Checkpoint) -> None:
        training = checkpoint.training
        self.model.load_state_dict(training.get("trained_model", checkpoint.model))
        if self.average is not None:
            self.average.network.load_state_dict(checkpoint.model)
            self.average.updates = training["averaged_steps"]
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        self.scaler.load_state_dict(training.get("scaler", {}))
        self.objective.load_state_dict(training.get("objective", {}))
        restore_rng(training["rng"], self.pipeline)
        self.pos = Position(**training["position"])

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(weights, training state) of a checkpoint. The weights are what evaluation, export and fine-tuning
        use: the weight average when there is one (the trained weights then go with the training state)."""
        averaged = {} if self.average is None else {"trained_model": self.model.state_dict(), "averaged_steps": self.average.updates}
        weights = (self.model if self.average is None else self.average.network).state_dict()
        training = {
            **averaged,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
            "rng": rng_state(self.pipeline),
            "position": asdict(self.pos),
        }
        return weights, training

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
        self.reporter.start(self.steps, self.objective.description)
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
                if self.pos.early_stopped_at is not None:
                    break
                if self.pos.step < self.steps and distributed.any_rank(self.should_stop(), self.device):
                    return FitResult(self.pos, stopped=True)
        finally:
            self.reporter.finish()
        return FitResult(self.pos, images / max(time.perf_counter() - started, 1e-9))

    def epoch(self, epoch: int) -> int | None:
        """Train the rest of `epoch`; the number of samples it trained on (all ranks), or None if stopped."""
        pos, settings = self.pos, self.settings
        self.train_mode(self.model)
        running = torch.tensor(pos.epoch_loss_sum, device=self.device)
        epoch_start = window_start = time.perf_counter()
        first_images, window_images = pos.epoch_images, 0
        for batch in self.pipeline.batches(epoch, start_batch=pos.batch_in_epoch):
            running += self.step(batch)
            window_images += len(batch)
            if pos.step % settings.log_every == 0 or pos.step == self.steps:
                value = global_mean(running, pos.epoch_images)
                _check_finite(value, f"at step {pos.step}")
                rate = self.ranks.size * window_images / max(time.perf_counter() - window_start, 1e-9)
                self.reporter.progress(pos.step, {"loss": value, "lr": pos.lr, "samples_per_s": rate})
                window_start, window_images = time.perf_counter(), 0
            if pos.step >= self.steps:
                break
            if self.validates_inside_epoch():
                self.validate_inside_epoch(epoch, running)
                if pos.early_stopped_at is not None:
                    return self.ranks.size * (pos.epoch_images - first_images)
            stopping = self.stop_requested()
            if stopping or (settings.checkpoint_every and pos.step % settings.checkpoint_every == 0):
                pos.epoch_loss_sum = distributed.all_sum(running).item() / self.ranks.size  # restores on every rank
                _check_finite(pos.epoch_loss_sum, f"before step {pos.step}'s checkpoint")
                self.save_checked(None, False)
                if stopping:
                    return None
        images = self.ranks.size * (pos.epoch_images - first_images)
        self.end_epoch(epoch, running, images, time.perf_counter() - epoch_start)
        return images

    def save_checked(self, row: dict[str, Any] | None, is_best: bool) -> None:
        """Checkpoint, unless a step made a weight or a batch-norm statistic non-finite with a finite loss (a huge
        learning rate): the last checkpoint stays the last good one."""
        stop = self.settings.on_nan == "stop"  # `skip` goes on past bad steps, as it says
        if stop and not all(bool(torch.isfinite(v).all()) for v in self.model.state_dict().values() if v.is_floating_point()):
            raise RunFailed(
                f"weights became non-finite before step {self.pos.step}'s checkpoint; lower optimizer.lr or set train.grad_clip_norm "
                "(train.on_nan=skip skips only steps whose loss is not finite)"
            )
        self.save(*self.state(), row, is_best)

    def step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step; the batch's summed loss (zero for a skipped step)."""
        with torch.autocast(self.device.type, dtype=self.half, enabled=self.half is not None):
            loss = self.objective.loss(batch, self.pos.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.pos.lr = self.optimizer.param_groups[-1]["lr"]
        skip = self.settings.on_nan == "skip" and distributed.any_rank(not torch.isfinite(loss), self.device)  # a sync, only then
        if skip:
            self.pos.skipped_steps += 1
        else:
            self.scaler.scale(loss).backward()
            if self.settings.grad_clip_norm is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op without a scaler)
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.pos.epoch_images += len(batch)
            if self.average is not None:
                self.average.update()
            self.after_step(self.pos.step)
        self.advance_schedule()
        self.pos.step += 1
        self.pos.batch_in_epoch += 1
        self.anneal()
        return torch.zeros((), device=self.device) if skip else loss.detach() * len(batch)

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
            "train_loss": global_mean(running, pos.epoch_images) if pos.epoch_images else None,
            "lr": pos.lr,  # the rate of the epoch's last step
            "samples_per_s": images / max(seconds, 1e-9),
            "epoch_time_s": round(seconds, 3),
            **self.objective.epoch_metrics(),
        }
        if pos.skipped_steps:
            row["skipped_steps"] = pos.skipped_steps
        if not complete:
            row["partial"] = True
        if row["train_loss"] is not None:
            _check_finite(row["train_loss"], f"in epoch {epoch + 1}")
        due = (epoch + 1) % self.settings.val_every == 0 or pos.step >= self.steps or self.validation_due_at_step()
        if self.has_val and due:
            row.update(self.validation())
        is_best = self.track(row)
        if complete:
            pos.epoch, pos.batch_in_epoch, pos.epoch_loss_sum, pos.epoch_images, pos.skipped_steps = epoch + 1, 0, 0.0, 0, 0
        else:
            pos.epoch_loss_sum = distributed.all_sum(running).item() / self.ranks.size
        pos.last = row
        if is_best:
            pos.best = row
        self.reporter.epoch(row)
        self.save_checked(row, is_best)

    @property
    def has_val(self) -> bool:
        return self.val is not None and len(self.val) > 0

    def validation(self) -> dict[str, float]:
        """The objective's metrics of the held-out split, scored with the weights a checkpoint saves."""
        scored = self.model if self.average is None else self.average.network
        return self.objective.validate(self.val, self.settings.eval_batch_size, scored)

    def validation_due_at_step(self) -> bool:
        """`train.val_every_steps` or early stopping's cooldown end falls on this step (epoch cadence aside)."""
        every, pos = self.settings.val_every_steps, self.pos
        return bool(every and pos.step % every == 0) or pos.step == pos.cooldown_until

    def validates_inside_epoch(self) -> bool:
        """A validation falls on this step by steps, and it is not the epoch's last (which `end_epoch` validates)."""
        return self.validation_due_at_step() and self.has_val and self.pos.batch_in_epoch < self.per_epoch

    def advance_schedule(self) -> None:
        """The schedule's rate for the next step. In a cooldown the rate it set last goes back first: a chainable
        schedule (a plugin's StepLR) computes from the current rate, and would compound the cooldown's."""
        if self.pos.cooldown_from is not None:
            for group, rate in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = rate
        self.scheduler.step()

    def anneal(self) -> None:
        """In early stopping's cooldown, scale the rate the schedule set for the next step by what is left of it."""
        pos = self.pos
        if pos.cooldown_until is None or pos.cooldown_from is None:  # set together, when patience runs out
            return
        left = max(pos.cooldown_until - pos.step, 0) / (pos.cooldown_until - pos.cooldown_from)
        for group, rate in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = rate * left

    def validate_inside_epoch(self, epoch: int, running: torch.Tensor) -> None:
        """A metrics row and checkpoint in the middle of an epoch (its `epoch` a fraction), as `end_epoch` writes them."""
        pos = self.pos
        pos.epoch_loss_sum = distributed.all_sum(running).item() / self.ranks.size
        row: dict[str, Any] = {
            "epoch": round(epoch + pos.batch_in_epoch / self.per_epoch, 4),
            "step": pos.step,
            "train_loss": global_mean(running, pos.epoch_images) if pos.epoch_images else None,
            "lr": pos.lr,
            **self.validation(),
        }
        self.train_mode(self.model)  # validation left it in eval mode
        is_best = self.track(row)
        pos.last = row
        if is_best:
            pos.best = row
        self.reporter.epoch(row)
        self.save_checked(row, is_best)

    def check_watched(self, row: dict[str, Any]) -> None:
        """What early stopping and the schedule watch must be in a validation row: a method or task that declares a
        metric and gives another fails loudly."""
        stop, schedule = self.settings.early_stop, self.settings.schedule_metric
        for where, metric in (("train.early_stop.metric", stop.metric if stop else None), ("scheduler", schedule[0] if schedule else None)):
            if metric is not None and metric not in row:
                raise RunFailed(
                    f"{where}: validation gave {', '.join(k for k in row if k.startswith('val_'))}, not '{metric}', which the "
                    "method or task declares among its validation_metrics; fix its declaration"
                )

    def track(self, row: dict[str, Any]) -> bool:
        """Whether `row` is the best so far (every row is, without a held-out split); with `train.early_stop`, count the
        validations since its metric last improved, and mark the step training stops at once patience runs out."""
        pos, stop = self.pos, self.settings.early_stop
        selection = self.objective.selection
        is_best = (not self.has_val) or (selection.metric in row and selection.better(row, pos.best))
        validated = any(key.startswith("val_") for key in row)
        if validated:
            self.check_watched(row)
        if self.settings.schedule_metric is not None and validated:
            metric, higher_is_better = self.settings.schedule_metric
            self.scheduler.observe(float(row[metric]), higher_is_better)
        if stop is not None and validated:
            self.count_patience(stop, float(row[stop.metric]), row)
        return is_best

    def count_patience(self, stop: EarlyStop, value: float, row: dict[str, Any]) -> None:
        """Early stopping's count after a validation: once patience runs out, stop here, or anneal first (`cooldown`)
        and stop at the cooldown's end, which is validated whatever the cadence."""
        pos = self.pos
        if pos.cooldown_until is not None:  # annealing: patience is spent
            if pos.step >= pos.cooldown_until and pos.step < self.steps:
                pos.early_stopped_at = pos.step
                row["early_stopped"] = True
            self.anneal()  # a plateau schedule's cut may have just set the rate again
            return
        if stop.improves(value, pos.early_stop_best):
            pos.early_stop_best, pos.stale_validations = value, 0
        else:
            pos.stale_validations += 1
        if pos.stale_validations < stop.patience or pos.step >= self.steps:
            return
        if stop.cooldown:
            pos.cooldown_from = pos.step
            pos.cooldown_until = min(pos.step + max(math.ceil(stop.cooldown * pos.step), 1), self.steps)
            row["cooldown_until"] = pos.cooldown_until
        else:
            pos.early_stopped_at = pos.step
            row["early_stopped"] = True


__all__ = [
    "EarlyStop",
    "FitResult",
    "Objective",
    "Position",
    "Reporter",
    "Selection",
    "Settings",
    "SilentReporter",
    "Steps",
    "fit",
    "hook",
    "pick_device",
    "plan_steps",
]
