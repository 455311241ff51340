"""The `evaluate` recipe: score a run's checkpoint on the test split, into a new run.

A classifier run gets top-1 accuracy, loss, per-class accuracy and the confusion matrix; an
encoder-only (SimCLR) run gets weighted k-NN accuracy from the training split's labelled features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferctl import build
from transferctl.config import load_config
from transferctl.data import load_split
from transferctl.engine import SilentReporter, classify, knn_accuracy, pick_device
from transferctl.engine.train import Reporter
from transferctl.errors import UsageError
from transferctl.recipes.training import RunResult
from transferctl.runs import DEFAULT_RUNS_DIR, create_run, load_checkpoint, read_run, recording


def evaluate(
    source: str,
    overrides: list[str] | None = None,
    *,
    runs_dir: Path = DEFAULT_RUNS_DIR,
    reporter: Reporter | None = None,
) -> RunResult:
    record = read_run(source, runs_dir)
    cfg = load_config(None, overrides, base=record.config)
    checkpoint = load_checkpoint(record.checkpoint_path(cfg.eval.checkpoint))
    device = pick_device(cfg.train.device)
    test = load_split(cfg.data, train=False).to(device)
    model = build.build_network(cfg, test.channels, test.image_size, test.num_classes)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise UsageError(f"{record.checkpoint_path(cfg.eval.checkpoint)}: weights do not fit the run's model config; the run directory was altered") from None
    model.to(device)

    run = create_run(runs_dir, f"evaluate-{cfg.data.name}", cfg.to_dict(), record.id, "evaluate", {"device": str(device)})
    reporter = reporter or SilentReporter()
    reporter.start(0, "evaluating")
    with recording(run, "evaluate") as outcome:
        if cfg.is_classifier:
            result = classify(model, test, cfg.data.eval_batch_size)
            metrics: dict[str, Any] = {"accuracy": result.accuracy, "loss": result.loss}
            run.write_json(
                "confusion.json",
                {"classes": list(test.classes), "per_class_accuracy": result.per_class_accuracy, "confusion": result.confusion},
            )
            extra = {"per_class_accuracy": dict(zip(test.classes, result.per_class_accuracy))}
        else:
            train = load_split(cfg.data, train=True).to(device)
            metrics = {"knn_accuracy": knn_accuracy(
                model.encoder, train, test, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature, batch_size=cfg.data.eval_batch_size
            )}
            extra = {}
        metrics["test_images"] = len(test)
        row = {"checkpoint": cfg.eval.checkpoint, "source_epoch": checkpoint.get("epoch"), **metrics}
        run.log_metrics(row)
        reporter.epoch(row)
        outcome["metrics"] = metrics
    return RunResult(run.id, run.path, "completed", metrics, record.id, extra)
