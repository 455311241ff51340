"""Streamed image splits: samples stay in their files and are decoded batch by batch, so memory stays flat
whatever the split's size.

A streamed split is an `ImageData` whose `inputs` is a `StreamedInputs`: a stand-in for the uint8 tensor that
knows the shape, reads any selection of samples on demand (`inputs[idx]`, `read`) and selects subsets without
reading (`unread_subset`). Everything that splits, subsets or labels data works on it unchanged. Two sources feed it:

- an image folder, listed once into a manifest (file list, classes) kept in the cache and reused while the
  folder is unchanged: the signature is the modification time of the split folder and of every folder below it,
  which changes whenever a file is added, removed or renamed (not when a file is rewritten in place);
- tar shards in the WebDataset convention (`<key>.<image ext>` and `<key>.cls` members), indexed once into each
  member's byte offset, so any sample is one seek away and a resumed run reads nothing it skipped.

A sample that cannot be read is replaced, deterministically, by the next readable sample of the same read
(or stops the run, with `on_bad_sample: stop`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from transferctl.errors import UsageError
from transferctl.fileio import atomic_write_bytes
from transferctl.processes import release_inherited_locks

BadSample = Literal["replace", "stop"]
MAX_REPLACEMENTS = 64  # unreadable samples in a row that a read skips before it gives up
STATISTICS_SAMPLES = 4096  # how many images a streamed split's mean and std are measured on (all of a smaller split)
DECODES = {"count": 0}  # samples decoded by this process: what tests count to prove a resume reads nothing twice


@dataclass(frozen=True)
class StreamOptions:
    """How a data set that can stream is read: given to it by `load_split` (the data config's stream settings)."""

    pipeline: str  # data.pipeline: stream always streams, auto past the budget, memory and loader never
    budget_mb: int
    on_bad_sample: BadSample = "replace"
    rebuild_manifest: bool = False
    num_workers: int = 2

    @property
    def may_stream(self) -> bool:
        return self.pipeline in ("stream", "auto")

    def streams(self, decoded_bytes: int) -> bool:
        return self.pipeline == "stream" or (self.pipeline == "auto" and decoded_bytes > self.budget_mb * 2**20)


# --------------------------------------------------------------------------- decoding

RESIZES = ("crop", "stretch", "letterbox")  # how an image reaches its square (`ImageDecoder`)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def scaled_size(image_size: int, crop_fraction: float) -> int:
    """The side `crop` resizes to before keeping the centre image_size: timm's floor(size / crop_pct) (a hair of slack
    so 224 / (224 / 256) is 256)."""
    return math.floor(image_size / crop_fraction + 1e-6)


def image_transform(image_size: int, channels: int, resize: str = "crop", interpolation: str = "bilinear", crop_fraction: float = 1.0):
    """PIL image -> uint8 (channels, image_size, image_size), converted to grey (PIL's "L") or RGB, then:
    `crop`: the shorter side resized (PIL, antialiased) to image_size / crop_fraction (floored: timm's `crop_pct`,
    a pretrained model's evaluation crop), the centre square of image_size kept (with crop_fraction 1, the identity on
    an image of that size already); `stretch`: the pixels (as a uint8 tensor) resized to image_size x image_size
    (torchvision's antialiased tensor resize), the aspect ratio lost; `letterbox`: the longer side resized (PIL) to
    image_size, the rest zero-padded evenly about the centre."""
    import torchvision.transforms as T

    if resize not in RESIZES or interpolation not in INTERPOLATIONS or not 0 < crop_fraction <= 1:
        raise UsageError(
            f"image decoding: resize {resize!r}, interpolation {interpolation!r} or crop fraction {crop_fraction} unknown; use one of "
            f"{RESIZES} and {INTERPOLATIONS}, and a fraction in (0, 1]"
        )
    mode = T.InterpolationMode(interpolation)
    convert = T.Grayscale(channels) if channels == 1 else T.Lambda(lambda im: im.convert("RGB"))
    if resize == "crop":
        scaled = scaled_size(image_size, crop_fraction)
        return T.Compose([convert, T.Resize(scaled, interpolation=mode), T.CenterCrop(image_size), T.PILToTensor()])
    if resize == "stretch":
        return T.Compose([convert, T.PILToTensor(), T.Lambda(lambda x: _stretch(x, image_size, mode))])
    return T.Compose([convert, T.Lambda(lambda im: _letterbox(im, image_size, mode)), T.PILToTensor()])


def _stretch(pixels: torch.Tensor, image_size: int, mode) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(pixels, [image_size, image_size], interpolation=mode, antialias=True)


def _letterbox(image, image_size: int, mode):
    import torchvision.transforms.functional as F

    width, height = image.size
    scale = image_size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = F.resize(image, [new_h, new_w], interpolation=mode, antialias=True)
    left, top = (image_size - new_w) // 2, (image_size - new_h) // 2
    return F.pad(resized, [left, top, image_size - new_w - left, image_size - new_h - top], fill=0)


class ImageDecoder:
    """Encoded bytes or a file -> a uint8 image of the configured size, reached by `resize` with `interpolation`
    (`image_transform`). Every image split decodes its files through one of these, and so does `Modality.read`."""

    def __init__(self, image_size: int, channels: int, resize: str = "crop", interpolation: str = "bilinear", crop_fraction: float = 1.0):
        self.image_size, self.channels, self.resize, self.interpolation = image_size, channels, resize, interpolation
        self.crop_fraction = crop_fraction
        self._transform = image_transform(image_size, channels, resize, interpolation, crop_fraction)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def options(self) -> str:
        """The decoding options as a cache key's part (size and channels alone for the default, as before)."""
        default = (self.resize, self.interpolation) == ("crop", "bilinear")
        crop = "" if self.crop_fraction == 1 else f":crop{self.crop_fraction}"
        return f"{self.image_size}:{self.channels}" + ("" if default else f":{self.resize}:{self.interpolation}") + crop

    def __call__(self, source: bytes | Path) -> torch.Tensor:
        from PIL import Image

        DECODES["count"] += 1
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            return self._transform(image)

    def decode(self, image) -> torch.Tensor:
        """An opened PIL image's pixels (what `__call__` gives for its file)."""
        return self._transform(image)

    def __getstate__(self) -> dict[str, Any]:  # the transform holds a lambda: rebuilt in the worker
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "crop_fraction": self.crop_fraction,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        defaults = {"resize": "crop", "interpolation": "bilinear", "crop_fraction": 1.0}  # a decoder pickled before them
        self.__init__(**{**defaults, **state})


# --------------------------------------------------------------------------- sources


class FolderSource:
    """Images in <folder>/<class>/**, in the order torchvision's ImageFolder lists them."""

    def __init__(self, folder: Path, files: Sequence[str]):
        # one numpy array, not a list of str: forked workers share its pages (no reference counts to touch)
        self.folder, self.files = folder, np.array([os.fsencode(f) for f in files])

    def name(self, entry: int) -> str:
        return str(self.open(entry))

    def open(self, entry: int) -> bytes | Path:
        return self.folder / os.fsdecode(self.files[entry])

    def epoch_order(self, entries: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        from transferctl.data.pipeline import epoch_order

        return epoch_order(len(entries), seed, epoch)  # the memory pipeline's order: the same views for a seed


class ShardSource:
    """Members of tar shards, each read by its byte offset: one seek per sample, no tar parsing on the hot path.

    An epoch reads the shards in a seeded order and shuffles samples within windows of `shuffle_buffer`
    consecutive ones (a shuffle buffer, made a pure function of the seed and the epoch so a resume is exact)."""

    def __init__(self, shards: Sequence[str], shard_of: torch.Tensor, offsets: torch.Tensor, sizes: torch.Tensor, shuffle_buffer: int):
        self.shards, self.shard_of, self.offsets, self.sizes = list(shards), shard_of, offsets, sizes
        self.shuffle_buffer = shuffle_buffer
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    def name(self, entry: int) -> str:
        return f"{self.shards[int(self.shard_of[entry])]} (member at byte {int(self.offsets[entry])})"

    def open(self, entry: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker: its own file handles
            self._files, self._pid = {}, os.getpid()
        shard = int(self.shard_of[entry])
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 - kept open for the worker's life
        handle = self._files[shard]
        handle.seek(int(self.offsets[entry]))
        data = handle.read(int(self.sizes[entry]))
        if len(data) != int(self.sizes[entry]):
            raise OSError("the shard ends inside this member (truncated)")
        return data

    def epoch_order(self, entries: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        shard_rank = torch.randperm(len(self.shards), generator=generator)
        by_shard = torch.sort(shard_rank[self.shard_of[entries].long()], stable=True).indices
        windows = [w[torch.randperm(len(w), generator=generator)] for w in by_shard.split(self.shuffle_buffer)]
        return torch.cat(windows) if windows else by_shard


# --------------------------------------------------------------------------- the split's inputs


@dataclass
class Read:
    """What reading some samples gives: the images (None when the read stopped), where each image came from (a
    bad sample's place holds the sample that replaced it), and the bad ones."""

    images: torch.Tensor | None
    positions: torch.Tensor  # the split position each image was read from
    bad: list[tuple[str, str]]  # (what, why) of each sample that could not be read
    decoded: int = 0  # images decoded by this read (in its worker process)
    error: str | None = None  # why the read stopped: the one-line error to raise


def _unreadable() -> tuple[type[BaseException], ...]:
    from PIL import Image

    # PIL's UnidentifiedImageError is an OSError; a decompression bomb is its own error
    return (OSError, ValueError, SyntaxError, EOFError, tarfile.TarError, Image.DecompressionBombError)


UNREADABLE = _unreadable()


class StreamedInputs:
    """A split's samples, read from their source on demand; indexes like the uint8 tensor it stands for."""

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, source: FolderSource | ShardSource, entries: torch.Tensor, decoder: ImageDecoder, options: StreamOptions):
        self.source, self.entries, self.decoder, self.options = source, entries, decoder, options

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.entries), *self.decoder.shape))

    def __len__(self) -> int:
        return len(self.entries)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return 1

    def to(self, device: torch.device) -> StreamedInputs:
        return self  # the samples stay in their files; batches go to the device

    def unread_subset(self, indices: torch.Tensor) -> StreamedInputs:
        """A subset, without reading anything."""
        return StreamedInputs(self.source, self.entries[indices.cpu()], self.decoder, self.options)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        return self.source.epoch_order(self.entries, seed, epoch)

    def __getitem__(self, key: int | slice | torch.Tensor) -> torch.Tensor:
        """The decoded samples at `key`, read now in this process."""
        positions = torch.arange(len(self))[key.cpu() if isinstance(key, torch.Tensor) else key]
        read = self.read(positions.reshape(-1))
        images = raise_if_stopped(read)
        return images[0] if positions.dim() == 0 else images

    def read(self, positions: torch.Tensor) -> Read:
        """Decode the samples at `positions`. A bad one is replaced by the next readable sample of the split after
        it (cyclically): deterministic, and the same whatever the number of ranks and workers, so every read keeps
        its size and a resume its place. With on_bad_sample=stop the read stops at the first bad one."""
        images, used, bad, decoded = [], [], [], 0
        for position in positions.tolist():
            for attempt in range(min(len(self), MAX_REPLACEMENTS + 1)):
                candidate = (position + attempt) % len(self)
                entry = int(self.entries[candidate])
                try:
                    decoded += 1
                    images.append(self.decoder(self.source.open(entry)))
                    used.append(candidate)
                    break
                except UNREADABLE as exc:
                    bad.append((self.source.name(entry), " ".join(str(exc).split()) or type(exc).__name__))
                    if self.options.on_bad_sample == "stop":
                        what, why = bad[-1]
                        fix = "remove or replace it, or set data.on_bad_sample=replace to skip such samples"
                        return Read(None, positions, bad, decoded, f"cannot read {what} ({why}); {fix}")
            else:
                what, why = bad[-1]
                error = f"{len(bad)} samples in a row are unreadable, the last {what} ({why}); check the data set's files"
                return Read(None, positions, bad, decoded, error)
        stacked = torch.stack(images) if images else torch.empty((0, *self.decoder.shape), dtype=torch.uint8)
        return Read(stacked, torch.tensor(used, dtype=torch.long), bad, decoded)

    def iterate(self, index_batches: Sequence[torch.Tensor], num_workers: int | None = None) -> Iterator[Read]:
        """The reads of `index_batches`, decoded in DataLoader workers a few batches ahead, in order."""
        workers = self.options.num_workers if num_workers is None else num_workers
        loader = DataLoader(
            _Reads(self),
            sampler=[batch.cpu() for batch in index_batches],
            batch_size=None,
            collate_fn=_collate_read,
            worker_init_fn=release_inherited_locks,  # a killed run must not stay locked by its workers
            generator=torch.Generator().manual_seed(0),  # its own: a loader must not draw from the global RNG (resume)
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )
        yield from loader


