"""Experiment trackers: `train.loggers: [tensorboard, mlflow, wandb]` send a run's numbers where a team already
looks at them. The run directory stays the source of truth: metrics.csv and metrics.jsonl are always written, and a
tracker that cannot be reached is one warning line, after which the run goes on without it.

Each tracker gets the resolved config (flattened to dotted keys) when training starts, the step metrics every
`train.log_every` steps (`step/loss`, `step/lr`, `step/samples_per_s`) and each metrics row's numbers (`epoch/<name>`,
at the row's step), and at the end the run's plots and summary.json as artifacts, with how the run ended.

A tracker is a registered class (`@TRACKERS.register("name", package=..., extra=...)`); `package` is what it imports,
`extra` the pip extra that installs it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferctl.errors import ConfigError, did_you_mean
from transferctl.registry import TRACKERS
from transferctl.schema import flatten

if TYPE_CHECKING:
    from transferctl.config import Config
    from transferctl.engine.train import Reporter
    from transferctl.runs import Run


class Tracker:
    """Base class of a registered tracker. Every method may raise: the run then warns once and drops the tracker."""

    def start(self, run: Run, config: dict[str, Any], resume_step: int | None) -> None:
        """Open (or, for a resumed run, reopen) the tracker's record of `run`."""

    def log(self, values: dict[str, float], step: int) -> None: ...

    def finish(self, run: Run) -> None:
        """The run's files as artifacts and how it ended (its summary's status); close."""


def wanted(cfg: Config) -> list[str]:
    """The trackers a config asks for: `train.loggers`, and TensorBoard for a stored run's `train.tensorboard: true`."""
    names = list(cfg.train.loggers)
    if cfg.train.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check(cfg: Config) -> None:
    """Unknown or uninstalled trackers fail before the run exists."""
    names = TRACKERS.names()
    for name in wanted(cfg):
        if name not in names:
            raise ConfigError(f"train.loggers: unknown logger '{name}'{did_you_mean(name, names)} (registered: {', '.join(names)})")
        meta = TRACKERS.get(name).meta
        if importlib.util.find_spec(meta["package"]) is None:
            key = f"train.loggers: {name}" if name in cfg.train.loggers else "train.tensorboard: true"
            raise ConfigError(f'{key} needs the {meta["package"]} package: pip install "transferctl[{meta["extra"]}]" (or drop it)')


def run_files(run: Run) -> list[Path]:
    """What a tracker keeps of a finished run: its plots and summary.json."""
    return [*sorted(run.path.glob("*.png")), run.path / "summary.json"]


