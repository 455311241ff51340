"""The `pretrain` and `finetune` recipes: config -> `build.build_training` -> engine -> runs/<id>/."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferctl import allocator, build, checkpoints, plots
from transferctl.build import Training
from transferctl.checkpoints import Checkpoint
from transferctl.config import Config, DataConfig, apply_overrides, component_name, load_config, merge, read_yaml, value_at
from transferctl.distributed import all_sum, barrier, world
from transferctl.engine import Reporter, SilentReporter, fit
from transferctl.engine.signals import StopOnSignal
from transferctl.engine.train import Position, hook
from transferctl.errors import ConfigError, Interrupted, RunFailed, UsageError
from transferctl.registry import METHODS
from transferctl.runs import DEFAULT_RUNS_DIR, Run, checkpoint_name, create_run, read_trained_run, recording
from transferctl.tasks.base import Task
from transferctl.trackers import tracking


@dataclass
class RunResult:
    """What a command reports: the run, its status and flat metrics."""

    run_id: str
    run_dir: Path
    status: str
    metrics: dict[str, Any]
    parent: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "status": self.status,
            "parent": self.parent,
            "metrics": self.metrics,
            **self.extra,
        }


def recipe_path(name: str) -> Path:
    """A YAML recipe shipped inside the package (used when no -c is given), or a recipe file by its path."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    return Path(str(resources.files("transferctl.recipes") / f"{name}.yaml"))


def task_recipe(task: str | None) -> dict[str, Any]:
    """The fine-tune recipe a task starts from (`Task.recipe`; classification's is `recipes/finetune.yaml`), under the
    config and overrides. A task without one (or a name that is not a registered task) starts from the defaults."""
    from transferctl.components import load_components
    from transferctl.registry import TASKS

    load_components()
    name = task or METHODS.get("finetune").fn.default_task
    recipe = TASKS.get(name).fn.recipe if name in TASKS else None
    return read_yaml(recipe_path(recipe)) if recipe else {"method": "finetune"}


# --------------------------------------------------------------------------- pretrain


def pretrain(
    config: str | Path | Config,
    overrides: list[str] | None = None,
    *,
    runs_dir: Path = DEFAULT_RUNS_DIR,
    reporter: Reporter | None = None,
) -> RunResult:
    """Pretrain an encoder (with any method that `pretrain` runs: simclr, supervised, ...) and write a new run."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides, command="pretrain")
    command = METHODS.get(cfg.method.name).fn.command
    if command != "pretrain":
        raise ConfigError(f"method: '{cfg.method.name}' is run by `transferctl {command}`, not `transferctl pretrain`")
    return train_run(cfg, runs_dir=runs_dir, command="pretrain", reporter=reporter)


# --------------------------------------------------------------------------- finetune


def finetune_config(
    source: str | None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    runs_dir: Path = DEFAULT_RUNS_DIR,
) -> Config:
    """The fine-tune config: the shipped recipe (or `config`), the source run's encoder and data set, overrides.

    Without a source the encoder starts from random weights: the from-scratch baseline.
    """
    if source is None and config is None:
        raise UsageError("finetune needs --from RUN (a pretraining run) or -c CONFIG (to train from scratch)")
    user = read_yaml(config) if config is not None else {}
    asked = apply_overrides(user, list(overrides or []))  # what the file and the command line ask for
    base = task_recipe(component_name(asked.get("task")))
    notes = []
    if source is not None:
        record = read_trained_run(source, runs_dir)
        src = record.config
        _check_named_encoder(src["model"]["name"], overrides)
        recipe_model = user.pop("model", None)
        if _names_another_encoder(src["model"], recipe_model):
            notes.append(f"model: the recipe's model section gives way to the source run's encoder ('{src['model']['name']}')")
        inherited_data = _inherited_data(src["data"], value_at(asked, "data", "name"))
        base["model"] = {k: v for k, v in src["model"].items() if k != "weights"}  # the encoder comes from the source run
        base["data"] = {**inherited_data, **base.get("data", {})}
        base["train"] = {**base.get("train", {}), "seed": src["train"]["seed"], "device": src["train"]["device"]}
        base["finetune"] = {**base.get("finetune", {}), "source": str(record.path.resolve())}
    merged = merge(base, user)
    try:
        cfg = load_config(None, overrides, base=merged, command="finetune")
    except ConfigError as exc:  # attribute errors to the user's file, when there is one
        message = str(exc)
        if config is not None and message.startswith("config: "):
            message = f"{config}: " + message.removeprefix("config: ")
        raise ConfigError(message) from None
    cfg.notes[:0] = notes
    return cfg


def _names_another_encoder(encoder: dict[str, Any], section: Any) -> bool:
    """Whether a recipe's model section names another encoder than the source run's (its name, an option, weights)."""
    if section is None:
        return False
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict):
        raise ConfigError(f"model: expected a section (name: ... and options), got {section!r}")
    return any(encoder.get(key) != value for key, value in section.items())


def _check_named_encoder(encoder: str, overrides: list[str] | None) -> None:
    """A fine-tune keeps its source run's encoder: a model named on the command line must be that one."""
    named = component_name(apply_overrides({}, list(overrides or [])).get("model"))
    if named is not None and named != encoder:
        raise ConfigError(
            f"model.name={named!r} on the command line differs from the source run's encoder ({encoder!r}); a fine-tune "
            f"--from RUN keeps RUN's encoder: drop it, or fine-tune from a run of {named!r}"
        )


