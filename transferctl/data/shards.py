"""Tar shards in the WebDataset convention: writing them (`transferctl data pack`) and indexing them for reading.

A shard is a plain tar whose members come in groups that share a key: `<key>.<image ext>` and `<key>.cls` (the
class index as text). `pack` writes an image folder's splits into shards of `shard_size` samples and a
`manifest.json` beside them: the classes, counts, and per shard its sample count, size, SHA-256, and every
member's byte offset, which is what lets a streamed run read any sample with one seek. Shards written by other
tools are indexed the same way once (the index is cached while the shard's size and modification time hold).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand
from torchvision.datasets.folder import IMG_EXTENSIONS

from transferctl.data.stream import ImageDecoder, folder_manifest
from transferctl.errors import UsageError
from transferctl.fileio import atomic_write_bytes

MANIFEST = "manifest.json"
PROGRESS = ".pack"  # a pack in progress: its plan and a record of each whole shard
FORMAT = "transferctl-shards/1"


@dataclass(frozen=True)
class ShardIndex:
    """Every sample of some shards: which shard, where its image member starts, how long it is, its label."""

    shards: list[str]
    shard_of: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]


# --------------------------------------------------------------------------- reading


def shard_paths(pattern: str, where: str) -> list[Path]:
    """The shards a WebDataset-style pattern names (`train-{000000..000099}.tar`); every one must exist."""
    paths = [Path(p).expanduser() for p in braceexpand(pattern)]
    missing = [p for p in paths if not p.is_file()]
    if not paths or len(missing) == len(paths):
        raise UsageError(f"{where}={pattern!r} names no existing shard; check the path (brace ranges like {{000000..000009}} are expanded)")
    if missing:
        raise UsageError(
            f"{where}: {len(missing)} of {len(paths)} shards are missing, the first {missing[0]}; fix the pattern or the folder"
        )
    return paths


def split_shards(root: Path, split: str) -> list[Path]:
    """The shards of one split of a folder `pack` wrote, from its manifest."""
    manifest = read_manifest(root)
    if manifest is None:
        raise UsageError(
            f"data set 'shards': no {MANIFEST} in {root}; set data.urls and data.test_urls, or write shards with `transferctl data pack`"
        )
    if split not in manifest["splits"]:
        raise UsageError(
            f"data set 'shards': {root / MANIFEST} has no '{split}' split (it has {', '.join(manifest['splits'])}); set data.urls"
        )
    return [root / shard["file"] for shard in manifest["splits"][split]["shards"]]


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is unreadable ({exc}); pack the shards again") from None
    return manifest if manifest.get("format") == FORMAT else None


def index_shards(paths: Sequence[Path]) -> ShardIndex:
    """The sample index of `paths`: from the manifest `pack` wrote beside them where it describes a shard as it
    is on disk, else by reading the shard's tar headers once (cached)."""
    shard_of, offsets, sizes, labels = [], [], [], []
    classes: tuple[str, ...] = ()
    manifests: dict[Path, dict[str, Any]] = {}
    for number, path in enumerate(paths):
        if path.parent not in manifests:
            manifests[path.parent] = _shards_in_manifest(path.parent)
        entry = manifests[path.parent].get(path.name)
        if entry is None or entry["bytes"] != path.stat().st_size:
            entry = _scanned_index(path)
        classes = classes or tuple(entry.get("classes", ()))
        shard_of += [number] * len(entry["offsets"])
        offsets += entry["offsets"]
        sizes += entry["sizes"]
        labels += entry["labels"]
    if not offsets:
        raise UsageError(f"the shards {paths[0]}... hold no images; pack an image folder into them with `transferctl data pack`")
    labels_t = torch.tensor(labels, dtype=torch.long)
    if not classes:
        classes = tuple(str(i) for i in range(int(labels_t.max()) + 1))
    return ShardIndex(
        [str(p) for p in paths], torch.tensor(shard_of, dtype=torch.int32), torch.tensor(offsets), torch.tensor(sizes), labels_t, classes
    )


def _shards_in_manifest(root: Path) -> dict[str, dict[str, Any]]:
    manifest = read_manifest(root)
    if manifest is None:
        return {}
    return {s["file"]: {**s, "classes": manifest["classes"]} for split in manifest["splits"].values() for s in split["shards"]}


