"""Label sets: several classes per sample (multi-label data), as users write them and as the `class_set` target kind
holds them. A labels file is a CSV with a header, `file,labels`: a file's path under its split folder and its labels'
names separated by `|` (`cat|dog`; empty: none). A text data set's label column holds such names directly.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from transferctl.errors import UsageError

SEPARATOR = "|"


def names_in(text: str) -> list[str]:
    """`cat|dog` -> ["cat", "dog"] (spaces around a name dropped; an empty text: no labels)."""
    return [name.strip() for name in text.split(SEPARATOR) if name.strip()]


def classes_of(label_sets: list[list[str]]) -> tuple[str, ...]:
    """Every name that labels some sample, sorted: the classes of a training split's label sets."""
    return tuple(sorted({name for names in label_sets for name in names}))


def multi_hot(label_sets: list[list[str]], classes: tuple[str, ...], where: list[str]) -> torch.Tensor:
    """(N, C) float32 rows, 1 for each class a sample has; a name outside `classes` is a one-line error naming
    `where[i]`, the sample's file and line."""
    index = {name: i for i, name in enumerate(classes)}
    targets = torch.zeros(len(label_sets), len(classes), dtype=torch.float32)
    for row, (names, place) in enumerate(zip(label_sets, where, strict=True)):
        for name in names:
            if name not in index:
                raise UsageError(
                    f"{place}: label '{name}' is not one of the classes ({', '.join(classes)}); fix the label, or label some "
                    f"training sample with it"
                )
            targets[row, index[name]] = 1.0
    return targets


def read_labels_file(path: Path, folder: Path) -> tuple[list[Path], list[list[str]], list[str]]:
    """A labels file's samples: each file (under `folder`), its label names and where the row is (for messages)."""
    if not path.is_file():
        raise UsageError(f"no labels file {path}; write one (a CSV with the header file,labels) or point data.labels_file at it")
    try:
        rows = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(
            f"{path}: not a readable CSV file ({type(exc).__name__}); write it as UTF-8 text with the header file,labels"
        ) from None
    header = [cell.strip() for cell in rows[0]] if rows else []
    if "file" not in header or "labels" not in header:
        raise UsageError(f"{path}: its header must name the columns file and labels (it has: {', '.join(header) or 'none'})")
    file_at, labels_at = header.index("file"), header.index("labels")
    files, label_sets, where, seen = [], [], [], set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        place = f"{path} line {line}"
        if len(row) <= max(file_at, labels_at):
            raise UsageError(f"{place}: expected the columns {', '.join(header)}, got {len(row)} values")
        name = row[file_at].strip()
        file = folder / name
        if name in seen:
            raise UsageError(f"{place}: {name} is listed twice; give each file one row")
        if not file.is_file():
            raise UsageError(f"{place}: {file} does not exist; fix the path (relative to {folder}) or drop the row")
        seen.add(name)
        files.append(file)
        label_sets.append(names_in(row[labels_at]))
        where.append(place)
    if not files:
        raise UsageError(f"{path}: lists no files; add rows file,labels")
    return files, label_sets, where


def folder_label_sets(name: str, split: Path, train_split: Path, labels_file: str) -> tuple[list[Path], torch.Tensor, tuple[str, ...]]:
    """The files of a split folder that its labels file lists, their multi-hot label sets and the classes (those of
    the training split's labels file, so that both splits count the same classes)."""
    files, label_sets, where = read_labels_file(split / labels_file, split)
    if split == train_split:
        classes = classes_of(label_sets)
    else:
        classes = classes_of(read_labels_file(train_split / labels_file, train_split)[1])
    if not classes:
        raise UsageError(f"data set '{name}': {train_split / labels_file} gives no sample a label; label some")
    return files, multi_hot(label_sets, classes, where), classes
