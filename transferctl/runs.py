"""Run directories: ids, creation, atomic writes, metrics, checkpoints and resolving `--from`.
(torch is imported where checkpoints are read or written, so the CLI starts fast.)

    runs/<id>/
      config.yaml        the resolved config (every default filled in)
      summary.json       status (running|completed|failed|interrupted; a running run whose process died lists as crashed),
                         metrics, timings, parent
      environment.json   package versions, git commit, device, seed, platform
      metrics.jsonl      one JSON object per epoch (or per evaluation)
      metrics.csv        the same rows as a table: the union of their keys as columns
      log.txt            the plain-text log of the run, tracebacks included
      checkpoints/       last.pt and best.pt (weights, fitted state, and in last.pt what resuming needs: checkpoints.py)
      *.png              plots, with matplotlib (curves, confusion matrix, SimCLR view pairs)
      tensorboard/       event files, with train.tensorboard (append-only, written by TensorBoard's writer)

Every file is written atomically (temporary file in the same folder, fsync, rename), so a crash
never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import platform
import secrets
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import transferctl
from transferctl import checkpoints
from transferctl.checkpoints import Checkpoint
from transferctl.distributed import broadcast, world
from transferctl.errors import Interrupted, RunFailed, UsageError, did_you_mean
from transferctl.fileio import atomic_write_bytes
from transferctl.processes import hold_for_life

DEFAULT_RUNS_DIR = Path("runs")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def new_run_id(label: str) -> str:
    """Readable and unique: '20261128-161500-simclr-mnist-3fa2'."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{label}-{secrets.token_hex(2)}"