NOT_INHERITED = ("batch_size", "labels_per_class", "labeled_samples", "augment", "eval_batch_size")


def _inherited_data(source_data: dict[str, Any], named: str | None) -> dict[str, Any]:
    """What a fine-tune takes from its source run's data section: the data set and its options, unless the config
    names another data set (a segmentation or regression set made from the same images), which then keeps only
    where data lives and how it is read."""
    kept = {k: v for k, v in source_data.items() if k not in NOT_INHERITED}
    if named is not None and named != source_data.get("name"):
        kept = {k: v for k, v in kept.items() if k in DataConfig.model_fields and k not in ("name", "seed")}
    return kept


def finetune(
    source: str | None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    runs_dir: Path = DEFAULT_RUNS_DIR,
    reporter: Reporter | None = None,
) -> RunResult:
    """Fine-tune (or linear-probe) a pretrained encoder with a new task head (a classifier by default); a new run."""
    cfg = finetune_config(source, config, overrides, runs_dir=runs_dir)
    return train_run(cfg, runs_dir=runs_dir, command="finetune", reporter=reporter)


def train_run(cfg: Config, *, runs_dir: Path, command: str, reporter: Reporter | None = None) -> RunResult:
    """Train `cfg` into a new run directory; the run records success, failure or interruption."""
    training = build.build_training(cfg)
    reporter = reporter or SilentReporter()
    parent = Path(cfg.finetune.source).name if cfg.finetune.source else None
    environment = {"device": str(training.device), "seed": cfg.train.seed, "data_root": str(training.data_root)}
    run = create_run(runs_dir, f"{cfg.method.name}-{cfg.data.name}", cfg.to_dict(), parent, command, environment)
    run.log(
        f"{command} {cfg.method.name} on {cfg.data.name}: {len(training.train)} train / {len(training.val)} val samples, "
        f"device {training.device}"
    )
    with tracking(run, cfg, reporter) as reporter, recording(run, command) as outcome:
        outcome["metrics"] = run_training(training, run, command, reporter)
    return RunResult(run.id, run.path, "completed", run.summary["metrics"], parent)


