"""Image data sets whose targets are values (regression): `mnist_rotation`, built from real MNIST digits, and
`regression_folder`, the user's own images with a `targets.csv`."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from transferctl.data.datasets import decode_image_files, image_statistics, missing_data, mnist, split_folder
from transferctl.errors import UsageError
from transferctl.modalities.image import ImageData
from transferctl.registry import DATASETS

CHUNK = 8192  # images rotated at once: bounds the sampling grid's memory


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W), each turned counter-clockwise by its angle about its centre (bilinear, zeros outside)."""
    out = torch.empty_like(images)
    for start in range(0, len(images), CHUNK):
        x = images[start : start + CHUNK].float()
        angle = degrees[start : start + CHUNK].double() * (math.pi / 180)
        cos, sin = angle.cos(), angle.sin()
        # affine_grid maps output to input coordinates (y points down): sampling at R(-angle) turns the image by +angle
        theta = torch.stack([torch.stack([cos, -sin, 0 * cos], 1), torch.stack([sin, cos, 0 * cos], 1)], 1).float()
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        turned = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[start : start + CHUNK] = turned.round().clamp(0, 255).to(torch.uint8)
    return out


@DATASETS.register(modality="image")
def mnist_rotation(
    root: Path,
    download: bool,
    train: bool,
    max_angle: Annotated[float, Field(gt=0, le=90)] = 45.0,
    angle_seed: Annotated[int, Field(ge=0)] = 0,
) -> ImageData:
    """Real MNIST digits, each turned by a seeded random angle in [-max_angle, max_angle] degrees
    (counter-clockwise positive); the target is the angle. Train from MNIST train, test from MNIST test."""
    digits = mnist(root, download, train)
    generator = torch.Generator().manual_seed(2 * angle_seed + (0 if train else 1))  # train and test draw apart
    angles = (torch.rand(len(digits), generator=generator, dtype=torch.float64) * 2 - 1) * max_angle
    return ImageData(
        inputs=rotate(digits.inputs, angles),
        targets=angles.float().unsqueeze(1),
        classes=(),
        target_kind="values",
        target_names=("angle",),
        mean=digits.mean,
        std=digits.std,
        hflip=False,  # a flip negates the angle
    )


@DATASETS.register(modality="image")
def regression_folder(
    root: Path,
    download: bool,
    train: bool,
    image_size: PositiveInt = 64,
    channels: Literal[1, 3] = 3,
    train_dir: str = "train",
    test_dir: str = "test",
    hflip: bool = False,
) -> ImageData:
    """Your own images with values: <root>/<train_dir>/targets.csv (a header `file,<target>,...`, then one row per
    image, its file name relative to the folder) and the images beside it; the same under <test_dir>."""
    table = split_folder("regression_folder", root, train, train_dir, test_dir) / "targets.csv"
    if not table.is_file():
        raise missing_data("regression_folder", root, f"{train_dir if train else test_dir}/targets.csv")
    names, paths, values = read_targets(table)
    images = decode_image_files("regression_folder", paths, image_size, channels)
    return ImageData(
        inputs=images,
        targets=torch.tensor(values, dtype=torch.float32),
        classes=(),
        target_kind="values",
        target_names=names,
        **image_statistics(images),
        hflip=hflip,
    )


def read_targets(table: Path) -> tuple[tuple[str, ...], list[Path], list[list[float]]]:
    """(target names, image paths, values) of a targets.csv; any problem is one line naming the file and line."""
    with table.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) < 2 or not all(name.strip() for name in rows[0]):
        raise UsageError(f"{table}: the first line must name the columns: file, then one name per target (e.g. file,angle)")
    names = tuple(name.strip() for name in rows[0][1:])
    paths, values = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) != len(names) + 1 or not all(cell.strip() for cell in row):
            expected = f"a file name and {len(names)} value(s) ({', '.join(names)})"
            raise UsageError(f"{table} line {line}: expected {expected}; fill in the missing ones")
        path = table.parent / row[0].strip()
        if not path.is_file():
            raise UsageError(f"{table} line {line}: image '{row[0].strip()}' does not exist in {table.parent}; add it or drop the line")
        numbers = [_number(cell, f"{table} line {line}") for cell in row[1:]]
        if not all(math.isfinite(n) for n in numbers):
            raise UsageError(f"{table} line {line}: a target is not finite (nan or inf); give a number")
        paths.append(path)
        values.append(numbers)
    if not paths:
        raise UsageError(f"{table}: no rows after the header; add a line per image")
    return names, paths, values


def _number(cell: str, where: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise UsageError(f"{where}: '{cell.strip()}' is not a number; targets must be numeric") from None
