"""Training-batch pipelines: where samples live and where they are augmented.

- `memory`: the whole split as one tensor on the training device; shuffled batches by index; augmentation on
  whole batches with tensor ops (`BatchAugment`). No data loader on the hot path.
- `loader`: the classic path: a torch DataLoader whose workers apply per-sample torchvision transforms (the
  same augmentation, built from the same config) to samples read through `Samples.sample`.
- `stream`: a split too large for memory (`data/stream.py`): DataLoader workers read and decode this rank's
  part of each global batch, a few batches ahead; on the device the batch is augmented by the same
  `BatchAugment`, with the same generator, as the memory pipeline, so an image folder gives the same views.

Both draw an epoch's order from a generator seeded by (seed, epoch), so they visit the same samples in the
same order, and both can start mid-epoch (`start_batch`) for an exact resume. Across ranks, `batch_size` is
the global batch: rank r of w gets the r-th of w equal slices of every global batch, augmented exactly as one
process would augment it, so N ranks compute what one process would. The modality turns raw samples into
model inputs around the augmentation (`decode`, then `normalize`); a pipeline knows no modality by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from transferctl.data.augment import BatchAugment
from transferctl.data.samples import Batch, Samples, batch_indices
from transferctl.data.stream import is_streamed, raise_if_stopped
from transferctl.data.targets import target_kind_of
from transferctl.errors import ConfigError
from transferctl.modalities.base import Modality
from transferctl.processes import release_inherited_locks


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


BUCKET_BATCHES = 20  # batches of the shuffled order sorted by length together: their padding drops, their mix stays random


def balanced_order(labels: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """As many samples as `labels` has, drawn with replacement so that every class present is drawn equally often on
    average (class-balanced sampling); a pure function of seed and epoch."""
    labels = labels.cpu()
    counts = torch.bincount(labels)
    weights = 1.0 / counts[labels].double()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 700_001)
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator)


def training_order(data: Samples, seed: int, epoch: int, batch_size: int, balanced: bool = False) -> torch.Tensor:
    """The order of epoch `epoch` (a pure function of seed and epoch): shuffled, or with `balanced` drawn class-balanced
    (`balanced_order`); for samples of any length (a split with `lengths` side information), bucketed: each run of
    BUCKET_BATCHES batches of that order sorted by length, cut into batches, and the full batches shuffled (a last,
    partial one stays last), so a batch pads its samples to little more than their own lengths."""
    order = balanced_order(data.targets, seed, epoch) if balanced else epoch_order(len(data), seed, epoch)
    lengths = data.side.get("lengths")
    if lengths is None:
        return order
    lengths = lengths.cpu()
    chunks = [chunk[lengths[chunk].argsort(stable=True)] for chunk in order.split(batch_size * BUCKET_BATCHES)]
    batches = torch.cat(chunks).split(batch_size)
    full = [b for b in batches if len(b) == batch_size]
    shuffle = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009))
    return torch.cat([*(full[i] for i in shuffle.tolist()), *(b for b in batches if len(b) < batch_size)])


def rank_slice(size: int, rank: int, world: int) -> slice:
    """This rank's share of a global batch of `size`."""
    return slice(rank * size // world, (rank + 1) * size // world)


class Pipeline(Protocol):
    """Training batches. `log`: where the pipeline says what it did to samples (stream: each bad sample it replaced),
    a recipe sets it to the run's log; `metrics()`: this rank's counts of that (stream: `bad_samples_replaced`), which
    a recipe sums over the ranks into the run's final metrics ({} for memory and loader)."""

    views: int
    log: Callable[[str], None]

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]: ...
    def state(self) -> dict[str, Any]: ...
    def restore(self, state: dict[str, Any]) -> None: ...
    def metrics(self) -> dict[str, int]: ...


class NothingToReport:
    """A pipeline whose every sample reads (memory, loader): nothing to log, nothing counted."""

    @staticmethod
    def log(line: str) -> None:
        pass

    def metrics(self) -> dict[str, int]:
        return {}


