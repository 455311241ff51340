"""Reading runs back: `transferctl runs ls`, `runs show` and `runs diff`.

Only reads (runs.py alone writes run directories) and never imports torch, so it answers at once.
Lineage comes from what runs record: a fine-tune's and an evaluation's `parent` in summary.json,
and an export's `export_report.json` inside the exported run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from transferctl.errors import UsageError
from transferctl.runs import TRAINING_COMMANDS, RunRecord, has_live_writer, read_run
from transferctl.schema import component_name, flatten, stored_task

# The one metric that sums a run up: the one its summary names (its method's or task's), else the first found
# of these (runs of 0.1.0, runs without that metric): test scores, then validation accuracy, then losses.
KEY_METRICS = ("accuracy", "knn_accuracy", "best_val_accuracy", "val_accuracy", "best_val_loss", "val_loss", "train_loss")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


@dataclass(frozen=True)
class RunInfo:
    """One run directory as the listing sees it."""

    record: RunRecord

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def parent(self) -> str | None:
        return self.record.summary.get("parent")

    def key_metric(self) -> tuple[str, Any] | None:
        summary = self.record.summary
        metrics = summary.get("metrics") or {}
        names = [summary["key_metric"]] if isinstance(summary.get("key_metric"), str) else []
        return next(((k, metrics[k]) for k in [*names, *KEY_METRICS] if metrics.get(k) is not None), None)

    def started(self) -> float:
        """Start time in seconds since the epoch (the summary's, else the folder's)."""
        try:
            return datetime.strptime(self.record.summary["started_at"], TIME_FORMAT).timestamp()
        except (KeyError, TypeError, ValueError):
            return (self.record.path / "summary.json").stat().st_mtime

    def sort_key(self) -> tuple[float, int]:
        # started_at has whole seconds; environment.json is written once, at creation, to break ties
        env = self.record.path / "environment.json"
        return self.started(), env.stat().st_mtime_ns if env.exists() else 0

    def status(self) -> str | None:
        """The recorded status, except that a `running` run whose process is gone is `crashed`."""
        status = self.record.summary.get("status")
        if status != "running" or has_live_writer(self.record.path):
            return status
        # the run may have closed its summary between our reading it and probing the lock
        recorded = _recorded_status(self.record.path)
        return "crashed" if recorded == "running" else recorded

    def brief(self, now: float | None = None) -> dict[str, Any]:
        config, summary = self.record.config, self.record.summary
        metric = self.key_metric()
        return {
            "run_id": self.id,
            "run_dir": str(self.record.path),
            "command": summary.get("command"),
            "method": component_name(config.get("method")),
            "task": stored_task(config),
            "trains": trains(config, summary.get("command")),
            "dataset": (config.get("data") or {}).get("name"),
            "status": self.status(),
            "key_metric": {"name": metric[0], "value": metric[1]} if metric else None,
            "parent": self.parent,
            "started_at": summary.get("started_at"),
            "age_s": round((now or time.time()) - self.started(), 1),
        }


def trains(config: dict[str, Any], command: str | None) -> str | None:
    """What a run trains (or, for an evaluation, what it scored), in words: its method and task, leaving out a
    name the command already says ("simclr", "supervised classification"; a fine-tune: "classification")."""
    names = [component_name(config.get("method")), stored_task(config)]
    words = [n for n in names if isinstance(n, str) and n != command]
    return " ".join(words) or names[0]


def _recorded_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _read(path: Path) -> RunRecord | None:
    """The run at `path` as `read_run` reads it, or None when it is not a readable run."""
    try:
        return read_run(str(path), path.parent)
    except UsageError:
        return None


@dataclass(frozen=True)
class Listing:
    runs_dir: Path
    runs: list[RunInfo]  # newest first
    unreadable: list[str]  # run folders whose config or summary does not parse

    def by_id(self) -> dict[str, RunInfo]:
        return {info.id: info for info in self.runs}

    def to_json(self) -> dict[str, Any]:
        now = time.time()
        return {"runs_dir": str(self.runs_dir), "runs": [r.brief(now) for r in self.runs], "unreadable": self.unreadable}


def list_runs(runs_dir: Path) -> Listing:
    """Every run under `runs_dir`, newest first. Folders without config.yaml and summary.json are not runs."""
    if not runs_dir.is_dir():
        raise UsageError(f"runs root {runs_dir}: no such folder; pass --runs-dir where your runs are")
    runs, unreadable = [], []
    for path in sorted(runs_dir.iterdir()):
        if not (path / "config.yaml").is_file() or not (path / "summary.json").is_file():
            continue
        record = _read(path)
        if record is None:
            unreadable.append(path.name)
        else:
            runs.append(RunInfo(record))
    runs.sort(key=RunInfo.sort_key, reverse=True)
    return Listing(runs_dir, runs, unreadable)


# --------------------------------------------------------------------------- one run


def export_info(run_dir: Path) -> dict[str, Any] | None:
    """What the run's last export wrote (from its export_report.json), or None."""
    try:
        report = json.loads((run_dir / "export_report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    parity = report.get("parity") or {}
    return {
        "export_dir": report.get("export_dir"),
        "files": report.get("files", {}),
        "verified": report.get("verified"),
        "parity_passed": all(p.get("passed") for p in parity.values()) if parity else None,
    }


def _parent_of(info: RunInfo, runs: dict[str, RunInfo]) -> RunInfo | None:
    """The run's parent: by id beside it, else (a fine-tune from another folder) by its recorded source path."""
    if info.parent in runs:
        return runs[info.parent]
    source = (info.record.config.get("finetune") or {}).get("source")
    record = _read(Path(source)) if source else None
    return RunInfo(record) if record is not None and record.path.name == info.parent else None


def _ancestors(info: RunInfo, runs: dict[str, RunInfo], now: float) -> list[dict[str, Any]]:
    chain, seen, current = [], {info.id}, info
    while current.parent is not None and current.parent not in seen:
        parent = _parent_of(current, runs)
        if parent is None:
            chain.append({"run_id": current.parent, "missing": True})
            break
        chain.append(parent.brief(now))
        seen.add(parent.id)
        current = parent
    return chain


def _descendants(run_id: str, runs: dict[str, RunInfo], now: float, seen: set[str]) -> list[dict[str, Any]]:
    """Runs made from `run_id` (fine-tunes, evaluations), oldest first, each with its own."""
    children = sorted((r for r in runs.values() if r.parent == run_id and r.id not in seen), key=RunInfo.sort_key)
    seen.update(r.id for r in children)
    return [
        {**child.brief(now), "export": export_info(child.record.path), "children": _descendants(child.id, runs, now, seen)}
        for child in children
    ]


def show_run(ref: str, runs_dir: Path) -> dict[str, Any]:
    """Config, final metrics, timings and lineage (ancestors, descendants, export) of one run.
    Lineage is looked up among the runs beside it."""
    record = read_run(ref, runs_dir, flag="run")
    info = RunInfo(record)
    runs = list_runs(record.path.parent).by_id()
    now = time.time()
    summary = record.summary
    brief = info.brief(now)
    error = summary.get("error")
    if brief["status"] == "crashed":
        command = summary.get("command")
        again = (
            f"`transferctl {command} --resume {record.path}` continues from the last checkpoint"
            if command in TRAINING_COMMANDS
            else f"run `transferctl {command}` again"
        )
        error = f"its process died without recording how it ended; {again}"
    return {
        **brief,
        "error": error,
        "metrics": summary.get("metrics") or {},
        "timings": {
            "started_at": summary.get("started_at"),
            "finished_at": summary.get("finished_at"),
            "duration_s": summary.get("duration_s"),
            "resumes": summary.get("resumes", []),
        },
        "config": record.config,
        "lineage": {
            "ancestors": _ancestors(info, runs, now),
            "export": export_info(record.path),
            "children": _descendants(info.id, runs, now, {info.id}),
        },
    }


# --------------------------------------------------------------------------- two runs


def _side_by_side(a: dict[str, Any], b: dict[str, Any], only_differences: bool) -> dict[str, dict[str, Any]]:
    """{key: {"a": value, "b": value}} over the keys of both (a missing key is null), in first-seen order."""
    keys = list(dict.fromkeys([*a, *b]))
    return {k: {"a": a.get(k), "b": b.get(k)} for k in keys if not only_differences or a.get(k) != b.get(k)}


def diff_runs(a_ref: str, b_ref: str, runs_dir: Path) -> dict[str, Any]:
    """The config keys (dotted) whose values differ, and every final metric of both runs."""
    a, b = RunInfo(read_run(a_ref, runs_dir, flag="run")), RunInfo(read_run(b_ref, runs_dir, flag="run"))
    now = time.time()
    return {
        "a": a.brief(now),
        "b": b.brief(now),
        "config": _side_by_side(flatten(a.record.config), flatten(b.record.config), only_differences=True),
        "metrics": _side_by_side(a.record.summary.get("metrics") or {}, b.record.summary.get("metrics") or {}, only_differences=False),
    }


def age(seconds: float) -> str:
    """'42s', '5m', '3h', '2d': how long ago, for tables."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"
