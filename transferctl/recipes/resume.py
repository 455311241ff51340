"""`--resume`: continue an interrupted or failed run, or extend a finished one, in place and exactly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from transferctl.build import build_training, modality_of_config
from transferctl.checkpoints import Checkpoint
from transferctl.config import Config, flatten, load_config
from transferctl.distributed import world
from transferctl.engine import SilentReporter
from transferctl.engine.train import Position, Reporter
from transferctl.errors import ConfigError, UsageError
from transferctl.recipes.training import RunResult, final_metrics, run_training
from transferctl.runs import DEFAULT_RUNS_DIR, load_checkpoint, read_run, recording, reopen_run
from transferctl.trackers import tracking

# Keys a resume may change: they lengthen the run or change where and how verbosely it runs, not what it computes.
SAFE_ON_RESUME = (
    "train.epochs",
    "train.max_steps",
    "train.device",
    "train.log_every",
    "train.checkpoint_every",
    "train.val_every",
    "train.on_nan",
    "train.tensorboard",
    "train.loggers",
)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every value that differs. Keys the old config lacks are defaults a
    newer transferctl added; they are not changes."""
    before, after = flatten(old), flatten(new)
    return {k: (before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys()) if k in before and before.get(k) != after.get(k)}


def resume(
    ref: str,
    overrides: list[str] | None = None,
    *,
    command: str,
    runs_dir: Path = DEFAULT_RUNS_DIR,
    reporter: Reporter | None = None,
) -> RunResult:
    """Continue an interrupted or failed run (or extend a finished one) from its last checkpoint, in place.
    A run killed before its first checkpoint starts again from step 0, in place."""
    record = read_run(ref, runs_dir, "--resume")
    if record.summary.get("command") != command:
        raise UsageError(f"--resume {ref}: the run was made by `transferctl {record.summary.get('command')}`; resume it with that command")
    cfg = load_config(None, overrides, base=record.config)
    # against the old config with today's defaults filled in, so a key it predates still counts as changed
    changes = config_changes(load_config(None, [], base=record.config).to_dict(), cfg.to_dict())
    refused = {k: v for k, v in changes.items() if k not in SAFE_ON_RESUME}
    if refused:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(f"--resume {ref}: cannot change {diff}; on resume only {', '.join(SAFE_ON_RESUME)} may change")
    run = reopen_run(record)  # the lock comes first: nobody else writes the run while we read it
    last = record.checkpoint_path("last")
    checkpoint = load_checkpoint(last) if last.is_file() else None
    training = build_training(_reading_as_the_run(cfg, record.path), load_weights=checkpoint is None)
    if checkpoint is not None:
        _check_same_world(ref, checkpoint, training.device)
    steps = training.steps.total
    position = Position(**checkpoint.position) if checkpoint else None
    done = position.step if position else 0
    if position is not None and position.early_stopped_at is not None:
        raise UsageError(
            f"--resume {ref}: the run stopped early at step {position.early_stopped_at} (train.early_stop: no improvement for "
            f"{cfg.train.early_stop.patience} validations); nothing to resume. Fine-tune again without train.early_stop to train on"
        )
    if position is not None and position.cooldown_until is not None and done >= position.cooldown_until:
        raise UsageError(
            f"--resume {ref}: the run's learning rate annealed to zero at step {position.cooldown_until} (train.early_stop.cooldown, "
            "cut short by its budget); nothing to resume. Fine-tune it (--from) to train on"
        )
    if done >= steps:
        if record.summary.get("status") == "completed":
            raise UsageError(
                f"--resume {ref}: the run already finished its {steps} steps; nothing to resume "
                f"(to extend it, raise train.epochs or train.max_steps)"
            )
        # killed after its last checkpoint but before its summary was closed: close it now
        run.update_summary(status="completed", error=None, metrics=final_metrics(position, 0.0))
        return RunResult(run.id, run.path, "completed", run.summary["metrics"], run.summary.get("parent"))
    run.keep_metrics_through(position.step if position else 0)
    entry = {"at_step": done, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": {k: list(v) for k, v in changes.items()}}
    run.update_summary(status="running", error=None, resumes=[*run.summary.get("resumes", []), entry])
    run.write_config(cfg.to_dict())
    run.log(f"resume at step {done} of {steps}" + (f", changed {', '.join(changes)}" if changes else ""))
    with tracking(run, cfg, reporter or SilentReporter(), resume_step=done) as reporter, recording(run, command) as outcome:
        outcome["metrics"] = run_training(training, run, command, reporter, resume_from=checkpoint)
    return RunResult(run.id, run.path, "completed", run.summary["metrics"], run.summary.get("parent"))


def _reading_as_the_run(cfg: Config, run_dir: Path) -> Config:
    """The config a resume builds with: its data read with the run's own files where the modality keeps them
    (`Modality.resumed_data_options`); the run's config keeps what the user wrote."""
    own = modality_of_config(cfg).resumed_data_options(cfg.data.options, run_dir)
    if not own:
        return cfg
    building = cfg.model_copy(deep=True)
    for key, value in own.items():
        setattr(building.data, key, value)
    return building


def _check_same_world(ref: str, checkpoint: Checkpoint, device: torch.device) -> None:
    """An exact continuation needs the same number of processes and the same kind of device
    (the augmentation generator's state belongs to its device)."""
    saved_world, saved_device = checkpoint.trained_by()
    saved_device = saved_device or device.type
    if saved_world != world().size:
        raise UsageError(
            f"--resume {ref}: the run was trained by {saved_world} process(es), not {world().size}; resume it with the same torchrun size"
        )
    if saved_device != device.type:
        raise UsageError(
            f"--resume {ref}: the run was trained on {saved_device}, not {device.type}; resume it on {saved_device} (train.device)"
        )