class _Reads(Dataset):
    def __init__(self, inputs: StreamedInputs):
        self.inputs = inputs

    def __getitem__(self, positions: torch.Tensor) -> Read:
        return self.inputs.read(positions)


def _collate_read(read: Read) -> Read:
    return read


def raise_if_stopped(read: Read, device: torch.device | None = None) -> torch.Tensor:
    """The images of a read, or the one-line error of the sample that stopped it. Under torchrun (given the
    device of the collective) every rank learns whether any rank's read stopped, so all stop together instead
    of waiting for the one that failed."""
    from transferctl.distributed import any_rank, world

    stopped = read.images is None
    if device is not None and world().distributed and any_rank(stopped, device) and not stopped:
        raise UsageError("another rank could not read a sample (its error says which); fix the data and run again")
    if stopped:
        raise UsageError(read.error or "a read of samples stopped")
    return read.images


def is_streamed(data: Any) -> bool:
    return isinstance(getattr(data, "inputs", None), StreamedInputs)


# --------------------------------------------------------------------------- folder manifests


def _folder_signature(folder: Path, dirs: Sequence[str]) -> list[int]:
    return [os.stat(folder / d).st_mtime_ns for d in dirs]


def folder_manifest(name: str, folder: Path, rebuild: bool = False) -> dict[str, Any]:
    """The file list and classes of an image folder, listed once and kept in the cache; reused while the
    modification times of the folder and its subfolders are unchanged (`rebuild`: list it again anyway)."""
    cache = manifest_cache_path(folder)
    if cache.is_file() and not rebuild:
        try:
            manifest = json.loads(cache.read_text())
            if manifest.get("signature") == _folder_signature(folder, manifest["dirs"]):
                return manifest
        except (OSError, ValueError, KeyError):
            pass  # a folder removed or a cache from elsewhere: list it again
    manifest = _list_folder(name, folder)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, json.dumps(manifest).encode())
    return manifest