def _scanned_index(path: Path) -> dict[str, Any]:
    """Offsets, sizes and labels of a shard's image members, read from its tar headers; cached by size and mtime."""
    from transferctl.data.datasets import default_cache_dir

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    cache = default_cache_dir() / "shard-index" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key_, ext = _key_and_extension(member.name)
                if member.isfile() and "." + ext.lower() in IMG_EXTENSIONS:
                    images[key_] = (member.offset_data, member.size)
                elif member.isfile() and ext == "cls":
                    labels[key_] = int(tar.extractfile(member).read().decode().strip())
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        if not images:
            raise UsageError(f"shard {path} is unreadable ({exc}); replace it or pack the data again") from None
        # a truncated shard: the samples before the damage are kept, those without their label left out
    keys = [k for k in images if k in labels]
    entry = {"offsets": [images[k][0] for k in keys], "sizes": [images[k][1] for k in keys], "labels": [labels[k] for k in keys]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, json.dumps(entry).encode())
    return entry


def _key_and_extension(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is the path up to the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PackResult:
    dest: Path
    images: int
    shards: int
    reused_shards: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "dest": str(self.dest),
            "images": self.images,
            "shards": self.shards,
            "reused_shards": self.reused_shards,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images / max(self.seconds, 1e-9), 1),
        }