class TrackingReporter:
    """A Reporter that forwards everything to `inner` and the same numbers to the trackers; a tracker that fails is
    reported in one line (shown and logged) and dropped."""

    def __init__(self, inner: Reporter, trackers: dict[str, Tracker], run: Run):
        self.inner, self.trackers, self.run = inner, trackers, run

    def call(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # a tracker must never take the run down with it
                del self.trackers[name]
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                message = (
                    f"warning: logger {name} failed ({type(exc).__name__}: {reason}); the run goes on without it, "
                    f"its files are in {self.run.path}"
                )
                self.run.log(message)
                self.inner.note(message)

    def start(self, total_steps: int, description: str) -> None:
        self.inner.start(total_steps, description)

    def progress(self, step: int, values: dict[str, float]) -> None:
        self.call("log", {f"step/{k}": v for k, v in values.items()}, step)
        self.inner.progress(step, values)

    def epoch(self, row: dict[str, Any]) -> None:
        numbers = {f"epoch/{k}": float(v) for k, v in row.items() if k not in ("epoch", "step") and _number(v)}
        self.call("log", numbers, int(row.get("step", 0)))
        self.inner.epoch(row)

    def note(self, message: str) -> None:
        self.inner.note(message)

    def finish(self) -> None:
        self.inner.finish()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextmanager
def tracking(run: Run, cfg: Config, reporter: Reporter, resume_step: int | None = None) -> Iterator[Reporter]:
    """The reporter a training run reports to, with the config's trackers behind it (none: `reporter` itself). Wrap it
    around `runs.recording`: on the way out the run's summary holds how it ended, which the trackers then record."""
    names = wanted(cfg) if run.writer else []
    if not names:
        yield reporter
        return
    tracked = TrackingReporter(reporter, {name: TRACKERS.build(name, {}) for name in names}, run)
    tracked.call("start", run, flatten(cfg.to_dict()), resume_step)
    try:
        yield tracked
    finally:
        tracked.call("finish", run)


# --------------------------------------------------------------------------- the trackers


@TRACKERS.register("tensorboard", package="tensorboard", extra="tensorboard")
class TensorBoard(Tracker):
    """Event files in runs/<id>/tensorboard/ (append-only, TensorBoard's own format): `tensorboard --logdir runs`."""

    def start(self, run: Run, config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run repeats the steps after its checkpoint: TensorBoard drops what it logged for them
        self.writer = SummaryWriter(log_dir=str(run.tensorboard_dir), purge_step=resume_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, run: Run) -> None:
        self.writer.close()


MLFLOW_PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value
MLFLOW_EXPERIMENT = "transferctl"


@TRACKERS.register("mlflow", package="mlflow", extra="mlflow")
class MLflow(Tracker):
    """An MLflow run per transferctl run (a resumed run continues its own): params, metrics, artifacts, status. The
    store is $MLFLOW_TRACKING_URI when set, else sqlite:///<runs-dir>/mlflow.db with artifacts in <runs-dir>/mlflow-artifacts;
    the experiment is $MLFLOW_EXPERIMENT_NAME, else `transferctl`. A remote server gets short time-outs, no long retries."""

    def start(self, run: Run, config: dict[str, Any], resume_step: int | None) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store's set-up messages are not the run's
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        runs_dir = run.path.parent.resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run.summary.get("mlflow_run_id")
        if self.run_id is None:
            experiment = self._experiment(uri, runs_dir)
            tags = {"transferctl.run_dir": str(run.path.resolve()), "transferctl.command": str(run.summary.get("command"))}
            self.run_id = self.client.create_run(experiment, run_name=run.id, tags=tags).info.run_id
            run.update_summary(mlflow_run_id=self.run_id)  # a resume logs into the same MLflow run
            params = [Param(key, str(value)[:MLFLOW_PARAM_LENGTH]) for key, value in config.items()]
            for first in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                self.client.log_batch(self.run_id, params=params[first : first + 100])
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _experiment(self, uri: str, runs_dir: Path) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        own_store = "MLFLOW_TRACKING_URI" not in os.environ
        location = (runs_dir / "mlflow-artifacts").as_uri() if own_store else None  # else the server's own default
        return self.client.create_experiment(name, artifact_location=location)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def finish(self, run: Run) -> None:
        for path in run_files(run):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(str(run.summary.get("status")), "FAILED")
        self.client.set_terminated(self.run_id, status)


@TRACKERS.register("wandb", package="wandb", extra="wandb")
class WeightsAndBiases(Tracker):
    """A Weights & Biases run per transferctl run (its id kept in the summary, so a resume continues it); project
    $WANDB_PROJECT, else `transferctl`; offline with WANDB_MODE=offline."""

    def start(self, run: Run, config: dict[str, Any], resume_step: int | None) -> None:
        import wandb

        run_id = run.summary.get("wandb_run_id") or wandb.util.generate_id()
        project = os.environ.get("WANDB_PROJECT", "transferctl")
        settings = wandb.Settings(init_timeout=30)
        self.wandb = wandb.init(
            project=project, name=run.id, id=run_id, resume="allow", dir=str(run.path), config=config, settings=settings
        )
        run.update_summary(wandb_run_id=run_id)

    def log(self, values: dict[str, float], step: int) -> None:
        self.wandb.log(values, step=step)

    def finish(self, run: Run) -> None:
        for path in run_files(run):
            if path.is_file():
                self.wandb.save(str(path), base_path=str(run.path), policy="now")
        self.wandb.finish(exit_code=0 if run.summary.get("status") == "completed" else 1)