def in_global_batch(mine: torch.Tensor, size: int, part: slice) -> torch.Tensor:
    """This rank's samples in their places of a global batch of `size`, the other ranks' places zeros: what
    a rank that read only its own samples augments, so every random draw is the one process's."""
    full = torch.zeros((size, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
    full[part] = mine
    return full


def augmented_input(
    x: torch.Tensor, augment: BatchAugment, modality: Modality, data: Samples, generator: torch.Generator, mine: slice
) -> torch.Tensor:
    """This rank's slice of a global batch of decoded samples, augmented and made model inputs: the augmentation,
    the modality's `normalize`, then the augmentation's stage on model inputs, if it has one (audio: SpecAugment on
    the spectrograms). Every random draw covers the whole global batch, as one process would draw it."""
    on_model_inputs = getattr(augment, "on_model_inputs", None)
    if on_model_inputs is None:
        return modality.normalize(augment(x, generator)[mine], data)
    return on_model_inputs(modality.normalize(augment(x, generator), data), generator)[mine]


def targets_follow_views(data: Samples, views: int) -> bool:
    """Whether a batch's targets must move with its augmented inputs: targets in the inputs' coordinates (masks,
    boxes), and one view to move them with. Several views serve contrastive methods, which read no targets: each
    view is drawn on its own and the targets stay as they are."""
    return target_kind_of(data).geometric and views == 1


class MemoryPipeline(NothingToReport):
    """Data on the device, batched augmentation on the device (airbench-style)."""

    def __init__(
        self,
        data: Samples,
        augment: BatchAugment,
        modality: Modality,
        *,
        views: int,
        batch_size: int,
        seed: int,
        drop_last: bool,
        channels_last: bool = False,
        rank: int = 0,
        world: int = 1,
        balanced: bool = False,
        by_length: bool = False,
    ):
        self.data = modality.with_lengths(data) if by_length else data
        self.augment, self.modality, self.views, self.balanced, self.by_length = augment, modality, views, balanced, by_length
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world = rank, world
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=data.inputs.device).manual_seed(seed + 1)
        self.kind, self.moves_targets = target_kind_of(data), targets_follow_views(data, views)
        if self.moves_targets and not hasattr(augment, "with_targets"):
            raise ConfigError(
                f"data.augment: {self.kind.noun} move with their inputs, and this augmentation cannot move "
                "them; use an image augmentation (light, simclr) or data.augment.name=none"
            )

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order = training_order(self.data, self.seed, epoch, self.batch_size, self.balanced).to(self.data.inputs.device)
        for idx in batch_indices(len(self.data), self.batch_size, order=order, drop_last=self.drop_last, start_batch=start_batch):
            x = self.modality.decode(self.data.inputs[idx])
            # every rank augments the whole global batch (the data path has headroom), then keeps its slice
            mine = rank_slice(len(x), self.rank, self.world)
            side = self.data.side_of(idx[mine])
            if self.by_length:  # cut to the global batch's longest sample, as one process would
                x, side = self.modality.cut_padding(x, side, self.data)
            if self.moves_targets:  # one view, drawn with its targets
                x, moved = self.augment.with_targets(x, self.data.targets[idx], self.kind, self.generator)
                yield Batch((self._model_input(x[mine]),), moved[mine], {"index": idx[mine]}, side)
                continue
            views = tuple(self._view(x, mine) for _ in range(self.views))
            yield Batch(views, self.data.targets[idx][mine], {"index": idx[mine]}, side)

    def _view(self, x: torch.Tensor, mine: slice) -> torch.Tensor:
        return augmented_input(x, self.augment, self.modality, self.data, self.generator, mine).contiguous(memory_format=self.memory_format)

    def _model_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality.normalize(x, self.data).contiguous(memory_format=self.memory_format)

    def state(self) -> dict[str, Any]:
        return {"augment": self.generator.get_state().cpu()}

    def restore(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["augment"])


class UnlabeledBatch(NamedTuple):
    weak: torch.Tensor
    strong: torch.Tensor
    index: torch.Tensor  # where this rank's samples sit in the pool


class UnlabeledStream:
    """Endless batches of unlabeled samples on the device, each as a (weak, strong) augmented pair.

    Batch `step` is a pure function of (seed, step), so a resumed run draws exactly the batches and
    augmentations an uninterrupted one would, with no state to checkpoint.
    """

    def __init__(
        self,
        data: Samples,
        weak: BatchAugment,
        strong: BatchAugment,
        modality: Modality,
        *,
        batch_size: int,
        seed: int,
        channels_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        self.data, self.weak, self.strong, self.modality = data, weak, strong, modality
        self.batch_size = min(batch_size, len(data) // world * world)  # a small pool: still an even share per rank
        self.seed, self.rank, self.world = seed + 7919, rank, world  # its own order, apart from the labelled batches'
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._order: tuple[int, torch.Tensor] | None = None

    def batch(self, step: int) -> UnlabeledBatch:
        epoch, index = divmod(step, len(self.data) // self.batch_size)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.data), self.seed, epoch).to(self.data.targets.device))
        chosen = self._order[1][index * self.batch_size : (index + 1) * self.batch_size]
        mine = rank_slice(len(chosen), self.rank, self.world)
        x = self.modality.decode(self._raw(chosen, mine))
        generator = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + step)
        weak, strong = (
            augmented_input(x, augment, self.modality, self.data, generator, mine).contiguous(memory_format=self.memory_format)
            for augment in (self.weak, self.strong)
        )
        return UnlabeledBatch(weak, strong, chosen[mine])

    def _raw(self, chosen: torch.Tensor, mine: slice) -> torch.Tensor:
        """The global batch's raw samples; of a streamed pool only this rank's are read (here, in this process),
        the others' places left as zeros, which only shape the random draws."""
        if not is_streamed(self.data):
            return self.data.inputs[chosen]
        return in_global_batch(self.data.inputs[chosen[mine]].to(self.data.targets.device), len(chosen), mine)


class _EpochOrder(Sampler):
    """Yields (epoch, index) pairs, so workers can seed each sample's augmentation deterministically:
    this rank's slice of every global batch from `start_batch` on."""

    def __init__(
        self,
        data: Samples,
        seed: int,
        epoch: int,
        start_batch: int,
        batch_size: int,
        drop_last: bool,
        rank: int,
        world: int,
        balanced: bool,
    ):
        n, order = len(data), training_order(data, seed, epoch, batch_size, balanced)
        self.items = []
        for batch in batch_indices(n, batch_size, order=order, drop_last=drop_last, start_batch=start_batch):
            self.items += [(epoch, i) for i in batch[rank_slice(len(batch), rank, world)].tolist()]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _PerSampleViews(Dataset):
    """Each item: `views` independently transformed copies of one sample, seeded by (seed, epoch, index)."""

    def __init__(self, data: Samples, modality: Modality, transform, views: int, seed: int):
        self.data = data.to(torch.device("cpu"))
        self.modality, self.transform, self.views, self.seed = modality, transform, views, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone when there are no workers
            # the CPU generator only (torch.manual_seed would reseed every CUDA generator too)
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63)
            x = self.modality.decode(self.data.sample(index).clone())
            views = [self.modality.normalize(self.transform(x).unsqueeze(0), self.data)[0] for _ in range(self.views)]
        return views, index  # targets of any shape are gathered by index in the main process


class LoaderPipeline(NothingToReport):
    """Host-memory samples, per-sample torchvision transforms in DataLoader worker processes."""

    def __init__(
        self,
        data: Samples,
        augment: BatchAugment,
        modality: Modality,
        *,
        views: int,
        batch_size: int,
        seed: int,
        drop_last: bool,
        device: torch.device,
        num_workers: int,
        channels_last: bool = False,
        rank: int = 0,
        world: int = 1,
        balanced: bool = False,
    ):
        self.views, self.batch_size, self.seed, self.drop_last, self.balanced = views, batch_size, seed, drop_last, balanced
        self.rank, self.world = rank, world
        self.n, self.device, self.num_workers = len(data), device, num_workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if targets_follow_views(data, views):
            raise ConfigError(
                f"data.pipeline: the loader pipeline does not move {target_kind_of(data).noun} with their images; "
                "use data.pipeline=memory (raise data.memory_budget_mb if the split is larger than it)"
            )
        self.data = data.to(torch.device("cpu"))  # targets and side information are gathered here, by index
        if not hasattr(augment, "per_sample"):
            raise ConfigError(
                "data.pipeline: the loader pipeline augments one sample at a time, and data.augment has no per-sample "
                "form (a BatchAugment's per_sample); use data.pipeline=memory"
            )
        transform = augment.per_sample(data.sample_shape)
        self.dataset = _PerSampleViews(data, modality, transform, views, seed)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        sampler = _EpochOrder(
            self.data, self.seed, epoch, start_batch, self.batch_size, self.drop_last, self.rank, self.world, self.balanced
        )
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size // self.world,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),  # not the global RNG: resumable
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
            worker_init_fn=release_inherited_locks,  # a killed run must not stay locked by its workers
        )
        for views, index in loader:
            inputs = tuple(v.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format) for v in views)
            side = {name: values.to(self.device) for name, values in self.data.side_of(index).items()}
            yield Batch(inputs, self.data.targets[index].to(self.device), {"index": index.to(self.device)}, side)

    def state(self) -> dict[str, Any]:
        return {}  # augmentation is a pure function of (seed, epoch, index)

    def restore(self, state: dict[str, Any]) -> None:
        pass


