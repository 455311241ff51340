"""Image data sets whose targets are a class per pixel (semantic segmentation): `mnist_scenes`, canvases of real
MNIST digits, and `segmentation_folder`, the user's own images and masks. Masks are uint8 (N, H, W) class
indices; IGNORE_INDEX (255) marks pixels without a class."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from transferctl.data.datasets import image_statistics, missing_data, mnist, split_folder
from transferctl.data.targets import IGNORE_INDEX, TargetList
from transferctl.errors import ConfigError, UsageError
from transferctl.modalities.image import ImageData, ImageDecoding
from transferctl.registry import DATASETS

STROKE = 128  # a pasted digit's pixel at or above this is a stroke: its mask pixel takes the digit's class
SCALES = (0.7, 1.5)  # a pasted digit's side, as a multiple of MNIST's 28 pixels


class Scenes(NamedTuple):
    """Composed canvases, their masks, and each scene's digits in the order they were pasted: class (N_i,) and the
    tight box of the digit's stroke pixels (N_i, 4) as x1, y1, x2, y2 in pixels (x2, y2 exclusive)."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: list[torch.Tensor]
    boxes: list[torch.Tensor]

    def box_rows(self) -> list[torch.Tensor]:
        """Each scene's digits as the `boxes` target kind's rows: x1, y1, x2, y2, class, crowd (never)."""
        return [
            torch.cat([boxes.float(), labels.float()[:, None], torch.zeros(len(labels), 1)], 1)
            for labels, boxes in zip(self.labels, self.boxes, strict=True)
        ]

    def present(self, num_classes: int) -> torch.Tensor:
        """Each scene's set of digit classes, multi-hot (N, num_classes): what a multi-label task learns."""
        rows = torch.zeros(len(self.labels), num_classes)
        for row, labels in zip(rows, self.labels, strict=True):
            row[labels] = 1.0
        return rows

    def reading_order(self) -> list[torch.Tensor]:
        """Each scene's digit classes left to right by their boxes' centres (top to bottom where they tie)."""
        ordered = []
        for labels, boxes in zip(self.labels, self.boxes, strict=True):
            centres = (boxes[:, 0] + boxes[:, 2]) * 4096 + (boxes[:, 1] + boxes[:, 3])  # x first, then y
            ordered.append(labels[centres.argsort(stable=True)])
        return ordered


def compose_scenes(
    digits: torch.Tensor, labels: torch.Tensor, count: int, size: int, max_digits: int, generator: torch.Generator
) -> Scenes:
    """`count` canvases (N, 1, size, size) of 1 to `max_digits` digits each, at random positions and scales, and
    their masks: each stroke pixel holds its digit's class + 1 (0: background); where digits overlap, the image
    keeps the brighter pixel and the mask the digit pasted last. Each pasted digit's class and stroke box come with
    them, from the same draws."""
    images = torch.zeros(count, 1, size, size, dtype=torch.uint8)
    masks = torch.zeros(count, size, size, dtype=torch.uint8)
    per_scene = torch.randint(1, max_digits + 1, (count,), generator=generator)
    total = int(per_scene.sum())
    chosen = torch.randint(0, len(digits), (total,), generator=generator)
    scale = SCALES[0] + (SCALES[1] - SCALES[0]) * torch.rand(total, generator=generator)
    sides = (28 * scale).round().long().clamp(max=size)
    corners = (torch.rand(total, 2, generator=generator) * (size - sides + 1).unsqueeze(1)).long()
    scene_of = torch.repeat_interleave(torch.arange(count), per_scene)
    boxes = torch.zeros(total, 4, dtype=torch.long)
    for j in range(total):
        side, (top, left), scene = int(sides[j]), corners[j].tolist(), int(scene_of[j])
        digit = digits[chosen[j]].float()[None, None]
        pasted = F.interpolate(digit, size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0, 0]
        pasted = pasted.round().clamp(0, 255).to(torch.uint8)
        region = (slice(top, top + side), slice(left, left + side))
        images[scene, 0][region] = torch.maximum(images[scene, 0][region], pasted)
        stroke = pasted >= STROKE
        masks[scene][region][stroke] = int(labels[chosen[j]]) + 1
        boxes[j] = _stroke_box(stroke, top, left)
    digit_labels = labels[chosen].long()
    return Scenes(images, masks, list(digit_labels.split(per_scene.tolist())), list(boxes.split(per_scene.tolist())))


