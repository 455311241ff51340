"""Data sets, loaded through torchvision into one uint8 tensor each, plus splits and label subsets.

Every registered data set declares its modality and returns that modality's `Samples` for its train or test
split (here: `ImageData`). Small image data sets (the MNIST family, CIFAR-10, modest image folders) fit in
memory many times over, so the whole split lives in one tensor and batches are drawn by index.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import torch
import torchvision
from pydantic import Field, PositiveInt

from transferctl.data.samples import Samples
from transferctl.data.shards import index_shards, shard_paths, split_shards
from transferctl.data.stream import ImageDecoder, ShardSource, StreamedInputs, StreamOptions, is_streamed, streamed_folder, streamed_images
from transferctl.errors import ConfigError, UsageError
from transferctl.fileio import atomic_write_bytes
from transferctl.modalities.image import ImageData, ImageDecoding, Interpolation
from transferctl.registry import DATASETS

DATA_DIR_ENV = "TRANSFERCTL_DATA_DIR"


def default_root() -> Path:
    """$TRANSFERCTL_DATA_DIR, else a per-user data folder."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "transferctl" / "data"


def missing_data(name: str, root: Path, looked_for: str, downloadable: bool = False) -> UsageError:
    """The one-line error of a data set that is not where the config points; only torchvision's data sets download."""
    online = " (or set data.download=true when online)" if downloadable else ""
    return UsageError(
        f"data set '{name}' not found: looked for {root / looked_for}; point data.root or ${DATA_DIR_ENV} at a folder that holds it{online}"
    )


def _torchvision(cls, name: str, root: Path, download: bool, train: bool, looked_for: str):
    try:
        return cls(root=str(root), train=train, download=download)
    except (RuntimeError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        if not download and "not found" in reason.lower():
            raise missing_data(name, root, looked_for, downloadable=True) from None
        if download and ("download" in reason.lower() or isinstance(exc, OSError)):
            raise UsageError(
                f"data set '{name}': download into {root} failed ({reason}); copy the files there and set data.download=false"
            ) from None
        raise UsageError(
            f"data set '{name}' under {root / looked_for} is unreadable ({reason}); replace the files with a complete copy"
        ) from None


def _mnist_like(cls, name: str, root: Path, download: bool, train: bool, hflip: bool, mean: float, std: float) -> ImageData:
    ds = _torchvision(cls, name, root, download, train, f"{cls.__name__}/raw")
    return ImageData(
        inputs=ds.data.unsqueeze(1).contiguous(),
        targets=ds.targets.long(),
        classes=tuple(ds.classes),
        mean=(mean,),
        std=(std,),
        hflip=hflip,
    )


@DATASETS.register(modality="image")
def mnist(root: Path, download: bool, train: bool) -> ImageData:
    """MNIST handwritten digits, 28x28 grey, 10 classes (60,000 train / 10,000 test)."""
    return _mnist_like(torchvision.datasets.MNIST, "mnist", root, download, train, False, 0.1307, 0.3081)


@DATASETS.register(modality="image")
def fashion_mnist(root: Path, download: bool, train: bool) -> ImageData:
    """Fashion-MNIST clothing images, 28x28 grey, 10 classes (60,000 train / 10,000 test)."""
    return _mnist_like(torchvision.datasets.FashionMNIST, "fashion_mnist", root, download, train, True, 0.2860, 0.3530)


SAMPLE_DIR = Path(__file__).parent / "sample"


@DATASETS.register(modality="image")
def mnist_sample(root: Path, download: bool, train: bool) -> ImageData:
    """A 2,500/500-image sample of real MNIST shipped with transferctl: the offline quickstart's data."""
    cache = default_cache_dir() / "mnist_sample"
    raw = cache / "MNIST" / "raw"
    for packed in (SAMPLE_DIR / "MNIST" / "raw").glob("*.gz"):
        target = raw / packed.stem
        if not target.exists():
            raw.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, gzip.decompress(packed.read_bytes()))
    return _mnist_like(torchvision.datasets.MNIST, "mnist_sample", cache, False, train, False, 0.1307, 0.3081)


@DATASETS.register(modality="image")
def cifar10(root: Path, download: bool, train: bool) -> ImageData:
    """CIFAR-10, 32x32 colour, 10 classes (50,000 train / 10,000 test)."""
    ds = _torchvision(torchvision.datasets.CIFAR10, "cifar10", root, download, train, "cifar-10-batches-py")
    return ImageData(
        inputs=torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
        targets=torch.tensor(ds.targets, dtype=torch.long),
        classes=tuple(ds.classes),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        hflip=True,
    )


