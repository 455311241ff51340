"""The `evaluate` recipe: score a run's checkpoint on the test split, into a new run.

A classifier run gets top-1 accuracy, loss, per-class accuracy and the confusion matrix; an
encoder-only (SimCLR) run gets weighted k-NN accuracy from the training split's labelled features.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from transferctl import build, plots
from transferctl.config import Config, load_config
from transferctl.data import ImageData, load_split
from transferctl.engine import SilentReporter, classify, knn_accuracy, pick_device
from transferctl.engine.train import Reporter
from transferctl.errors import UsageError
from transferctl.recipes.training import RunResult
from transferctl.runs import DEFAULT_RUNS_DIR, RunRecord, create_run, load_checkpoint, read_trained_run, recording


def as_trained(data: ImageData, checkpoint: dict[str, Any], where: str) -> ImageData:
    """`data` read the way the model was trained: its classes in training order, the training mean/std."""
    trained = checkpoint["data"]
    if list(data.classes) != trained["classes"]:
        raise UsageError(f"{where}: the test split's classes {list(data.classes)} differ from the trained classes {trained['classes']}")
    return replace(data, mean=tuple(trained["mean"]), std=tuple(trained["std"]))


def trained_model(record: RunRecord, cfg: Config, checkpoint: dict[str, Any], data: ImageData) -> nn.Module:
    """The run's network (classifier) or its encoder (encoder-only run), with the checkpoint's weights."""
    network = build.build_network(cfg, data.channels, data.image_size, len(checkpoint["data"]["classes"]))
    try:
        network.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise UsageError(f"{record.path}: its checkpoint does not fit model '{cfg.model.name}' as configured; drop model overrides") from None
    return (network if cfg.is_classifier else network.encoder).eval()


def evaluate(
    source: str,
    overrides: list[str] | None = None,
    *,
    runs_dir: Path = DEFAULT_RUNS_DIR,
    reporter: Reporter | None = None,
) -> RunResult:
    record = read_trained_run(source, runs_dir)
    cfg = load_config(None, overrides, base=record.config)
    checkpoint = load_checkpoint(record.checkpoint_path(cfg.eval.checkpoint))
    device = pick_device(cfg.train.device)
    test = as_trained(load_split(cfg.data, train=False), checkpoint, str(record.path)).to(device)
    bank = None if cfg.is_classifier else as_trained(load_split(cfg.data, train=True), checkpoint, str(record.path)).to(device)
    model = trained_model(record, cfg, checkpoint, test).to(device)

    run = create_run(runs_dir, f"evaluate-{cfg.data.name}", cfg.to_dict(), record.id, "evaluate", {"device": str(device)})
    reporter = reporter or SilentReporter()
    reporter.start(0, "evaluating")
    with recording(run, "evaluate") as outcome:
        extra: dict[str, Any] = {}
        if bank is None:
            result = classify(model, test, cfg.data.eval_batch_size)
            metrics: dict[str, Any] = {"accuracy": result.accuracy, "loss": result.loss}
            run.write_json(
                "confusion.json",
                {"classes": list(test.classes), "per_class_accuracy": result.per_class_accuracy, "confusion": result.confusion},
            )
            plots.write_confusion(run, list(test.classes), result.confusion)
            extra["per_class_accuracy"] = dict(zip(test.classes, result.per_class_accuracy))
        else:
            k, temperature = cfg.eval.knn_k, cfg.eval.knn_temperature
            metrics = {"knn_accuracy": knn_accuracy(model, bank, test, k=k, temperature=temperature, batch_size=cfg.data.eval_batch_size)}
        metrics["test_images"] = len(test)
        row = {"checkpoint": cfg.eval.checkpoint, "source_epoch": checkpoint.get("epoch"), **metrics}
        run.log_metrics(row)
        reporter.epoch(row)
        outcome["metrics"] = metrics
    return RunResult(run.id, run.path, "completed", metrics, record.id, extra)
