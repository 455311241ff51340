"""`transferctl config show` and `config check`: the config a command line would run, and every
component it names built once, on the CPU, with one batch through the model and the loss: no training,
nothing written. The first problem found is a one-line usage error.

It resolves with the fine-tune recipe's `finetune_config` and builds with the assembly layer's `build_training`,
so what passes here is what `pretrain`/`finetune` would build.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from transferctl.config import Config, apply_overrides, component_name, load_config, read_yaml
from transferctl.errors import ConfigError, TransferError, UsageError
from transferctl.runs import DEFAULT_RUNS_DIR

T = TypeVar("T")


def resolved_config(
    config: str | Path | None,
    overrides: list[str] | None = None,
    *,
    source: str | None = None,
    runs_dir: Path = DEFAULT_RUNS_DIR,
) -> Config:
    """The fully resolved config that `pretrain -c` (simclr, supervised) or `finetune [--from] [-c]` (finetune)
    would run, with every default filled in."""
    overrides = list(overrides or [])
    if config is None and source is None:
        raise UsageError("config needs -c CONFIG (or --from RUN for a fine-tune of that run)")
    method = "finetune" if source is not None else component_name(apply_overrides(read_yaml(config), overrides).get("method"))
    if _command_of(method) == "finetune":  # the fine-tune recipe's defaults and the source's encoder, as `finetune` merges them
        from transferctl.recipes.training import finetune_config

        return finetune_config(source, config, overrides, runs_dir=runs_dir)
    return load_config(config, overrides)


def _command_of(method: Any) -> str | None:
    """The verb that runs `method` (None for a name that is not a registered method: validation says so)."""
    from transferctl.components import load_components
    from transferctl.registry import METHODS

    load_components()
    return METHODS.get(method).fn.command if isinstance(method, str) and method in METHODS else None


def _stage(name: str, build: Callable[[], T]) -> T:
    """Run one stage of the check; an unexpected error there becomes a one-line config error naming the stage."""
    try:
        return build()
    except TransferError:
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"config check failed at {name}: {type(exc).__name__}: {reason}") from None


def _on_cpu(cfg: Config) -> Config:
    """The same config on the CPU, in a precision the CPU has (float16 with a scaler is CUDA-only)."""
    precision = "32" if cfg.train.precision == "16" else cfg.train.precision
    train = cfg.train.model_copy(update={"device": "cpu", "precision": precision, "compile": False})
    return cfg.model_copy(update={"train": train})


def _count(module: Any, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def check_config(cfg: Config) -> dict[str, Any]:
    """Build data, model (with the source's or local weights), head, loss, optimizer, scheduler and batch
    pipeline through the assembly layer, as training would; put one training batch through the model and the
    loss (train mode, no gradients). Passes over the data that only training needs (label propagation) are
    skipped."""
    import torch

    from transferctl.build import build_training
    from transferctl.engine.train import hook
    from transferctl.modalities import dataset_modality
    from transferctl.models.heads import side_for

    training = _stage("building the run (data, model, objective, optimizer, pipeline)", lambda: build_training(_on_cpu(cfg)))
    batch = _stage("the first batch", lambda: next(iter(training.pipeline.batches(0))))
    model = training.network
    hook(training.objective, "train_mode")(model)  # as training puts it at each epoch's start
    with torch.no_grad():
        features = _stage("the encoder's forward pass", lambda: model.encode(batch.inputs[0], **batch.side))  # what the head reads
        output = _stage("the head's forward pass", lambda: model.head(features, **side_for(model.head, batch.side)))
        loss = _stage("the loss", lambda: training.objective.loss(batch, 0)).item()  # step 0: a fresh run's first
    if not math.isfinite(loss):
        raise ConfigError(f"config check: the loss of the first batch is {loss}; check the data set, model and loss options")
    train, val = training.train, training.val
    return {
        "status": "ok",
        "method": cfg.method.name,
        "task": cfg.task.name if cfg.task is not None else None,
        "device": "cpu",
        "components": {
            "model": cfg.model.name,
            "weights": cfg.model.weights,
            "head": cfg.head.name,
            "loss": cfg.loss.name,
            "optimizer": cfg.optimizer.name,
            "scheduler": cfg.scheduler.name,
            "augment": cfg.data.augment.name,
            "dataset": cfg.data.name,
            "modality": dataset_modality(cfg.data.name),
            "pipeline": type(training.pipeline).__name__,
        },
        "data": {
            "train_samples": len(train),
            "val_samples": len(val),
            "classes": train.num_classes,
            "input_shape": list(train.sample_shape),
        },
        "parameters": {
            "total": _count(model),
            "trainable": _count(model, trainable_only=True),
            "encoder": _count(model.encoder),
            "head": _count(model.head),
        },
        "shapes": {
            "batch": list(batch.inputs[0].shape),
            "views": len(batch.inputs),
            "features": [list(f.shape) for f in features] if isinstance(features, list) else list(features.shape),
            "output": list(output.shape),
        },
        "loss": loss,
        "steps": training.steps.total,
        "notes": training.notes,
    }
