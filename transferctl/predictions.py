"""Where `predict` and `embed` put what they produce: prediction records (JSON lines, CSV, or a table), the files a
record points at (a segmentation mask), and embedding matrices (.npy with a .jsonl index, .safetensors, .csv).

Every file is written whole or not at all: records and matrices go to a private file beside the target, renamed into
place once complete, so an interrupted or failed predict leaves what was there before.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np
import torch

from transferctl.data.targets import IGNORE_INDEX
from transferctl.errors import UsageError
from transferctl.fileio import atomic_write_bytes, finite

RECORD_SUFFIXES = (".jsonl", ".csv")
EMBEDDING_SUFFIXES = (".npy", ".safetensors", ".csv")


class Artifact:
    """A record's value that is a file of its own (a mask): predict writes it beside the records and puts its path in
    the record; `to_json` is the value inline, where no file is written."""

    suffix: ClassVar[str]

    def write(self, path: Path) -> None:
        raise NotImplementedError

    def to_json(self) -> Any:
        raise NotImplementedError


def palette() -> list[int]:
    """PASCAL VOC's colour map: class i gets the colour of its bits spread over R, G and B; 255 (no class) is white."""
    colours = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours += [r, g, b]
    colours[3 * IGNORE_INDEX : 3 * IGNORE_INDEX + 3] = [255, 255, 255]
    return colours


WIDE_UNSEEN = 65535  # "no class" in the 16-bit masks of a run with more than 255 classes


@dataclass(frozen=True)
class MaskImage(Artifact):
    """A class index per pixel (H, W): an indexed-palette PNG whose pixel values are the class ids, IGNORE_INDEX
    (255) where the model saw nothing of the input; for a run of more classes (`wide`), a 16-bit greyscale PNG of
    the ids, WIDE_UNSEEN where it saw nothing. Every mask of a run has one format."""

    pixels: torch.Tensor
    wide: bool = False
    suffix: ClassVar[str] = ".png"

    def write(self, path: Path) -> None:
        from PIL import Image

        values = self.pixels.cpu().numpy()
        if not self.wide:
            image = Image.fromarray(values.astype(np.uint8), mode="P")
            image.putpalette(palette())
        else:
            image = Image.fromarray(values.astype(np.uint16))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())

    def to_json(self) -> list[list[int]]:
        return self.pixels.tolist()


def inline(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record with its artifacts as JSON values."""
    return {k: v.to_json() if isinstance(v, Artifact) else v for k, v in record.items()}


class ArtifactFolder:
    """Where a predict's artifacts go: `<folder>/<position>_<input's stem><suffix>` (the position keeps inputs of one
    name apart)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.written = 0

    def save(self, record: dict[str, Any], position: int, stem: str) -> dict[str, Any]:
        for key, value in record.items():
            if isinstance(value, Artifact):
                if not self.written:
                    try:
                        self.folder.mkdir(parents=True, exist_ok=True)
                    except OSError as exc:
                        raise UsageError(f"--masks {self.folder}: cannot create it ({exc.strerror})") from None
                path = self.folder / f"{position:06d}_{safe_stem(stem)}{value.suffix}"
                value.write(path)
                self.written += 1
                record[key] = str(path)
        return record


def safe_stem(stem: str) -> str:
    kept = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]
    return kept or "input"


# --------------------------------------------------------------------------- records


class RecordWriter:
    """Prediction records, one at a time, in input order: JSON lines on a stream, a .jsonl / .csv file (written
    beside the target and renamed into place by `close`), or, with neither, kept in `kept` (for a table)."""

    def __init__(self, output: Path | None, stream: IO[str] | None = None):
        if output is not None:
            check_record_output(output)
            _check_writable(output)  # its folder made only now, once everything else has been checked
        self.output, self.stream, self.count = output, stream, 0
        self.kept: list[dict[str, Any]] = []
        self._partial: Path | None = None
        self._file: IO[str] | None = None
        if output is not None:
            self._partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
            self._file = self._partial.open("w", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(finite(dict(record)), ensure_ascii=False)
        target = self._file if self._file is not None else self.stream
        if target is not None:
            target.write(line + "\n")
            if target is self.stream:
                target.flush()
        else:
            self.kept.append(dict(record))
        self.count += 1

    def close(self) -> None:
        """Put the records in place (a .csv converted from the JSON lines kept meanwhile)."""
        if self._file is None or self._partial is None or self.output is None:
            return
        self._file.close()
        self._file = None
        if self.output.suffix.lower() == ".csv":
            _jsonl_to_csv(self._partial)
        os.replace(self._partial, self.output)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)


def check_record_output(output: Path) -> None:
    """A usage error for an --output predict cannot write records to (checked before anything is read)."""
    if output.suffix.lower() not in RECORD_SUFFIXES:
        raise UsageError(f"--output {output}: predict writes .jsonl or .csv records; name the file so")


def _check_writable(output: Path) -> None:
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; give a file name ({', '.join(RECORD_SUFFIXES + EMBEDDING_SUFFIXES)})")
    if not output.parent.is_dir():
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--output {output}: cannot create its folder ({exc.strerror})") from None


def flattened(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A record as CSV columns: nested keys joined by dots, list items numbered from 1 (`top_k.1.label`)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flattened(value, f"{name}.")
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value, start=1):
                flat |= flattened(item, f"{name}.{i}.")
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def _jsonl_to_csv(path: Path) -> None:
    """Rewrite JSON-lines records as CSV in place: one column per flattened key, in the order they first appear."""

    def rows() -> Iterator[dict[str, Any]]:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                yield flattened(json.loads(line))

    columns: dict[str, None] = {}
    for row in rows():
        columns |= dict.fromkeys(row)
    converted = path.with_name(path.name + ".csv")
    with converted.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(columns))
        writer.writeheader()
        for row in rows():
            writer.writerow(row)
    os.replace(converted, path)


# --------------------------------------------------------------------------- embeddings


def check_embedding_output(output: Path) -> None:
    if output.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise UsageError(f"--output {output}: embed writes {', '.join(EMBEDDING_SUFFIXES)}; name the file so")
    _check_writable(output)


def write_embeddings(output: Path, ids: Sequence[dict[str, Any]], matrix: np.ndarray, metadata: Mapping[str, Any]) -> list[Path]:
    """The matrix (one row per input, in order) and what names each row: `.npy` with a `.jsonl` index beside it,
    `.safetensors` (the ids in its metadata) or `.csv` (lightly's `filename,embedding_0,...`). The files written."""
    suffix = output.suffix.lower()
    if suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, matrix)
        index = output.with_suffix(".jsonl")
        atomic_write_bytes(index, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids).encode())
        atomic_write_bytes(output, buffer.getvalue())
        return [output, index]
    if suffix == ".safetensors":
        from safetensors.numpy import save

        info = {"ids": json.dumps(list(ids), ensure_ascii=False), **{k: json.dumps(v) for k, v in metadata.items()}}
        atomic_write_bytes(output, save({"embeddings": np.ascontiguousarray(matrix)}, metadata=info))
        return [output]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    first = "text" if ids and "line" in ids[0] and "file" not in ids[0] else "filename"
    writer.writerow([first, *(f"embedding_{j}" for j in range(matrix.shape[1]))])
    for item, row in zip(ids, matrix.tolist(), strict=True):
        writer.writerow([item["input"], *(repr(v) for v in row)])
    atomic_write_bytes(output, text.getvalue().encode())
    return [output]