@DATASETS.register(modality="image")
def image_folder(
    root: Path,
    download: bool,
    train: bool,
    image_size: PositiveInt = 64,
    channels: Literal[1, 3] = 3,
    train_dir: str = "train",
    test_dir: str = "test",
    hflip: bool = True,
    labels_file: str | None = None,
    stream: StreamOptions | None = None,
    target_kind: str = "class",
    interpolation: Interpolation = "bilinear",
    crop_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0,
) -> ImageData:
    """Your own images: <root>/<train_dir>/<class>/*.png and <root>/<test_dir>/<class>/*, resized (shorter side, to
    image_size / crop_fraction) and centre-cropped to image_size. With `labels_file` (multi-label):
    <root>/<train_dir>/<labels_file>, a CSV `file,labels` naming each image under the split folder and its labels
    separated by `|`, and the same under <test_dir>."""
    folder = split_folder("image_folder", root, train, train_dir, test_dir)
    decoding = ImageDecoding(image_size, channels, "crop", interpolation, crop_fraction)
    decode = dict(resize="crop", interpolation=interpolation, crop_fraction=crop_fraction)
    if labels_file is not None or target_kind == "class_set":
        files, targets, classes = user_label_sets("image_folder", root, folder, train_dir, labels_file)
        images = decode_image_files("image_folder", files, image_size, channels, **decode)
        return ImageData(images, targets, classes, **image_statistics(images), hflip=hflip, target_kind="class_set", decoding=decoding)
    if stream is not None and stream.may_stream:  # listed through its manifest; streamed when the pipeline says so
        decoder = ImageDecoder(image_size, channels, **decode)
        inputs, targets, classes, key = streamed_folder("image_folder", folder, decoder, stream)
        if stream.streams(inputs.numel()):
            return streamed_images("image_folder", inputs, targets, classes, hflip, key, decoding)
    try:
        ds = torchvision.datasets.ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise UsageError(f"data set 'image_folder': {exc}") from None
    images = decode_image_files("image_folder", [Path(path) for path, _ in ds.samples], image_size, channels, **decode)
    return ImageData(
        inputs=images,
        targets=torch.tensor(ds.targets, dtype=torch.long),
        classes=tuple(ds.classes),
        **image_statistics(images),
        hflip=hflip,
        decoding=decoding,
    )


@DATASETS.register(modality="image")
def shards(
    root: Path,
    download: bool,
    train: bool,
    urls: str | None = None,
    test_urls: str | None = None,
    image_size: PositiveInt = 64,
    channels: Literal[1, 3] = 3,
    hflip: bool = True,
    shuffle_buffer: PositiveInt = 10_000,
    stream: StreamOptions | None = None,
) -> ImageData:
    """Tar shards (WebDataset convention: <key>.jpg|png and <key>.cls): data.urls and data.test_urls name them
    (`/data/train-{000000..000099}.tar`), else the manifest `transferctl data pack` wrote in data.root."""
    pattern = urls if train else test_urls
    paths = (
        shard_paths(pattern, "data.urls" if train else "data.test_urls") if pattern else split_shards(root, "train" if train else "test")
    )
    index = index_shards(paths)
    source = ShardSource(index.shards, index.shard_of, index.offsets, index.sizes, shuffle_buffer)
    options = stream or StreamOptions("memory", budget_mb=0)
    inputs = StreamedInputs(source, torch.arange(len(index.labels)), ImageDecoder(image_size, channels), options)
    signature = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in index.shards]
    return streamed_images("shards", inputs, index.labels, index.classes, hflip, key=f"shards:{signature}:{image_size}:{channels}")


def user_label_sets(
    name: str, root: Path, folder: Path, train_dir: str, labels_file: str | None
) -> tuple[list[Path], torch.Tensor, tuple[str, ...]]:
    """A user's folder of files with several labels each: the files its labels file lists, their multi-hot targets and
    the training split's classes (`label_sets.folder_label_sets`)."""
    from transferctl.data.label_sets import folder_label_sets

    if labels_file is None:
        raise UsageError(
            f"data set '{name}': a class folder gives one label per file, and the task wants a set of labels; set data.labels_file "
            f"(a CSV file,labels in each split folder, labels separated by |)"
        )
    return folder_label_sets(name, folder, root / train_dir, labels_file)


def split_folder(name: str, root: Path, train: bool, train_dir: str, test_dir: str) -> Path:
    """The folder of the train or test split of a user's data set under `root`: two different, existing folders."""
    if not train_dir or not test_dir or Path(train_dir) == Path(test_dir):
        raise UsageError(f"data.train_dir={train_dir!r} and data.test_dir={test_dir!r} must be two different folders under data.root")
    folder = root / (train_dir if train else test_dir)
    if not folder.is_dir():
        raise missing_data(name, root, train_dir if train else test_dir)
    return folder