@dataclass
class Run:
    """A run directory being written by this process."""

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    writer: bool = True  # False on ranks other than 0: they train but write nothing
    _lock: Any = field(default=None, repr=False)

    def lock(self) -> None:
        """Hold an exclusive lock on the run for this process's life: one writer per run, ever.
        The OS drops it when the process dies, however it dies."""
        if not self.writer:
            return
        handle = open(self.path / ".lock", "a+")  # noqa: SIM115  (held open for the process's life: that is the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UsageError(f"run {self.id} is being written by another transferctl process; wait for it or stop it") from None
        self._lock = handle
        hold_for_life(handle)  # a forked DataLoader worker closes its copy (processes.py)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def _write(self, name: str, data: bytes) -> None:
        if self.writer:
            atomic_write_bytes(self.path / name, data)

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def write_file(self, name: str, data: bytes) -> None:
        """Any other file of the run (a plot, ...), atomically."""
        self._write(name, data)

    def write_json(self, name: str, obj: Any) -> None:
        self._write(name, _json_bytes(obj))

    def write_config(self, config: dict[str, Any]) -> None:
        self._write("config.yaml", yaml.safe_dump(config, sort_keys=False).encode())

    def update_summary(self, **fields: Any) -> None:
        self.summary.update(fields)
        self.write_json("summary.json", self.summary)

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Add one row to metrics.jsonl and metrics.csv (each rewritten whole, atomically: they are small)."""
        self.metrics.append(row)
        self._write_metrics()

    def keep_metrics_through(self, step: int) -> None:
        """Drop the rows after `step` (the checkpoint's) and a partial epoch's row: training redoes them."""
        self.metrics = [r for r in self.metrics if r.get("step", 0) <= step and not r.get("partial")]
        self._write_metrics()

    def _write_metrics(self) -> None:
        self._write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.metrics).encode())
        self._write("metrics.csv", metrics_csv(self.metrics).encode())

    def log(self, line: str) -> None:
        if not self.writer:
            return
        with open(self.log_path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    def save_checkpoint(self, name: str, checkpoint: Checkpoint) -> Path:
        """checkpoints/<name>.pt, in the current checkpoint format (`checkpoints.py`)."""
        path = self.checkpoint_dir / f"{name}.pt"
        if self.writer:
            self.checkpoint_dir.mkdir(exist_ok=True)
            atomic_write_bytes(path, checkpoints.to_bytes(checkpoint))
        return path


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV: the union of their keys as columns, in first-seen order; a key a row lacks is empty.
    Lists and mappings are JSON text, so every cell is one field."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def has_live_writer(run_dir: Path) -> bool:
    """Whether a process still holds the run's writer lock. A run whose summary says `running` but whose
    lock is free was killed before it could record how it ended (SIGKILL, out of memory, power loss).
    When the lock cannot be probed (no permission, a file system without flock) the writer counts as alive."""
    try:
        handle = open(run_dir / ".lock")  # noqa: SIM115  (closed by the `with` below, once it is known to exist)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: another process holds it
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def create_run(
    runs_dir: Path, label: str, config: dict[str, Any], parent: str | None, command: str, run_environment: dict[str, Any] | None = None
) -> Run:
    """Make a fresh run directory (never reusing one) and write its config and first summary.

    Across ranks, rank 0 makes it and every other rank gets the same path, as a run that writes nothing.
    """
    if not world().is_main:
        path = broadcast(None)
        if path.startswith("error: "):
            raise UsageError(path.removeprefix("error: "))
        return Run(Path(path), writer=False)
    try:
        run = _create_run(runs_dir, label, config, parent, command, run_environment)
    except UsageError as exc:
        broadcast(f"error: {exc}")
        raise
    broadcast(str(run.path))
    return run


def _create_run(
    runs_dir: Path, label: str, config: dict[str, Any], parent: str | None, command: str, run_environment: dict[str, Any] | None = None
) -> Run:
    """Make a fresh run directory (never reusing one) and write its config and first summary."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"runs root {runs_dir}: cannot create it ({exc.strerror}); pass a writable --runs-dir") from None
    if not os.access(runs_dir, os.W_OK):
        raise UsageError(f"runs root {runs_dir}: not writable; pass a writable --runs-dir")
    for _ in range(100):
        path = runs_dir / new_run_id(label)
        try:
            path.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise UsageError(f"runs root {runs_dir}: could not find a free run id")
    run = Run(path)
    run.lock()
    run.write_config(config)
    run.write_json("environment.json", {**environment(), **(run_environment or {})})
    run.update_summary(
        run_id=run.id,
        command=command,
        status="running",
        parent=parent,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        finished_at=None,
        duration_s=None,
        metrics={},
        error=None,
    )
    return run


@contextmanager
def recording(run: Run, command: str) -> Iterator[dict[str, Any]]:
    """Mark the run completed, failed (with the reason, traceback in the log) or interrupted.

    The body puts its final metrics into the yielded dict.
    """
    started = time.perf_counter()
    outcome: dict[str, Any] = {}

    def close(status: str, error: str | None = None) -> None:
        run.update_summary(
            status=status,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            duration_s=round(time.perf_counter() - started, 3),
            metrics=outcome.get("metrics", {}),
            error=error,
        )

    try:
        yield outcome
    except KeyboardInterrupt:
        close("interrupted", "interrupted by the user")
        raise
    except Interrupted as exc:
        close("interrupted", str(exc))
        raise
    except Exception as exc:
        run.log(traceback.format_exc())
        reason = str(exc) if isinstance(exc, (RunFailed, UsageError)) else f"{type(exc).__name__}: {exc}"
        close("failed", reason)
        raise RunFailed(f"{command} failed: {reason} (log: {run.log_path})") from None
    close("completed")


def reopen_run(record: RunRecord) -> Run:
    """Lock an existing run to continue it (across ranks, rank 0 locks and tells the others how it went)."""
    run = Run(record.path, summary=dict(record.summary), writer=world().is_main)
    if not world().is_main:
        error = broadcast(None)
        if error:
            raise UsageError(error)
        return run
    try:
        run.lock()
    except UsageError as exc:
        broadcast(str(exc))
        raise
    broadcast("")
    rows_path = record.path / "metrics.jsonl"
    run.metrics = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()] if rows_path.exists() else []
    return run


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(transferctl.__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    import torch
    import torchvision

    return {
        "transferctl": transferctl.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "world_size": world().size,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }


# --------------------------------------------------------------------------- reading runs


@dataclass(frozen=True)
class RunRecord:
    """A finished (or unfinished) run directory, read back."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]

    @property
    def id(self) -> str:
        return self.path.name

    def checkpoint_path(self, name: str) -> Path:
        """checkpoints/<name>.pt; `auto` (eval.checkpoint's default): best.pt for a run that stopped early (the steps
        after it are those that patience let through), else last.pt."""
        return self.path / "checkpoints" / f"{self.checkpoint_name(name)}.pt"

    def checkpoint_name(self, name: str) -> str:
        return checkpoint_name(name, self.summary)


def checkpoint_name(name: str, summary: dict[str, Any]) -> str:
    """The checkpoint `eval.checkpoint` names for a run with this summary: `auto` is best for a run that stopped early."""
    if name != "auto":
        return name
    return "best" if summary.get("early_stopped_at") is not None else "last"


def resolve_run(ref: str, runs_dir: Path, flag: str = "--from") -> Path:
    """A run directory path, or a bare run id under `runs_dir`."""
    candidates = [Path(ref)]
    if os.sep not in ref:
        candidates.append(runs_dir / ref)
    for path in candidates:
        if path.is_dir():
            if not (path / "config.yaml").is_file() or not (path / "summary.json").is_file():
                raise UsageError(f"{flag} {ref}: {path} is not a transferctl run (no config.yaml/summary.json)")
            return path
    raise UsageError(f"{flag} {ref}: no such run directory or run id under {runs_dir}{_closest_run(ref, runs_dir)}")


def _closest_run(ref: str, runs_dir: Path) -> str:
    """'; did you mean ID?' for the one run id that contains `ref` (its random suffix, say), else the closest
    id, else where to look."""
    try:
        ids = sorted(p.name for p in runs_dir.iterdir() if (p / "summary.json").is_file())
    except OSError:
        ids = []
    containing = [i for i in ids if ref and ref in i]
    if len(containing) == 1:
        return f"; did you mean '{containing[0]}'?"
    return did_you_mean(ref, ids) or f"; see `transferctl runs ls --runs-dir {runs_dir}`"


def read_run(ref: str, runs_dir: Path, flag: str = "--from") -> RunRecord:
    path = resolve_run(ref, runs_dir, flag)
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
        summary = json.loads((path / "summary.json").read_text())
    except (yaml.YAMLError, ValueError, OSError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise UsageError(f"{flag} {ref}: cannot read the run's config or summary ({exc})") from None
    if not isinstance(config, dict) or not isinstance(summary, dict):
        raise UsageError(f"{flag} {ref}: the run's config.yaml or summary.json is not a mapping; the run is damaged")
    return RunRecord(path, config, summary)


TRAINING_COMMANDS = ("pretrain", "finetune")  # the verbs whose runs hold checkpoints; each method names its own


def read_trained_run(ref: str, runs_dir: Path, flag: str = "--from") -> RunRecord:
    """A pretrain or finetune run that has written at least one checkpoint."""
    record = read_run(ref, runs_dir, flag)
    command = record.summary.get("command")
    if command not in TRAINING_COMMANDS:
        raise UsageError(f"{flag} {ref}: that is a `{command}` run; pass a pretrain or finetune run")
    if not record.checkpoint_path("last").is_file():
        status = record.summary.get("status")
        raise UsageError(f"{flag} {ref}: the run has no checkpoint yet (status: {status}); let it finish an epoch, or resume it")
    return record


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint safely, in any format this release reads; a missing or corrupt file is a usage error."""
    return checkpoints.read(path)
