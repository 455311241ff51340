"""Target kinds: what a sample's target is, how a split holds them, and how one follows a geometric transform of
its input.

A kind is a registered class (`@TARGET_KINDS.register("name")`), named by the data sets that give it
(`Samples.target_kind`) and the tasks that train on it (`Task.target_kind`). Targets that stack (a class, a vector
of values, a class per pixel) are one tensor (N, ...); targets of any other shape (a list of boxes, a transcript,
the digits of a scene) are a `TargetList`, one item per sample, which indexes, subsets and moves as a tensor does,
and which the task turns into what its loss takes (`Task.collate`).

Geometric augmentations move a batch of images by one affine map each (`Geometry`); a kind whose targets live in
the image's coordinates (`geometric`) says how they move with it (`follow`), so pipelines and augmentations never
branch on a kind by name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from transferctl.errors import ConfigError
from transferctl.registry import TARGET_KINDS

IGNORE_INDEX = 255  # a per-pixel target that counts in neither loss nor metrics (pixels from outside an image)


@dataclass(frozen=True)
class Geometry:
    """One affine map per image of a batch: `theta` (N, 2, 3) as `torch.nn.functional.affine_grid` takes it (from
    each output pixel's normalized coordinates to where it is read in the input), and the output's (height, width)."""

    theta: torch.Tensor
    size: tuple[int, int]

    def resample(self, x: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
        """(N, C, H, W) `x` read through the maps (`grid_sample`, align_corners=False)."""
        grid = F.affine_grid(self.theta.to(x.dtype), [x.shape[0], x.shape[1], *self.size], align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)


@dataclass(frozen=True)
class Placement:
    """Where an input's own pixels lie in the model's input square (how it was read: cropped, stretched or
    letterboxed): the input pixel coordinate x = (u - offset_x) * scale_x of the model pixel coordinate u (pixel edges
    at integers), likewise y; `width` x `height` is the input's own size. What puts a dense output (a mask) or a
    box back on the input it came from."""

    width: int
    height: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0

    def sample_points(self, size: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """`grid_sample`'s grid (1, rows, width, 2) of the centres of the input's pixels (those of `rows`) in the
        model's normalized coordinates (align_corners=False), and which of them the model saw (rows, width)."""
        xs = (torch.arange(self.width, dtype=torch.float64) + 0.5) / self.scale_x + self.offset_x
        ys = (torch.arange(self.height, dtype=torch.float64)[rows] + 0.5) / self.scale_y + self.offset_y
        seen = ((ys >= 0) & (ys <= size))[:, None] & ((xs >= 0) & (xs <= size))[None, :]
        gy, gx = torch.meshgrid(2 * ys / size - 1, 2 * xs / size - 1, indexing="ij")
        return torch.stack([gx, gy], dim=-1)[None].float(), seen

    def to_model(self, points: torch.Tensor) -> torch.Tensor:
        """The input's own pixel coordinates (..., 2k) as x, y pairs in the model's: `to_input` undone."""
        scale = torch.tensor([self.scale_x, self.scale_y], dtype=points.dtype).repeat(points.shape[-1] // 2)
        offset = torch.tensor([self.offset_x, self.offset_y], dtype=points.dtype).repeat(points.shape[-1] // 2)
        return points / scale + offset

    def to_input(self, points: torch.Tensor) -> torch.Tensor:
        """Model pixel coordinates (..., 2k) as x, y pairs (boxes as x1, y1, x2, y2) in the input's own pixels."""
        scale = torch.tensor([self.scale_x, self.scale_y], dtype=points.dtype).repeat(points.shape[-1] // 2)
        offset = torch.tensor([self.offset_x, self.offset_y], dtype=points.dtype).repeat(points.shape[-1] // 2)
        return (points - offset) * scale


class TargetList:
    """Targets that do not stack: one item per sample (a tensor of any shape, or any picklable value). Indexing with
    an integer gives one item; with a slice, a list of indices or an index tensor, another TargetList."""

    def __init__(self, items: Sequence[Any], device: torch.device | str = "cpu"):
        self.items = list(items)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> Any:
        if isinstance(index, int):
            return self.items[index]
        if isinstance(index, slice):
            return TargetList(self.items[index], self.device)
        if isinstance(index, torch.Tensor):
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            index = index.flatten().tolist() if index.ndim else int(index)
            if isinstance(index, int):
                return self.items[index]
        return TargetList([self.items[i] for i in index], self.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TargetList:
        device = torch.device(device)
        if device == self.device:
            return self
        moved = [item.to(device, non_blocking=non_blocking) if isinstance(item, torch.Tensor) else item for item in self.items]
        return TargetList(moved, device)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TargetList) or len(other) != len(self):
            return NotImplemented if not isinstance(other, TargetList) else False
        return all(_same(a, b) for a, b in zip(self.items, other.items, strict=True))

    def __repr__(self) -> str:
        return f"TargetList({len(self)} items on {self.device})"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


Targets = torch.Tensor | TargetList  # what `Samples.targets` and `Batch.targets` hold


class TargetKind:
    """Base class of a registered target kind: stateless, one instance per name (`target_kind_named`)."""

    noun: ClassVar[str] = "targets"  # what messages call them: "masks", "boxes"
    stacked: ClassVar[bool] = True  # one tensor (N, ...); else a TargetList
    geometric: ClassVar[bool] = False  # lives in the input's coordinates: a geometric augmentation moves it (`follow`)

    def follow(self, targets: Targets, geometry: Geometry) -> Targets:
        """`targets` moved as `geometry` moves their inputs (called only for a `geometric` kind)."""
        raise NotImplementedError(f"{type(self).__name__} declares geometric targets but not how they follow a transform")

    def without_labels(self, targets: Targets, no_label: int) -> Targets:
        """Targets of the same samples that carry no label (the unlabeled pool of semi-supervised fine-tuning)."""
        if isinstance(targets, TargetList):
            return TargetList([None] * len(targets), targets.device)
        return torch.full_like(targets, no_label)


@TARGET_KINDS.register("class")
class ClassIndex(TargetKind):
    """One class index per sample: int64 (N,)."""

    noun = "class labels"


@TARGET_KINDS.register("values")
class Values(TargetKind):
    """Continuous values per sample: float (N, len(target_names))."""

    noun = "values"


@TARGET_KINDS.register("class_per_pixel")
class ClassPerPixel(TargetKind):
    """A class index per pixel: uint8 (N, H, W) masks, IGNORE_INDEX where a pixel has none. A geometric transform
    moves a mask with its image (nearest neighbour); pixels read from outside the image become IGNORE_INDEX."""

    noun = "masks"
    geometric = True

    def follow(self, targets: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        shifted = targets.unsqueeze(1).float() - IGNORE_INDEX  # zero padding then lands on IGNORE_INDEX
        moved = geometry.resample(shifted, "nearest", "zeros") + IGNORE_INDEX
        return moved.squeeze(1).round().to(targets.dtype)


@TARGET_KINDS.register("class_sequence")
class ClassSequence(TargetKind):
    """An ordered list of class indices per sample, of any length (the digits of a scene in reading order; the words
    of a transcript): a TargetList of int64 (length,) tensors."""

    noun = "class sequences"
    stacked = False


@TARGET_KINDS.register("class_per_word")
class ClassPerWord(TargetKind):
    """A class index per word of a text (a tag: named entities), of any length: a TargetList of int64 (words,)
    tensors. Tags stay per word whatever tokenizer reads the text: the `word_ids` side information (each token's
    word) aligns them with the tokens, and is computed again whenever the text is read again."""

    noun = "word tags"
    stacked = False


@TARGET_KINDS.register("class_set")
class ClassSet(TargetKind):
    """A set of classes per sample, of any size (the digits present in a scene, the tags of a text): float32 (N, C)
    multi-hot rows, 1 where the sample has the class."""

    noun = "label sets"


@TARGET_KINDS.register("transcript")
class TranscriptText(TargetKind):
    """What was said in a recording: a TargetList of strings ("three one four"), which the task reads as words or
    characters (its alphabet, fitted on the training transcripts)."""

    noun = "transcripts"
    stacked = False


BOX_COLUMNS = ("x1", "y1", "x2", "y2", "class", "crowd")  # a box target's row


@TARGET_KINDS.register("boxes")
class Boxes(TargetKind):
    """Objects in an image: a TargetList of float32 (objects, 6) tensors, each row x1, y1, x2, y2 in pixels (edges at
    integers, x2 and y2 exclusive), the class index and a crowd flag (1: a COCO `iscrowd` region, kept out of the
    loss and matched as COCO matches crowds). A geometric transform moves each box's corners and keeps their
    envelope, clipped to the image; a box that keeps less than `min_visible` of its area is dropped."""

    noun = "boxes"
    stacked = False
    geometric = True
    min_visible = 0.3  # below it an object is mostly cut off: too little of it is left to name it by

    def follow(self, targets: TargetList, geometry: Geometry) -> TargetList:
        height, width = geometry.size
        inverse = torch.linalg.inv(_homogeneous(geometry.theta.double()))[:, :2]  # input -> output, normalized
        moved = []
        for boxes, affine in zip(targets, inverse.cpu(), strict=True):
            if len(boxes) == 0:
                moved.append(boxes)
                continue
            x1, y1, x2, y2 = boxes[:, :4].double().cpu().unbind(1)
            corners = torch.stack([torch.stack(c, -1) for c in ((x1, y1), (x2, y1), (x1, y2), (x2, y2))], 1)  # (n, 4, 2)
            normalized = corners / torch.tensor([width, height], dtype=torch.float64) * 2 - 1
            out = (normalized @ affine[:, :2].T + affine[:, 2] + 1) / 2 * torch.tensor([width, height], dtype=torch.float64)
            envelope = torch.cat([out.min(1).values, out.max(1).values], 1)
            clipped = torch.stack(
                [
                    envelope[:, 0].clamp(0, width),
                    envelope[:, 1].clamp(0, height),
                    envelope[:, 2].clamp(0, width),
                    envelope[:, 3].clamp(0, height),
                ],
                1,
            )
            kept = box_area(clipped) >= self.min_visible * box_area(envelope).clamp_min(1e-9)
            kept &= box_area(clipped) > 0
            moved.append(torch.cat([clipped.to(boxes.dtype), boxes[:, 4:].cpu()], 1)[kept].to(boxes.device))
        return TargetList(moved, targets.device)


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) affine maps as (N, 3, 3) matrices."""
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device).expand(len(theta), 1, 3)
    return torch.cat([theta, bottom], 1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of (n, 4) x1, y1, x2, y2 boxes (0 for an empty one)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


@cache
def target_kind_named(name: str) -> TargetKind:
    """The registered kind `name` (one instance each); an unknown one is a one-line error naming the registered ones."""
    if name not in TARGET_KINDS:
        raise ConfigError(
            f"target kind '{name}' (a data set's or task's target_kind) is not registered (registered: {', '.join(TARGET_KINDS.names())}); "
            f"register it with @TARGET_KINDS.register in the plugin that uses it"
        )
    return TARGET_KINDS.build(name, {})


def target_kind_of(data: Any) -> TargetKind:
    """The kind of a split's (`Samples`) targets."""
    return target_kind_named(data.target_kind)