def image_statistics(images: torch.Tensor) -> dict[str, tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, as pixels in [0, 1]."""
    as_float, dims = images.float() / 255, (0, 2, 3)
    return {"mean": tuple(as_float.mean(dims).tolist()), "std": tuple(as_float.std(dims).clamp_min(1e-3).tolist())}


def decode_image_files(
    name: str | None,
    paths: list[Path],
    image_size: int,
    channels: int,
    resize: str = "crop",
    interpolation: str = "bilinear",
    crop_fraction: float = 1.0,
    *,
    cache: bool = True,
) -> torch.Tensor:
    """Image files as one uint8 (N, channels, image_size, image_size) tensor, each brought to its square by `resize`
    (`ImageDecoder`; `crop`: resized (shorter side) and centre-cropped), kept decoded in the cache so the next run
    skips decoding (`cache=False`: not kept, what `Modality.read` asks). A file that cannot be decoded is a one-line
    error naming it (and data set `name`, where a data set reads it)."""
    decoder = ImageDecoder(image_size, channels, resize, interpolation, crop_fraction)  # the streamed splits' too: the same pixels

    def decode_all() -> torch.Tensor:
        if not paths:
            return torch.empty((0, *decoder.shape), dtype=torch.uint8)
        return torch.stack([_decode(name, path, decoder) for path in paths])

    return cached_decoding(paths, decoder.options, decode_all) if cache else decode_all()


def cached_decoding(paths: list[Path], options: str, decode_all: Callable[[], Any]) -> Any:
    """`decode_all()` of some files (a tensor or a dict of them), kept in the cache: the next run with the same files and decoding `options`
    loads the tensor instead."""
    cache = _decoded_cache_path(paths, options)
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    decoded = decode_all()
    buffer = io.BytesIO()
    torch.save(decoded, buffer)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, buffer.getvalue())
    return decoded


def _decoded_cache_path(paths: list[Path], options: str) -> Path:
    """Where the decoded tensor of some files is kept. The key covers every file's path, size and modification
    time, and the decoding options: any change decodes anew."""
    digest = hashlib.sha256(options.encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return default_cache_dir() / "decoded" / f"{digest.hexdigest()[:32]}.pt"


def _decode(name: str | None, path: Path, decoder: ImageDecoder) -> torch.Tensor:
    from transferctl.data.stream import UNREADABLE

    try:
        return decoder(path)
    except UNREADABLE as exc:  # PIL's UnidentifiedImageError is an OSError
        if name is None:
            raise UsageError(f"cannot read {path} as an image ({type(exc).__name__}); give an image file (PNG, JPEG, ...)") from None
        raise UsageError(f"data set '{name}': cannot read {path} ({type(exc).__name__}); remove or replace it") from None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transferctl"


# --------------------------------------------------------------------------- splits and subsets


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint (train, val) indices over a split of `n` images."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * val_fraction)
    return order[n_val:].sort().values, order[:n_val].sort().values


def stratified_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` images of every class, drawn with a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        if len(members) < per_class:
            raise UsageError(f"data.labels_per_class={per_class} is larger than class {cls}'s {len(members)} training images; lower it")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def long_tailed_subset(labels: torch.Tensor, num_classes: int, ratio: float, seed: int) -> torch.Tensor:
    """Indices of a long-tailed subset (CIFAR-LT's construction): class i keeps n_max * ratio^(-i / (C - 1)) of its
    samples (at least one), n_max being the largest class's count, drawn with a seeded generator; the higher class
    indices become the tail, `ratio` the head's count over the tail's."""
    generator = torch.Generator().manual_seed(seed + 900_001)
    labels = labels.cpu()
    n_max = int(torch.bincount(labels, minlength=num_classes).max())
    chosen = []
    for cls in range(num_classes):
        members = (labels == cls).nonzero().flatten()
        keep = max(1, int(n_max * ratio ** (-cls / max(num_classes - 1, 1))))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:keep]])
    return torch.cat(chosen).sort().values


def seeded_subset(n: int, count: int, seed: int) -> torch.Tensor:
    """Indices of `count` of `n` samples, drawn with a seeded generator, in stored order."""
    if count > n:
        raise UsageError(f"data.labeled_samples={count} is more than the {n} training samples; lower it")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values


# --------------------------------------------------------------------------- from a data config


def data_root(data_cfg) -> Path:
    """The folder a data config reads: data.root, else $TRANSFERCTL_DATA_DIR, else a per-user folder."""
    return (Path(data_cfg.root).expanduser() if data_cfg.root else default_root()).resolve()


def load_split(data_cfg, train: bool, fitted: dict | None = None, *, target_kind: str | None = None, validation: bool = False) -> Samples:
    """The whole train or test split of the configured data set; `fitted`: a trained run's fitted state, which a
    data set may read its split with directly (text: the run's tokenizer, whatever data.tokenizer names).
    `target_kind`: the kind of target the run's task trains on, for a data set that can give several (None: its
    default). `validation`: the data set's own validation split (one that `provides_validation`).
    A data set that can stream gets the stream settings, and streams the split when the pipeline asks for it."""
    stream = stream_options(data_cfg)
    context: dict[str, Any] = {"target_kind": target_kind} if target_kind is not None else {}
    if validation:
        context["validation"] = True
    data = DATASETS.build(
        data_cfg.name,
        data_cfg.options,
        root=data_root(data_cfg),
        download=data_cfg.download,
        train=train,
        fitted=fitted,
        stream=stream,
        **context,
    )
    if target_kind is not None and data.target_kind != target_kind:
        raise ConfigError(
            f"data: data set '{data_cfg.name}' has targets of kind '{data.target_kind}', and the task trains on targets of kind "
            f"'{target_kind}'; pick a data set with {target_kind} targets, or another task"
        )
    if stream.pipeline == "stream" and not is_streamed(data):
        raise ConfigError(
            f"data.pipeline=stream: data set '{data_cfg.name}' is read into memory, it does not stream (image_folder and shards do); "
            "set data.pipeline=memory"
        )
    return data


def provides_validation(data_cfg) -> bool:
    """Whether the configured data set gives its own validation split (`DATASETS.register(validation=True)`, or
    `validation=` a function of the data root and options that says whether these files hold one: an optional dev
    file), which training then uses instead of cutting `val_fraction` from the training split."""
    name = data_cfg.name
    entry = DATASETS.get(name, where="data")
    gives = entry.meta.get("validation")
    if callable(gives):
        gives = gives(data_root(data_cfg), data_cfg.options)
    if not gives:
        return False
    if "validation" not in inspect.signature(entry.fn).parameters:
        raise ConfigError(
            f"data set '{name}' is registered with validation=True and takes no `validation` argument; "
            f"add `validation: bool = False` to it and return the validation split when it is true"
        )
    return True


def stream_options(data_cfg) -> StreamOptions:
    """What a data set that can stream needs to know: whether to, and how to treat what it cannot read."""
    return StreamOptions(
        data_cfg.pipeline,
        budget_mb=data_cfg.memory_budget_mb,
        on_bad_sample=data_cfg.on_bad_sample,
        rebuild_manifest=data_cfg.rebuild_manifest,
        num_workers=data_cfg.num_workers,
    )


def _train_and_val(data_cfg, target_kind: str | None) -> tuple[Samples, Samples]:
    """The training split (long-tailed with `imbalance`) and the held-out val split: the data set's own validation split
    where it has one, else a seeded `val_fraction` cut from the training split."""
    full = load_split(data_cfg, train=True, target_kind=target_kind)
    if data_cfg.imbalance:  # before the val cut: the held-out part is as long-tailed as the data it is cut from
        if full.target_kind != "class" or not full.num_classes or is_streamed(full):
            raise ConfigError(f"data.imbalance: data set '{data_cfg.name}' has no class per sample held in memory here; drop it")
        full = full.subset(long_tailed_subset(full.targets, full.num_classes, data_cfg.imbalance, data_cfg.seed))
    if provides_validation(data_cfg):
        return full, load_split(data_cfg, train=True, target_kind=target_kind, validation=True)
    train_idx, val_idx = split_train_val(len(full), data_cfg.val_fraction, data_cfg.seed)
    return full.subset(train_idx), full.subset(val_idx)


class TrainingData(NamedTuple):
    train: Samples
    val: Samples
    unlabeled: Samples | None  # when asked for: the training part (labelled subset or not) without labels


def load_training_data(data_cfg, labelled_subset: bool, unlabeled: bool = False, target_kind: str | None = None) -> TrainingData:
    """(train, val, unlabeled) from the training split, read once: a seeded held-out val part; when asked
    for, a stratified `labels_per_class` subset of the rest, and every image of the rest with its label
    replaced by NO_LABEL (what semi-supervised fine-tuning may learn from without seeing more labels).
    `labeled_samples` draws a seeded subset of that many instead, whatever the targets are.
    `target_kind`: the task's, for a data set that can give several. The test split is never touched."""
    train, val = _train_and_val(data_cfg, target_kind)
    pool = train.without_targets() if unlabeled else None
    if labelled_subset and data_cfg.labels_per_class:
        train = train.subset(stratified_subset(train.targets, data_cfg.labels_per_class, data_cfg.seed))
    if labelled_subset and data_cfg.labeled_samples:
        train = train.subset(seeded_subset(len(train), data_cfg.labeled_samples, data_cfg.seed))
    return TrainingData(train, val, pool)


def load_unlabeled(data_cfg) -> Samples:
    """Every training image outside the val part, without its label."""
    return load_training_data(data_cfg, labelled_subset=False, unlabeled=True).unlabeled