def manifest_cache_path(folder: Path) -> Path:
    from transferctl.data.datasets import default_cache_dir

    return default_cache_dir() / "manifests" / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]}.json"


def _list_folder(name: str, folder: Path) -> dict[str, Any]:
    """torchvision ImageFolder's listing (sorted classes, sorted walk), and every folder's modification time."""
    signature = [os.stat(folder).st_mtime_ns]  # each folder's time is taken before it is listed
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise UsageError(f"data set '{name}': {folder} has no class folders; put images in {folder}/<class>/")
    files, targets, dirs = [], [], ["."]
    for target, cls in enumerate(classes):
        for here, names, mtime in sorted(_walk(folder / cls)):
            dirs.append(os.path.relpath(here, folder))
            signature.append(mtime)
            for file in sorted(names):
                if file.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(here, file), folder))
                    targets.append(target)
    if not files:
        raise UsageError(f"data set '{name}': no images under {folder} (looked for {', '.join(IMG_EXTENSIONS)}); add some or fix data.root")
    return {"version": 1, "classes": classes, "files": files, "targets": targets, "dirs": dirs, "signature": signature}


def _walk(top: Path) -> Iterator[tuple[str, list[str], int]]:
    """(folder, its file names, its modification time taken before listing it) for `top` and every folder below
    (the order os.walk gives, once sorted): a file added while the listing runs leaves a newer time behind, so
    the next run lists again."""
    mtime = os.stat(top).st_mtime_ns
    files, folders = [], []
    for entry in os.scandir(top):
        (folders if entry.is_dir() else files).append(entry.name)
    yield str(top), files, mtime
    for sub in folders:
        yield from _walk(top / sub)


