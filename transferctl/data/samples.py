"""The data contract: one split of a data set, whatever its modality, and the batches a training step gets.

A split is `Samples`: raw samples stacked in one tensor (`inputs`), one target per sample (`targets`), and the
class names. A modality's subclass adds what reading its samples takes (an image split's mean, std and whether a
flip keeps its meaning). Everything that only batches, splits or subsets data works on `Samples` alone.

A split that does not fit in memory (a streamed source, `data/stream.py`) keeps the same contract: its `inputs`
stands in for the tensor (shape, `inputs[idx]` decodes those samples) and selects subsets without reading them;
`iterate_batches` reads its batches in DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import torch

NO_LABEL = -1  # the target of a sample whose label is not used (the unlabeled pool of semi-supervised fine-tuning)

# What a sample's target is: a class index, a vector of values, or a class index per pixel.
TargetKind = Literal["class", "values", "class_per_pixel"]


@dataclass(frozen=True)
class Samples:
    """One split in memory: raw `inputs` (N, ...), `targets` (N, ...), and class names (empty when targets are
    values, which `target_names` names instead: float targets (N, len(target_names)))."""

    inputs: torch.Tensor
    targets: torch.Tensor
    classes: tuple[str, ...]
    target_kind: TargetKind = field(default="class", kw_only=True)
    target_names: tuple[str, ...] = field(default=(), kw_only=True)
    modality: ClassVar[str]  # the registered modality that reads these inputs

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sample(self, index: int) -> torch.Tensor:
        """One raw sample."""
        return self.inputs[index]

    def subset(self, indices: torch.Tensor) -> Samples:
        inputs = self.inputs.unread_subset(indices) if hasattr(self.inputs, "unread_subset") else self.inputs[indices]  # streamed: not read
        return replace(self, inputs=inputs, targets=self.targets[indices])

    def to(self, device: torch.device) -> Samples:
        return replace(self, inputs=self.inputs.to(device), targets=self.targets.to(device))

    def without_targets(self) -> Samples:
        """The same samples, every target replaced by NO_LABEL."""
        return replace(self, targets=torch.full_like(self.targets, NO_LABEL))


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_indices(
    n: int, batch_size: int, *, order: torch.Tensor | None = None, drop_last: bool = False, start_batch: int = 0
) -> Iterator[torch.Tensor]:
    """The indices of each batch, in `order` (default: as stored), from `start_batch` on."""
    order = order if order is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(start_batch * batch_size, stop, batch_size):
        yield order[start : start + batch_size]


def iterate_batches(
    data: Samples, batch_size: int, *, order: torch.Tensor | None = None, drop_last: bool = False, start_batch: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches by index, in `order` (default: all, as stored), from `start_batch` on; a streamed
    split's are decoded a few batches ahead in worker processes and moved to where its targets are."""
    order = (order if order is not None else torch.arange(len(data))).to(data.targets.device)
    batches = batch_indices(len(order), batch_size, order=order, drop_last=drop_last, start_batch=start_batch)
    from transferctl.data.stream import is_streamed, raise_if_stopped  # lazily: this module stays free of the readers

    if not is_streamed(data):
        for idx in batches:
            yield data.inputs[idx], data.targets[idx]
        return

    batches = list(batches)
    for read in data.inputs.iterate(batches):
        device = data.targets.device
        yield raise_if_stopped(read).to(device, non_blocking=True), data.targets[read.positions.to(device)]


@dataclass
class Batch:
    """What a training step gets: the model `inputs`, one tensor per view the method asked for; the `targets` of
    those samples (their kind is the data's `target_kind`); and `extras` a method may use, such as `index`
    (where each sample sits in its split) or a mask."""

    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.inputs[0].shape[0]