class StreamPipeline:
    """Samples read from their files batch by batch in worker processes, augmented on the device as a whole batch.

    Rank r reads only its slice of every global batch; the augmentation draws its parameters for the whole
    global batch (the other ranks' samples as zeros), so N ranks compute what one process would. A sample that
    cannot be read was replaced in the read (data.on_bad_sample=replace); each is named through `log` and counted."""

    def __init__(
        self,
        data: Samples,
        augment: BatchAugment,
        modality: Modality,
        *,
        views: int,
        batch_size: int,
        seed: int,
        drop_last: bool,
        device: torch.device,
        channels_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        if targets_follow_views(data, views):
            raise ConfigError(
                f"data.pipeline: a streamed split does not move {target_kind_of(data).noun} with their images; use data.pipeline=memory"
            )
        self.data, self.augment, self.modality, self.views = data, augment, modality, views
        self.batch_size, self.seed, self.drop_last, self.device = batch_size, seed, drop_last, device
        self.rank, self.world = rank, world
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)  # the memory pipeline's
        self.replaced = 0  # samples that could not be read, replaced in their batch
        self.log: Callable[[str], None] = lambda line: None

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order = self.data.inputs.epoch_order(self.seed, epoch)
        chosen = list(batch_indices(len(self.data), self.batch_size, order=order, drop_last=self.drop_last, start_batch=start_batch))
        mine = [rank_slice(len(idx), self.rank, self.world) for idx in chosen]
        reads = self.data.inputs.iterate([idx[part] for idx, part in zip(chosen, mine, strict=True)])
        for idx, part, read in zip(chosen, mine, reads, strict=True):
            for what, why in read.bad:
                self.log(f"bad sample replaced: {what} ({why})")
            self.replaced += int((read.positions != idx[part].cpu()).sum())
            x = raise_if_stopped(read, self.device).to(self.device, non_blocking=True)
            x = self.modality.decode(in_global_batch(x, len(idx), part) if self.world > 1 else x)
            used = read.positions.to(self.data.targets.device)  # a replaced sample brings its own target
            views = tuple(self._view(x, part) for _ in range(self.views))
            yield Batch(views, self.data.targets[used], {"index": used.to(self.device)}, self.data.side_of(used))

    def _view(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        view = augmented_input(x, self.augment, self.modality, self.data, self.generator, part)
        return view.contiguous(memory_format=self.memory_format)

    def state(self) -> dict[str, Any]:
        return {"augment": self.generator.get_state().cpu(), "replaced": self.replaced}

    def restore(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["augment"])
        self.replaced = state.get("replaced", 0)

    def metrics(self) -> dict[str, int]:
        return {"bad_samples_replaced": self.replaced}


def held_out_views(data: Samples, augment: BatchAugment, modality: Modality, *, views: int, batch_size: int, seed: int) -> Pipeline:
    """Augmented views of a held-out split with a fixed seed (a validation loss), wherever its samples live."""
    if is_streamed(data):
        device = data.targets.device
        return StreamPipeline(data, augment, modality, views=views, batch_size=batch_size, seed=seed, drop_last=True, device=device)
    return MemoryPipeline(data, augment, modality, views=views, batch_size=batch_size, seed=seed, drop_last=True)


def fits_in_memory(data: Samples, budget_mb: int) -> bool:
    """Whether the split (its raw inputs) fits the memory pipeline's budget."""
    return data.inputs.numel() * data.inputs.element_size() <= budget_mb * 2**20


def make_pipeline(
    data: Samples,
    augment: BatchAugment,
    modality: Modality,
    *,
    kind: str,
    views: int,
    batch_size: int,
    seed: int,
    drop_last: bool,
    device: torch.device,
    num_workers: int,
    budget_mb: int,
    channels_last: bool,
    rank: int = 0,
    world: int = 1,
    balanced: bool = False,
    by_length: bool = False,
) -> Pipeline:
    """`kind` is memory, loader, stream or auto (memory when the split fits `budget_mb`; a split its data set
    streamed past the budget streams, any other the loader reads). `balanced`: class-balanced sampling (not streamed).
    `by_length`: batches of samples of like lengths, each cut to its longest (memory only)."""
    common = dict(views=views, batch_size=batch_size, seed=seed, drop_last=drop_last, channels_last=channels_last, rank=rank, world=world)
    if is_streamed(data):
        if balanced:
            raise ConfigError("data.sampler: balanced sampling draws from the whole split, and this one streams; set data.sampler=random")
        _refuse_grouping(by_length, "stream")
        return StreamPipeline(data.to(device), augment, modality, device=device, **common)
    if kind == "auto":
        kind = "memory" if fits_in_memory(data, budget_mb) else "loader"
    if kind == "memory":
        return MemoryPipeline(data.to(device), augment, modality, balanced=balanced, by_length=by_length, **common)
    _refuse_grouping(by_length, "loader")
    return LoaderPipeline(data, augment, modality, device=device, num_workers=num_workers, balanced=balanced, **common)


def _refuse_grouping(by_length: bool, kind: str) -> None:
    if by_length:
        raise ConfigError(
            f"data.group_by_length: batches are grouped and cut in the memory pipeline, and this split is read by the {kind} "
            "pipeline; set data.pipeline=memory (raise data.memory_budget_mb if needed) or drop it"
        )
