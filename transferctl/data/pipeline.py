"""Training-batch pipelines: where images live and where they are augmented.

- `memory`: the whole split as one uint8 tensor on the training device; shuffled batches by index;
  augmentation on whole batches with tensor ops (`BatchAugment`). No data loader on the hot path.
- `loader`: the classic path: a torch DataLoader whose workers apply per-image torchvision transforms
  (the same augmentation, built from the same config) to images held in host memory.

Both draw an epoch's order from a generator seeded by (seed, epoch), so they visit the same images
in the same order, and both can start mid-epoch (`start_batch`) for an exact resume. Across ranks,
`batch_size` is the global batch: rank r of w gets the r-th of w equal slices of every global batch,
augmented exactly as one process would augment it, so N ranks compute what one process would.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from transferctl.data.augment import BatchAugment, normalize, to_unit
from transferctl.data.datasets import ImageData, iterate_batches, num_batches

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # (views, labels): each view a normalized float batch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class Pipeline(Protocol):
    views: int

    def batches_per_epoch(self) -> int: ...
    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]: ...
    def state(self) -> dict[str, Any]: ...
    def restore(self, state: dict[str, Any]) -> None: ...


class MemoryPipeline:
    """Data on the device, batched augmentation on the device (airbench-style)."""

    def __init__(self, data: ImageData, augment: BatchAugment, *, views: int, batch_size: int, seed: int, drop_last: bool,
                 channels_last: bool = False, rank: int = 0, world: int = 1):
        self.data, self.augment, self.views = data, augment, views
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world = rank, world
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=data.images.device).manual_seed(seed + 1)

    def batches_per_epoch(self) -> int:
        return num_batches(len(self.data), self.batch_size, self.drop_last)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order = epoch_order(len(self.data), self.seed, epoch)
        for images, labels in iterate_batches(self.data, self.batch_size, order=order, drop_last=self.drop_last, start_batch=start_batch):
            x = to_unit(images)
            # every rank augments the whole global batch (the data path has headroom), then keeps its slice
            mine = slice(self.rank * len(x) // self.world, (self.rank + 1) * len(x) // self.world)
            views = tuple(
                normalize(self.augment(x, self.generator)[mine], self.data.mean, self.data.std).contiguous(memory_format=self.memory_format)
                for _ in range(self.views)
            )
            yield views, labels[mine]

    def state(self) -> dict[str, Any]:
        return {"augment": self.generator.get_state().cpu()}

    def restore(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["augment"])


class UnlabeledBatch(NamedTuple):
    weak: torch.Tensor
    strong: torch.Tensor
    index: torch.Tensor  # where this rank's images sit in the pool


class UnlabeledStream:
    """Endless batches of unlabeled images on the device, each as a (weak, strong) augmented pair.

    Batch `step` is a pure function of (seed, step), so a resumed run draws exactly the batches and
    augmentations an uninterrupted one would, with no state to checkpoint.
    """

    def __init__(self, data: ImageData, weak: BatchAugment, strong: BatchAugment, *, batch_size: int, seed: int,
                 channels_last: bool = False, rank: int = 0, world: int = 1):
        self.data, self.weak, self.strong = data, weak, strong
        self.batch_size = min(batch_size, len(data) // world * world)  # a small pool: still an even share per rank
        self.seed, self.rank, self.world = seed + 7919, rank, world  # its own order, apart from the labelled batches'
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._order: tuple[int, torch.Tensor] | None = None

    def batch(self, step: int) -> UnlabeledBatch:
        epoch, index = divmod(step, len(self.data) // self.batch_size)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.data), self.seed, epoch).to(self.data.images.device))
        chosen = self._order[1][index * self.batch_size : (index + 1) * self.batch_size]
        x = to_unit(self.data.images[chosen])
        generator = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + step)
        mine = slice(self.rank * len(x) // self.world, (self.rank + 1) * len(x) // self.world)
        weak, strong = (
            normalize(augment(x, generator)[mine], self.data.mean, self.data.std).contiguous(memory_format=self.memory_format)
            for augment in (self.weak, self.strong)
        )
        return UnlabeledBatch(weak, strong, chosen[mine])


class _EpochOrder(Sampler):
    """Yields (epoch, index) pairs, so workers can seed each image's augmentation deterministically:
    this rank's slice of every global batch from `start_batch` on."""

    def __init__(self, n: int, seed: int, epoch: int, start_batch: int, batch_size: int, drop_last: bool, rank: int, world: int):
        order = epoch_order(n, seed, epoch).tolist()
        stop = n - n % batch_size if drop_last else n
        self.items = []
        for start in range(start_batch * batch_size, stop, batch_size):
            batch = order[start : start + batch_size]
            self.items += [(epoch, i) for i in batch[rank * len(batch) // world : (rank + 1) * len(batch) // world]]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _PerImageViews(Dataset):
    """Each item: `views` independently transformed copies of one image, seeded by (seed, epoch, index)."""

    def __init__(self, data: ImageData, transform, views: int, seed: int):
        self.images, self.labels = data.images.cpu(), data.labels.cpu()
        self.mean, self.std = data.mean, data.std
        self.transform, self.views, self.seed = transform, views, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone when there are no workers
            # the CPU generator only (torch.manual_seed would reseed every CUDA generator too)
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63)
            image = to_unit(self.images[index].clone())
            views = [normalize(self.transform(image).unsqueeze(0), self.mean, self.std)[0] for _ in range(self.views)]
        return views, self.labels[index]


class LoaderPipeline:
    """Host-memory images, per-image torchvision transforms in DataLoader worker processes."""

    def __init__(self, data: ImageData, augment: BatchAugment, *, views: int, batch_size: int, seed: int, drop_last: bool,
                 device: torch.device, num_workers: int, channels_last: bool = False, rank: int = 0, world: int = 1):
        self.views, self.batch_size, self.seed, self.drop_last = views, batch_size, seed, drop_last
        self.rank, self.world = rank, world
        self.n, self.device, self.num_workers = len(data), device, num_workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dataset = _PerImageViews(data, augment.torchvision_transform(data.image_size, data.channels), views, seed)

    def batches_per_epoch(self) -> int:
        return num_batches(self.n, self.batch_size, self.drop_last)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        sampler = _EpochOrder(self.n, self.seed, epoch, start_batch, self.batch_size, self.drop_last, self.rank, self.world)
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size // self.world, sampler=sampler, drop_last=False,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),  # not the global RNG: resumable
            persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
        )
        for views, labels in loader:
            yield tuple(v.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format) for v in views), labels.to(self.device)

    def state(self) -> dict[str, Any]:
        return {}  # augmentation is a pure function of (seed, epoch, index)

    def restore(self, state: dict[str, Any]) -> None:
        pass


def fits_in_memory(data: ImageData, budget_mb: int) -> bool:
    """Whether the split (uint8 pixels) fits the memory pipeline's budget."""
    return data.images.numel() <= budget_mb * 2**20


def make_pipeline(data: ImageData, augment: BatchAugment, *, kind: str, views: int, batch_size: int, seed: int,
                  drop_last: bool, device: torch.device, num_workers: int, budget_mb: int, channels_last: bool,
                  rank: int = 0, world: int = 1) -> Pipeline:
    """`kind` is memory, loader or auto (memory when the split fits `budget_mb`)."""
    if kind == "auto":
        kind = "memory" if fits_in_memory(data, budget_mb) else "loader"
    common = dict(views=views, batch_size=batch_size, seed=seed, drop_last=drop_last, channels_last=channels_last, rank=rank, world=world)
    if kind == "memory":
        return MemoryPipeline(data.to(device), augment, **common)
    return LoaderPipeline(data, augment, device=device, num_workers=num_workers, **common)

