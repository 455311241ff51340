"""Methods: how a run trains. Pretraining methods (simclr, supervised, autoencoder, mae, mlm, electra, masked_frames) and
fine-tuning, each a registered class in a module of its own; `method_of(cfg)` gives the configured one, with its task."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transferctl.engine.evaluate import Evaluation
from transferctl.methods import autoencoder, electra, finetune, mae, masked_frames, mlm, simclr, supervised  # noqa: F401  (registers)
from transferctl.methods.base import Export, Method, Parts, component_defaults
from transferctl.registry import METHODS, TASKS

if TYPE_CHECKING:
    from transferctl.config import Config


def method_of(cfg: Config) -> Method:
    """The configured method, built with its options and, for a method that trains one, its task."""
    task = TASKS.build(cfg.task.name, cfg.task.options) if cfg.task is not None else None
    return METHODS.build(cfg.method.name, cfg.method.options, task=task)


__all__ = ["Evaluation", "Export", "Method", "Parts", "component_defaults", "method_of"]