def run_training(t: Training, run: Run, command: str, reporter: Reporter, resume_from: Checkpoint | None = None) -> dict[str, Any]:
    """Fit a built training run into `run`: checkpoints, metrics rows, plots; its final metrics."""
    cfg = t.cfg
    t.objective.prepare()  # passes over the data the loss needs, on the starting weights
    run.update_summary(key_metric=f"best_{t.objective.selection.metric}")  # what `runs ls` sums the run up by
    threads = build.training_threads(cfg, t.pipeline, t.device)
    run.log(f"pipeline {type(t.pipeline).__name__}, {threads} CPU threads")
    t.pipeline.log = run.log  # what it did to samples (stream: each one it could not read, by name)
    for note in t.notes:
        run.log(f"note: {note}")
        reporter.note(note)
    config = cfg.to_dict()
    # What evaluate and export need to read data as the model was trained, whatever the test split holds.
    names = {"target_names": list(t.train.target_names)} if t.train.target_names else {}  # values: what each one is
    data_info = {"classes": list(t.train.classes), **names, **t.modality.fitted_state(t.train)}
    for name, content in t.modality.companion_files(data_info).items():  # text: tokenizer.json
        run.write_file(name, content)
    task_state = t.task_state
    network = build.network_record(t.method, t.train)  # what rebuilding the network needs without the data (format 3)

    def save(weights: dict[str, Any], training: dict[str, Any], row: dict[str, Any] | None, is_best: bool) -> None:
        position = training["position"]
        common = {"config": config, "data": data_info, "task": task_state, "network": network}
        common.update(epoch=position["epoch"], step=position["step"])
        if row is not None:
            run.log_metrics(row)
            run.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if is_best:  # before last.pt, whose position.best must never name weights best.pt lacks
            run.save_checkpoint("best", Checkpoint(model=weights, metrics=row, **common))
        state = {**training, "world_size": world().size, "device_type": t.device.type}
        run.save_checkpoint("last", Checkpoint(model=weights, training=state, **common))

    # the first batch of a fresh run is kept for the method's plots: the inputs as the model saw them
    keep_first = t.method.plots_first_batch and resume_from is None and run.writer and plots.available()
    pipeline = plots.FirstBatch(t.pipeline) if keep_first else t.pipeline

    if t.device.type == "cpu":
        allocator.keep_freed_memory()  # with TRANSFERCTL_GLIBC_TUNING=1: activations reused between steps
    with StopOnSignal() as stop, build.cpu_threads(threads):
        try:
            result = fit(
                t.objective,
                t.network,
                t.optimizer,
                t.scheduler,
                pipeline,
                t.val,
                t.settings,
                save=save,
                reporter=reporter,
                resume=resume_from,
                should_stop=stop.requested,
            )
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise RunFailed(
                f"out of memory ({type(exc).__name__}); lower data.batch_size (now {cfg.data.batch_size}) "
                f"or data.eval_batch_size (now {cfg.data.eval_batch_size})"
            ) from None
    if result.stopped:  # by a signal here or on another rank
        signum = stop.signum or signal.SIGTERM
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} at step {result.position.step} of {t.steps.total}, checkpoint saved; "
            f"continue with `transferctl {command} --resume {run.path}`",
            signum,
        )
    position = result.position
    stopping = {"early_stopped_at": position.early_stopped_at, "best_step": position.best.get("step")}
    if position.cooldown_from is not None:
        stopping["cooldown_from"] = position.cooldown_from
    run.update_summary(**stopping, parameters=t.network.parameter_counts())
    if result.stopped_early:
        annealed = f", then the rate annealed to zero from step {position.cooldown_from}" if position.cooldown_from is not None else ""
        message = (
            f"stopped early at step {position.early_stopped_at} of {t.steps.total}: {t.settings.early_stop.metric} "
            f"did not improve for {t.settings.early_stop.patience} validations{annealed}; best.pt is from step {stopping['best_step']}"
        )
        run.log(message)
        reporter.note(message)
    task = t.method.task
    if task is not None and task.fits_after_training:
        fit_task_after_training(t, task, run)
    report_after_training(t, run, reporter)
    plots.write_curves(run)
    if run.writer and plots.available():
        t.method.write_plots(run, t, pipeline.inputs if isinstance(pipeline, plots.FirstBatch) else None)
    metrics = final_metrics(result.position, result.samples_per_s)
    for key, count in t.pipeline.metrics().items():  # every rank read its own slices
        metrics[key] = int(all_sum(torch.tensor(count, device=t.device)).item())
    if t.device.type == "cuda":
        metrics["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(t.device) / 2**20, 1)
    return metrics


def fit_task_after_training(t: Training, task: Task, run: Run) -> None:
    """The task's state fitted with each saved checkpoint's weights on the held-out split (`Task.fit_after_training`:
    per-class thresholds, ...), merged into that checkpoint's task state; the network's own weights are kept."""
    trained = {k: v.clone() for k, v in t.network.state_dict().items()}
    barrier()  # every rank reads the checkpoints rank 0 wrote (and fits with them: `predict` is collective)
    for name in ("best", "last"):
        path = run.checkpoint_dir / f"{name}.pt"
        if not path.is_file():
            continue
        saved = checkpoints.read(path)
        t.network.load_state_dict(saved.model)
        fitted = task.fit_after_training(t.network.eval(), t.val, t.cfg.data.eval_batch_size)
        run.log(f"{name}.pt: the task fitted {', '.join(sorted(fitted)) or 'nothing'} on the held-out split")
        run.save_checkpoint(name, replace(saved, task={**saved.task, **fitted}))
    t.network.load_state_dict(trained)


def report_after_training(t: Training, run: Run, reporter: Reporter) -> None:
    """What the objective says about the finished run (`after_training`: the labels-only comparison of a fine-tune
    with pseudo-labels), with the weights evaluation reads, into summary.json; its warning shown and logged."""
    after, trained = hook(t.objective, "after_training"), {}

    def network() -> nn.Module:  # read only when the objective asks for it
        barrier()  # every rank reads the checkpoint rank 0 wrote
        trained.update({k: v.clone() for k, v in t.network.state_dict().items()})
        name = checkpoint_name(t.cfg.eval.checkpoint, run.summary)
        t.network.load_state_dict(checkpoints.read(run.checkpoint_dir / f"{name}.pt").model)
        return t.network.eval()

    try:
        said = after(network)
    finally:
        if trained:
            t.network.load_state_dict(trained)
    if not said:
        return
    run.update_summary(**said)
    for entry in said.values():
        warning = entry.get("warning") if isinstance(entry, dict) else None
        if warning:
            run.log(f"warning: {warning}")
            reporter.note(f"warning: {warning}")


def final_metrics(position: Position, samples_per_s: float) -> dict[str, Any]:
    """The run's flat metrics: its last row, its throughput and its best validation scores."""
    metrics = {k: v for k, v in position.last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics["samples_per_s"] = round(samples_per_s, 1)
    for key, value in position.best.items():
        if key.startswith("val_"):
            metrics[f"best_{key}"] = value
    return metrics