def _stroke_box(stroke: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """x1, y1, x2, y2 (exclusive) of a pasted digit's stroke pixels on the canvas (its whole square if it has none)."""
    rows, cols = stroke.any(1).nonzero().flatten(), stroke.any(0).nonzero().flatten()
    if not len(rows):
        side = stroke.shape[0]
        return torch.tensor([left, top, left + side, top + side])
    return torch.tensor([left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1])


@DATASETS.register(modality="image")
def mnist_scenes(
    root: Path,
    download: bool,
    train: bool,
    train_scenes: PositiveInt = 10000,
    test_scenes: PositiveInt = 2000,
    image_size: Annotated[int, Field(ge=32, le=256)] = 64,
    max_digits: Annotated[int, Field(ge=1, le=8)] = 4,
    scene_seed: Annotated[int, Field(ge=0)] = 0,
    target_kind: str = "class_per_pixel",
) -> ImageData:
    """Canvases of 1 to `max_digits` real MNIST digits at random positions and scales (seeded). The targets are what
    the task asks for, from the same composition: masks (each stroke pixel its digit's class, 0 the background: 11
    classes), each digit's box (the tight box of its stroke pixels; 10 classes) or the scene's digits in reading
    order (10 classes), or the set of digits present (multi-label; 10 classes). Training scenes from MNIST train, test
    from test."""
    kinds = {
        "class_per_pixel": "masks",
        "boxes": "the box of each digit",
        "class_sequence": "the digits in reading order",
        "class_set": "the digits present",
    }
    if target_kind not in kinds:
        offered = ", ".join(f"{kind} ({what})" for kind, what in kinds.items())
        raise ConfigError(f"data: data set 'mnist_scenes' gives {offered}, not '{target_kind}' targets; pick another task or data set")
    digits = mnist(root, download, train)
    generator = torch.Generator().manual_seed(2 * scene_seed + (0 if train else 1))
    count = train_scenes if train else test_scenes
    scenes = compose_scenes(digits.inputs[:, 0], digits.targets, count, image_size, max_digits, generator)
    if target_kind == "class_sequence":
        targets, classes = TargetList(scenes.reading_order()), tuple(digits.classes)
    elif target_kind == "class_set":
        targets, classes = scenes.present(len(digits.classes)), tuple(digits.classes)
    elif target_kind == "boxes":
        targets, classes = TargetList(scenes.box_rows()), tuple(digits.classes)
    else:
        targets, classes = scenes.masks, ("background", *digits.classes)
    return ImageData(
        inputs=scenes.images,
        targets=targets,
        classes=classes,
        target_kind=target_kind,
        **image_statistics(scenes.images),
        hflip=False,  # a flipped digit is no digit
    )


@DATASETS.register(modality="image", resize="stretch")  # what older checkpoints, which did not record it, were decoded with
def segmentation_folder(
    root: Path,
    download: bool,
    train: bool,
    image_size: PositiveInt = 64,
    channels: Literal[1, 3] = 3,
    train_dir: str = "train",
    test_dir: str = "test",
    hflip: bool = True,
) -> ImageData:
    """Your own images and masks: <root>/classes.txt (one class name a line), <root>/<train_dir>/images/*.png|jpg and
    <root>/<train_dir>/masks/<same stem>.png (8-bit class indices, 255: no class); the same under <test_dir>. Both
    are resized to image_size x image_size, the masks with nearest neighbour."""
    names = root / "classes.txt"
    if not names.is_file():
        raise missing_data("segmentation_folder", root, "classes.txt")
    classes = tuple(line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip())
    folder = split_folder("segmentation_folder", root, train, train_dir, test_dir)
    if not (folder / "images").is_dir():
        raise missing_data("segmentation_folder", root, f"{train_dir if train else test_dir}/images")
    paths = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise UsageError(f"{folder / 'images'}: no .png or .jpg images; add some")
    decoding = ImageDecoding(image_size, channels, "stretch")  # images and masks keep their pixels' places
    pairs = [_read_pair(path, folder / "masks" / f"{path.stem}.png", len(classes), decoding) for path in paths]
    images = torch.stack([image for image, _ in pairs])
    return ImageData(
        inputs=images,
        targets=torch.stack([mask for _, mask in pairs]),
        classes=classes,
        target_kind="class_per_pixel",
        **image_statistics(images),
        hflip=hflip,
        decoding=decoding,
    )


def _read_pair(image_path: Path, mask_path: Path, num_classes: int, decoding: ImageDecoding) -> tuple[torch.Tensor, torch.Tensor]:
    """An image, decoded as `ImageModality.read` decodes one (`ImageDecoder`), and its mask, resized with nearest neighbour."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from transferctl.data.stream import ImageDecoder

    if not mask_path.is_file():
        raise UsageError(f"{image_path}: its mask {mask_path} does not exist; add it (the same file stem, .png)")
    size = decoding.image_size
    decoder = ImageDecoder(size, decoding.channels, decoding.resize, decoding.interpolation)
    try:
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            image.load()
            width, height = image.size
            if mask.mode not in ("L", "P"):
                raise UsageError(f"{mask_path}: a mask must be an 8-bit single-channel PNG of class indices, not mode {mask.mode}")
            indices = TF.pil_to_tensor(mask)[0]
            if tuple(indices.shape) == (height, width):
                picture = decoder.decode(image)
    except OSError as exc:
        raise UsageError(f"cannot read {image_path} or {mask_path} ({type(exc).__name__}); remove or replace them") from None
    if tuple(indices.shape) != (height, width):
        raise UsageError(
            f"{mask_path}: the mask is {indices.shape[1]}x{indices.shape[0]} and its image {width}x{height}; give them the same size"
        )
    unknown = indices[(indices >= num_classes) & (indices != IGNORE_INDEX)]
    if len(unknown):
        raise UsageError(
            f"{mask_path}: class index {int(unknown.max())} is outside classes.txt's {num_classes} classes (0-{num_classes - 1}, "
            f"255 for no class); fix the mask or add the class"
        )
    indices = TF.resize(indices[None], [size, size], interpolation=TF.InterpolationMode.NEAREST)[0]
    return picture, indices
