"""The data contract: one split of a data set, whatever its modality, and the batches a training step gets.

A split is `Samples`: raw samples stacked in one tensor (`inputs`), one target per sample (`targets`: a tensor, or
a `TargetList` for targets that do not stack; their kind, `target_kind`, is a registered `TargetKind`), optional
per-sample side information about the inputs (`side`: lengths, word ids, ...), and the class names. A modality's
subclass adds what reading its samples takes (an image split's mean, std and whether a flip keeps its meaning).
Everything that only batches, splits or subsets data works on `Samples` alone.

A split that does not fit in memory (a streamed source, `data/stream.py`) keeps the same contract: its `inputs`
stands in for the tensor (shape, `inputs[idx]` decodes those samples) and selects subsets without reading them;
`iterate_batches` reads its batches in DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from transferctl.data.targets import Targets, target_kind_of

NO_LABEL = -1  # the target of a sample whose label is not used (the unlabeled pool of semi-supervised fine-tuning)

# What a sample's target is: the name of a registered target kind (`transferctl/data/targets.py`): "class",
# "values", "class_per_pixel", or a plugin's.
TargetKindName = str


@dataclass(frozen=True)
class Samples:
    """One split in memory: raw `inputs` (N, ...), `targets` (N, ...) or a TargetList of N, and class names (empty
    when targets are values, which `target_names` names instead: float targets (N, len(target_names))). `side`:
    per-sample information about the inputs, each (N, ...) (lengths, word ids), which batches carry beside them."""

    inputs: torch.Tensor
    targets: Targets
    classes: tuple[str, ...]
    target_kind: TargetKindName = field(default="class", kw_only=True)
    target_names: tuple[str, ...] = field(default=(), kw_only=True)
    side: Mapping[str, torch.Tensor] = field(default_factory=dict, kw_only=True)
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
        return replace(self, inputs=inputs, targets=self.targets[indices], side=self.side_of(indices))

    def to(self, device: torch.device) -> Samples:
        side = {name: values.to(device) for name, values in self.side.items()}
        return replace(self, inputs=self.inputs.to(device), targets=self.targets.to(device), side=side)

    def without_targets(self) -> Samples:
        """The same samples, every target replaced by one without a label (NO_LABEL for class indices)."""
        return replace(self, targets=target_kind_of(self).without_labels(self.targets, NO_LABEL))

    def side_of(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The side information of the samples at `indices`."""
        return {name: values[indices.to(values.device)] for name, values in self.side.items()}


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
    data: Samples,
    batch_size: int,
    *,
    order: torch.Tensor | None = None,
    drop_last: bool = False,
    start_batch: int = 0,
    with_side: bool = False,
) -> Iterator[tuple[torch.Tensor, Targets] | tuple[torch.Tensor, Targets, dict[str, torch.Tensor]]]:
    """(inputs, targets) batches by index, in `order` (default: all, as stored), from `start_batch` on, and with
    `with_side` their side information as a third item; a streamed split's are decoded a few batches ahead in
    worker processes and moved to where its targets are."""
    order = (order if order is not None else torch.arange(len(data))).to(data.targets.device)
    batches = batch_indices(len(order), batch_size, order=order, drop_last=drop_last, start_batch=start_batch)
    from transferctl.data.stream import is_streamed, raise_if_stopped  # lazily: this module stays free of the readers

    if not is_streamed(data):
        for idx in batches:
            yield (data.inputs[idx], data.targets[idx], data.side_of(idx)) if with_side else (data.inputs[idx], data.targets[idx])
        return

    batches = list(batches)
    for read in data.inputs.iterate(batches):
        device = data.targets.device
        used = read.positions.to(device)
        inputs = raise_if_stopped(read).to(device, non_blocking=True)
        yield (inputs, data.targets[used], data.side_of(used)) if with_side else (inputs, data.targets[used])


@dataclass
class Batch:
    """What a training step gets: the model `inputs`, one tensor per view the method asked for; the `targets` of
    those samples (their kind is the data's `target_kind`: a tensor, or a TargetList that the task collates); the
    inputs' `side` information (lengths, word ids: what the network takes beside the inputs); and `extras` a method
    may use, such as `index` (where each sample sits in its split) or a mask."""

    inputs: tuple[torch.Tensor, ...]
    targets: Targets
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    side: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.inputs[0].shape[0]
