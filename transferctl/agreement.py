"""How two models' outputs of the same inputs agree beyond their values: what an export's parity check and a
run-versus-export comparison count. Each comparison gives {name: (agreeing, counted)} for one batch, so batches add
up; a task or method names its own (`Task.compare`) and the share each must reach (`Task.minimum_agreement`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

Counts = dict[str, tuple[int, int]]
Compare = Callable[[torch.Tensor, torch.Tensor], Counts]


def top1(expected: torch.Tensor, actual: torch.Tensor) -> Counts:
    """Each row's argmax over dim 1 (a classifier's class; an encoder's strongest feature)."""
    same = expected.argmax(1) == actual.argmax(1)
    return {"top1_agreement": (int(same.sum()), same.numel())}


def per_position(name: str, valid: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Compare:
    """The argmax over dim 1 at every other position (a segmenter's pixels; a tagger's tokens), optionally only
    where `valid(expected)` holds."""

    def compare(expected: torch.Tensor, actual: torch.Tensor) -> Counts:
        same = expected.argmax(1) == actual.argmax(1)
        if valid is not None:
            same = same[valid(expected)]
        return {name: (int(same.sum()), same.numel())}

    return compare


def none(expected: torch.Tensor, actual: torch.Tensor) -> Counts:
    """Nothing beyond the values (continuous outputs)."""
    return {}


def add(total: Counts, more: Counts) -> Counts:
    """Two batches' counts summed."""
    summed = dict(total)
    for name, (agreeing, counted) in more.items():
        before = summed.get(name, (0, 0))
        summed[name] = (before[0] + agreeing, before[1] + counted)
    return summed


def shares(total: Counts) -> dict[str, float]:
    return {name: agreeing / max(counted, 1) for name, (agreeing, counted) in total.items()}