def pack(
    source: Path,
    dest: Path,
    *,
    shard_size: int = 10_000,
    image_size: int | None = None,
    channels: int = 3,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> PackResult:
    """Write the image folder `source` (train/ and test/ of <class>/ folders) into tar shards under `dest`.

    Samples go into the shards in a seeded random order (the WebDataset convention: shuffled before sharding),
    so every shard holds every class and a shard-by-shard read with a shuffle buffer mixes them; each member's
    key is its place in the folder's listing. Resumable: a shard is written under a temporary name and renamed
    when whole, then recorded in `dest/.pack/`, so an interrupted pack continues after its last whole shard."""
    started = time.perf_counter()
    splits = {s: source / s for s in ("train", "test") if (source / s).is_dir()}
    if not splits:
        raise UsageError(f"data pack: {source} has no train/ or test/ folder of <class>/ images; point SRC at such a folder")
    listings = {split: folder_manifest("data pack", folder) for split, folder in splits.items()}
    classes = listings[next(iter(listings))]["classes"]
    for split, listing in listings.items():
        unknown = sorted(set(listing["classes"]) - set(classes))
        if unknown:
            raise UsageError(
                f"data pack: {splits[split]} has classes that train/ lacks ({', '.join(unknown)}); give both splits the same classes"
            )
    plan = {
        "source": str(source.resolve()),
        "shard_size": shard_size,
        "image_size": image_size,
        "channels": channels if image_size else None,
        "order_seed": 0,
        "splits": {split: {"count": len(m["files"]), "signature": m["signature"]} for split, m in listings.items()},
    }
    dest.mkdir(parents=True, exist_ok=True)
    done = _resume_point(dest, plan)
    (dest / PROGRESS).mkdir(exist_ok=True)
    atomic_write_bytes(dest / PROGRESS / "plan.json", json.dumps(plan).encode())
    total = sum(len(m["files"]) for m in listings.values())
    count = lambda: sum(s["count"] for shards in done.values() for s in shards)
    reused = sum(len(shards) for shards in done.values())
    progress(count(), total)
    encoder = _Encoder(image_size, channels) if image_size else None
    with get_context("fork").Pool(min(2, os.cpu_count() or 1)) if encoder else _Serial() as pool:
        for split, listing in listings.items():
            label_of = [classes.index(name) for name in listing["classes"]]  # by name: a split may lack a class
            order = torch.randperm(len(listing["files"]), generator=torch.Generator().manual_seed(plan["order_seed"])).tolist()
            chunks = [order[i : i + shard_size] for i in range(0, len(order), shard_size)]
            finished = done.setdefault(split, [])
            for number, chunk in enumerate(chunks[len(finished) :], start=len(finished)):
                jobs = [(str(splits[split] / listing["files"][i]), label_of[listing["targets"][i]], f"{i:08d}") for i in chunk]
                members = pool.imap(encoder, jobs, chunksize=64) if encoder else map(_copied, jobs)
                entry = {**_write_shard(dest / f"{split}-{number:06d}.tar", members), "keys": chunk}
                atomic_write_bytes(dest / PROGRESS / f"{entry['file']}.json", json.dumps(entry).encode())
                finished.append(entry)
                progress(count(), total)
    manifest = {
        "format": FORMAT,
        "classes": classes,
        "image_size": image_size,
        "splits": {split: {"count": sum(s["count"] for s in done[split]), "shards": done[split]} for split in listings},
        "plan": plan,
    }
    atomic_write_bytes(dest / MANIFEST, json.dumps(manifest).encode())
    shutil.rmtree(dest / PROGRESS, ignore_errors=True)
    shards = sum(len(entries) for entries in done.values())
    return PackResult(dest, total, shards, reused, time.perf_counter() - started)


class _Serial:
    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _resume_point(dest: Path, plan: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The shards already whole for this plan, per split: the leading run of intact ones (a pack resumes after
    the last of them); none for a fresh pack, and an error when `dest` holds another pack."""
    manifest, recorded = dest / MANIFEST, dest / PROGRESS / "plan.json"
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved.get("plan") != plan:
            raise UsageError(f"data pack: {dest} holds shards of another pack ({MANIFEST}); choose an empty DEST or remove that folder")
        done = {split: entry["shards"] for split, entry in saved["splits"].items()}
    elif recorded.is_file():
        if json.loads(recorded.read_text()) != plan:
            raise UsageError(f"data pack: {dest} holds part of another pack ({PROGRESS}/); choose an empty DEST or remove that folder")
        done = {split: _recorded(dest, split) for split in plan["splits"]}
    elif any(dest.glob("*.tar")):
        raise UsageError(f"data pack: {dest} already holds .tar files that no pack of this source wrote; choose an empty DEST")
    else:
        return {}
    return {split: _intact_prefix(dest, split, shards) for split, shards in done.items()}


def _recorded(dest: Path, split: str) -> list[dict[str, Any]]:
    """The shards of `split` recorded as whole, in order, up to the first missing record."""
    shards = []
    while (record := dest / PROGRESS / f"{split}-{len(shards):06d}.tar.json").is_file():
        shards.append(json.loads(record.read_text()))
    return shards


def _intact_prefix(dest: Path, split: str, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept = []
    for number, shard in enumerate(shards):
        path = dest / shard["file"]
        if shard["file"] != f"{split}-{number:06d}.tar" or not path.is_file() or path.stat().st_size != shard["bytes"]:
            break
        kept.append(shard)
    return kept


def _copied(job: tuple[str, int, str]) -> tuple[str, bytes, int]:
    """One image's file as it is (no decoding: the fast path)."""
    path, label, key = job
    return f"{key}{Path(path).suffix.lower()}", Path(path).read_bytes(), label


class _Encoder:
    """Decode, resize and re-encode one image as PNG (lossless: a stream at this size reads these pixels)."""

    def __init__(self, image_size: int, channels: int):
        self.image_size, self.channels = image_size, channels

    def __call__(self, job: tuple[str, int, str]) -> tuple[str, bytes, int]:
        from PIL import Image

        path, label, key = job
        pixels = ImageDecoder(self.image_size, self.channels)(Path(path))
        array = pixels.permute(1, 2, 0).numpy()
        image = Image.fromarray(array[:, :, 0] if self.channels == 1 else array)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return f"{key}.png", buffer.getvalue(), label


def _write_shard(path: Path, members: Iterator[tuple[str, bytes, int]]) -> dict[str, Any]:
    """One shard, written under a temporary name and renamed when whole; its manifest entry."""
    partial = path.with_name(f".{path.name}.partial")
    offsets, sizes, labels = [], [], []
    digest = hashlib.sha256()
    with open(partial, "wb") as raw:
        hashing = _HashingWriter(raw, digest)
        with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data, label in members:
                key = name.partition(".")[0]
                _add(tar, name, data)
                offsets.append(tar.offset - _padded(len(data)))  # the member's data ends, padded, where the tar now is
                sizes.append(len(data))
                labels.append(int(label))
                _add(tar, f"{key}.cls", str(label).encode())
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(partial, path)
    return {
        "file": path.name,
        "count": len(offsets),
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
        "offsets": offsets,
        "sizes": sizes,
        "labels": labels,
    }


def _padded(size: int) -> int:
    return size + (-size % tarfile.BLOCKSIZE)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same images give the same shard
    tar.addfile(info, io.BytesIO(data))


class _HashingWriter:
    """A file object that hashes what passes through it, for the shard's checksum without reading it again."""

    def __init__(self, raw: Any, digest: Any):
        self.raw, self.digest, self.position = raw, digest, 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.position += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.position
