"""The `evaluate` recipe: score a run's checkpoint on the test split, into a new run.

What is measured is the run's method's protocol: a task's metrics for a trained head (classification: top-1
accuracy, loss, per-class accuracy and the confusion matrix); k-NN accuracy for an encoder-only run (SimCLR).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferctl import build
from transferctl.config import load_config
from transferctl.engine import SilentReporter
from transferctl.engine.train import Reporter
from transferctl.recipes.training import RunResult
from transferctl.runs import DEFAULT_RUNS_DIR, create_run, read_trained_run, recording


def evaluate(
    source: str,
    overrides: list[str] | None = None,
    *,
    runs_dir: Path = DEFAULT_RUNS_DIR,
    reporter: Reporter | None = None,
) -> RunResult:
    record = read_trained_run(source, runs_dir)
    cfg = load_config(None, overrides, base=record.config)
    trained = build.load_trained(record, cfg)  # everything that can fail on bad input, before the run exists

    run = create_run(runs_dir, f"evaluate-{cfg.data.name}", cfg.to_dict(), record.id, "evaluate", {"device": str(trained.device)})
    reporter = reporter or SilentReporter()
    for note in cfg.notes:
        run.log(f"note: {note}")
        reporter.note(note)
    reporter.start(0, "evaluating")
    with recording(run, "evaluate") as outcome:
        evaluation = trained.method.evaluate(trained, run)
        run.update_summary(key_metric=next(iter(evaluation.metrics)))  # the protocol's first metric sums the run up
        metrics: dict[str, Any] = {**evaluation.metrics, "test_images": len(trained.split(train=False))}
        row = {"checkpoint": record.checkpoint_name(cfg.eval.checkpoint), "source_epoch": trained.checkpoint.epoch, **metrics}
        run.log_metrics(row)
        reporter.epoch(row)
        outcome["metrics"] = metrics
    return RunResult(run.id, run.path, "completed", metrics, record.id, evaluation.extra)