def streamed_statistics(inputs: StreamedInputs, key: str) -> dict[str, tuple[float, ...]]:
    """Per-channel mean and std of a streamed split: of every image of a small split, else of a seeded sample of
    STATISTICS_SAMPLES; kept in the cache under `key` (what identifies the files and the decoding), so measured once."""
    from transferctl.data.datasets import default_cache_dir, image_statistics

    cache = default_cache_dir() / "statistics" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if cache.is_file():
        return {k: tuple(v) for k, v in json.loads(cache.read_text()).items()}
    n = len(inputs)
    chosen = (
        torch.arange(n) if n <= STATISTICS_SAMPLES else torch.randperm(n, generator=torch.Generator().manual_seed(0))[:STATISTICS_SAMPLES]
    )
    images = torch.cat([raise_if_stopped(read) for read in inputs.iterate(chosen.split(256))])
    statistics = image_statistics(images)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, json.dumps(statistics).encode())
    return statistics


def streamed_images(
    name: str, inputs: StreamedInputs, targets: torch.Tensor, classes: Sequence[str], hflip: bool, key: str, decoding: Any = None
):
    """A streamed image split, or, when the options keep it in memory, the same split decoded into one tensor
    (`decoding`: the `ImageDecoding` its decoder follows, where not the default)."""
    from transferctl.data.datasets import image_statistics
    from transferctl.modalities.image import ImageData

    if inputs.options.streams(inputs.numel()):
        statistics = streamed_statistics(inputs, key)
        return ImageData(inputs=inputs, targets=targets, classes=tuple(classes), **statistics, hflip=hflip, decoding=decoding)
    images = torch.cat([raise_if_stopped(read) for read in inputs.iterate(torch.arange(len(inputs)).split(256))])
    return ImageData(inputs=images, targets=targets, classes=tuple(classes), **image_statistics(images), hflip=hflip, decoding=decoding)


def streamed_folder(
    name: str, folder: Path, decoder: ImageDecoder, options: StreamOptions
) -> tuple[StreamedInputs, torch.Tensor, list[str], str]:
    """An image folder's inputs (decoded by `decoder`), targets, classes, and the key its statistics are kept under."""
    manifest = folder_manifest(name, folder, options.rebuild_manifest)
    inputs = StreamedInputs(FolderSource(folder, manifest["files"]), torch.arange(len(manifest["files"])), decoder, options)
    key = f"folder:{folder.resolve()}:{manifest['signature']}:{len(manifest['files'])}:{decoder.options}"
    return inputs, torch.tensor(manifest["targets"], dtype=torch.long), manifest["classes"], key
