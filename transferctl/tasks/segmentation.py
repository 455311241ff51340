"""Semantic segmentation: a class for every pixel, from a U-Net (default) or FPN decoder over the encoder's stage
feature maps.

Masks are (N, H, W) class indices; IGNORE_INDEX (255) pixels count in neither loss nor metrics. Metrics come
from one pixel confusion matrix: per-class IoU, `miou` (their mean over every class, background included, over
the classes that occur in the truth or the predictions) and `pixel_accuracy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from transferctl import agreement, plots
from transferctl.data.samples import Samples
from transferctl.data.targets import IGNORE_INDEX, Placement
from transferctl.distributed import sum_over_shares, world
from transferctl.engine.evaluate import Evaluation, over_my_share
from transferctl.engine.train import Selection
from transferctl.modalities import modality_of
from transferctl.models.encoders import conv_bn_relu
from transferctl.predictions import WIDE_UNSEEN, MaskImage
from transferctl.registry import HEADS, LOSSES, TASKS
from transferctl.tasks.base import Task

if TYPE_CHECKING:
    from transferctl.modalities.base import ReadBatch
    from transferctl.runs import Run


class FPNHead(nn.Module):
    """Feature-pyramid decoder: each stage's map to `width` channels (1x1), summed top-down from the deepest
    (each upsampled to the next shallower one's size), a 3x3 conv, class logits, upsampled to the input."""

    def __init__(self, stage_channels: tuple[int, ...], num_outputs: int, out_size: tuple[int, int], width: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in stage_channels)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.classify = nn.Conv2d(width, num_outputs, 1)
        self.out_size = tuple(out_size)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](maps[-1])
        for lateral, skip in zip(reversed(self.lateral[:-1]), reversed(maps[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False) + lateral(skip)
        logits = self.classify(self.fuse(x))
        return F.interpolate(logits, size=self.out_size, mode="bilinear", align_corners=False)


@HEADS.register("fpn", serves=("segmentation",), reads="feature_maps")
def fpn_head(stage_channels: tuple[int, ...], num_outputs: int, sample_shape: tuple[int, ...], width: PositiveInt = 64) -> nn.Module:
    """Per-pixel class logits at the input's resolution: an FPN decoder over the encoder's stage feature maps
    (skip connections from every stage), `width` channels."""
    return FPNHead(stage_channels, num_outputs, sample_shape[-2:], width)


class UNetHead(nn.Module):
    """U-Net decoder: dilated 3x3 convs on the deepest map, so that each pixel's class is read from the whole object
    around it; then, stage by stage up to the shallowest, upsample, concatenate the stage's map, and a 3x3 conv."""

    def __init__(self, stage_channels: tuple[int, ...], num_outputs: int, out_size: tuple[int, int], width: int, context: int):
        super().__init__()
        widths = [min(width * 2**level, 4 * width) for level in range(len(stage_channels))]  # shallow to deep
        below = stage_channels[-1]
        self.context = nn.Sequential()
        for i in range(context):  # dilations 1, 2, 4, ...: each conv doubles the reach of the one before it
            self.context.append(nn.Sequential(*conv_bn_relu(below, widths[-1], dilation=2**i)))
            below = widths[-1]
        self.up = nn.ModuleList()
        for level in reversed(range(len(stage_channels) - 1)):
            self.up.append(nn.Sequential(*conv_bn_relu(below + stage_channels[level], widths[level])))
            below = widths[level]
        self.classify = nn.Conv2d(below, num_outputs, 1)
        self.out_size = tuple(out_size)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        x = self.context(maps[-1])
        for merge, skip in zip(self.up, reversed(maps[:-1]), strict=True):
            x = merge(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        logits = self.classify(x)
        return F.interpolate(logits, size=self.out_size, mode="bilinear", align_corners=False)


@HEADS.register("unet", serves=("segmentation",), reads="feature_maps")
def unet_head(
    stage_channels: tuple[int, ...],
    num_outputs: int,
    sample_shape: tuple[int, ...],
    width: PositiveInt = 32,
    context: Annotated[int, Field(ge=0, le=4)] = 2,
) -> nn.Module:
    """Per-pixel class logits at the input's resolution: a U-Net decoder over the encoder's stage feature maps,
    `width` channels at the shallowest stage (doubling deeper, up to 4x), after `context` dilated convs."""
    return UNetHead(stage_channels, num_outputs, sample_shape[-2:], width, context)


class PixelLoss(nn.Module):
    """Per-pixel cross-entropy (IGNORE_INDEX pixels left out), plus `dice_weight` times the soft Dice loss."""

    def __init__(self, dice_weight: float):
        super().__init__()
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        masks = masks.long()
        loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)
        if self.dice_weight:
            loss = loss + self.dice_weight * dice_loss(logits.float(), masks)
        return loss


def dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 - the mean over classes of soft Dice between the predicted probabilities and the one-hot masks."""
    valid = (masks != IGNORE_INDEX).unsqueeze(1)
    probabilities = logits.softmax(1) * valid
    truth = F.one_hot(masks.where(masks != IGNORE_INDEX, 0), logits.shape[1]).permute(0, 3, 1, 2) * valid
    overlap = (probabilities * truth).sum((0, 2, 3))
    total = probabilities.sum((0, 2, 3)) + truth.sum((0, 2, 3))
    return 1 - ((2 * overlap + 1) / (total + 1)).mean()


@LOSSES.register(serves=("segmentation",))
def pixel_cross_entropy(dice_weight: Annotated[float, Field(ge=0.0)] = 0.0) -> nn.Module:
    """Cross-entropy over every labelled pixel (mask value 255: none), optionally plus the soft Dice loss."""
    return PixelLoss(dice_weight)


def pixel_confusion(predicted: torch.Tensor, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) pixel counts, rows the true class, columns the predicted; IGNORE_INDEX left out."""
    valid = masks != IGNORE_INDEX
    truth, guess = masks[valid].long(), predicted[valid].long()
    return torch.bincount(truth * num_classes + guess, minlength=num_classes**2).view(num_classes, num_classes)


def iou_metrics(confusion: torch.Tensor) -> dict[str, Any]:
    """Per-class IoU (None for a class in neither truth nor predictions), their mean (`miou`), pixel accuracy."""
    confusion = confusion.double()
    hits, truth, guessed = confusion.diag(), confusion.sum(1), confusion.sum(0)
    union = truth + guessed - hits
    iou = [(h / u).item() if u > 0 else None for h, u in zip(hits, union, strict=True)]
    present = [value for value in iou if value is not None]
    return {
        "miou": sum(present) / len(present) if present else 0.0,
        "pixel_accuracy": (hits.sum() / confusion.sum().clamp_min(1)).item(),
        "per_class_iou": iou,
    }


@torch.no_grad()
def segment(model: nn.Module, data: Samples, batch_size: int) -> tuple[torch.Tensor, float]:
    """The pixel confusion matrix of `model` on `data`, and its mean per-pixel cross-entropy."""
    model.eval()
    modality, k = modality_of(data), data.num_classes
    confusion = torch.zeros(k, k, dtype=torch.long, device=data.targets.device)
    total, pixels = 0.0, 0
    for inputs, masks, side in over_my_share(data, batch_size, with_side=True):  # under torchrun: this rank's share
        logits = model(modality.model_input(inputs, data), **side).float()
        masks = masks.long()
        confusion += pixel_confusion(logits.argmax(1), masks, k)
        total += F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum").item()
        pixels += int((masks != IGNORE_INDEX).sum())
    if world().distributed:  # float64 on the CPU: the sums of all ranks (Gloo), and no float64 on MPS
        sums = sum_over_shares(torch.tensor([total, pixels], dtype=torch.float64, device=_reduce_device(confusion)), len(data))
        total, pixels = sums.tolist()
    return sum_over_shares(confusion, len(data)).cpu(), total / max(pixels, 1)


PIXELS = agreement.per_position("pixel_agreement")


def _reduce_device(like: torch.Tensor) -> torch.device:
    """Where a collective's tensor lives: NCCL needs CUDA tensors, Gloo CPU ones."""
    return like.device if like.device.type == "cuda" else torch.device("cpu")


@TASKS.register("segmentation")
@dataclass
class Segmentation(Task):
    """A class per pixel: a U-Net decoder over the stage feature maps, per-pixel cross-entropy (+ Dice); mIoU, pixel
    accuracy, per-class IoU."""

    head = "unet"
    loss = "pixel_cross_entropy"
    serves = "segmentation"
    target_kind = "class_per_pixel"
    selection = Selection("val_miou", higher_is_better=True)
    validation_metrics: ClassVar[Mapping[str, bool]] = {"val_loss": False, "val_miou": True, "val_pixel_accuracy": True}
    output = "logits"
    exported_as = "segmenter"
    augmentation = "light"  # geometric transforms move the masks with their images
    # a logit within tolerance can still flip the argmax of a pixel on a class boundary
    minimum_agreement: ClassVar[Mapping[str, float]] = {"pixel_agreement": 0.999}

    def num_outputs(self, data: Samples) -> int:
        return data.num_classes

    def validate(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, float]:
        confusion, loss = segment(network, val, batch_size)
        metrics = iou_metrics(confusion)
        return {"val_loss": loss, "val_miou": metrics["miou"], "val_pixel_accuracy": metrics["pixel_accuracy"]}

    def evaluate(self, model: nn.Module, test: Samples, batch_size: int, run: Run) -> Evaluation:
        confusion, loss = segment(model, test, batch_size)
        metrics, classes = iou_metrics(confusion), list(test.classes)
        per_class = dict(zip(classes, metrics["per_class_iou"], strict=True))
        counts = {"classes": classes, "per_class_iou": metrics["per_class_iou"], "pixel_confusion": confusion.tolist()}
        run.write_json("confusion.json", counts)
        plots.write_segmentation(run, *_examples(model, test), len(classes))
        scores = {"miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"], "loss": loss}
        return Evaluation(scores, {"per_class_iou": per_class})

    def compare(self, expected: torch.Tensor, actual: torch.Tensor) -> agreement.Counts:
        return PIXELS(expected, actual)

    def decode(
        self, outputs: torch.Tensor, fitted: Mapping[str, Any], top_k: int = 1, batch: ReadBatch | None = None
    ) -> list[dict[str, Any]]:
        """Each pixel's most likely class (a `MaskImage`): in the input's own pixels where the batch says where they lie
        (IGNORE_INDEX on those the model did not see: outside a centre crop), else in the model's; and the share of
        the mask's pixels each class it shows takes."""
        classes, placements = list(fitted["classes"]), batch.placements if batch is not None else None
        wide = len(classes) > IGNORE_INDEX  # class ids past 254: 16-bit masks, whose "no class" is 65535
        unseen = WIDE_UNSEEN if wide else IGNORE_INDEX
        records = []
        for i, logits in enumerate(outputs):
            mask = logits.argmax(0) if placements is None else mask_on_input(logits, placements[i], unseen)
            counts = torch.bincount(mask[mask != unseen].long(), minlength=len(classes)).tolist()
            seen = max(sum(counts), 1)
            share = {classes[c]: n / seen for c, n in enumerate(counts) if n}
            records.append({"mask": MaskImage(mask, wide), "pixel_share": share})
        return records

    def card(self, data: Samples) -> dict[str, Any]:
        return {"classes": list(data.classes), "output_meaning": "class logits per pixel (N, classes, H, W); argmax over dim 1"}


def mask_on_input(logits: torch.Tensor, placement: Placement, unseen: int = IGNORE_INDEX, points: int = 1 << 22) -> torch.Tensor:
    """Class logits (C, S, S) in the model's square as a mask (H, W) in the input's own pixels: the logits read
    (bilinear) at each input pixel's centre, then argmax; `unseen` where the model saw nothing. In bands of rows
    of at most `points` logits: a photo's mask never needs C x H x W floats at once."""
    mask = torch.empty(placement.height, placement.width, dtype=torch.long)
    rows = max(1, points // max(1, placement.width * logits.shape[0]))
    for start in range(0, placement.height, rows):
        band = slice(start, start + rows)
        grid, seen = placement.sample_points(logits.shape[-1], band)
        sampled = F.grid_sample(logits[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        mask[band] = torch.where(seen, sampled.argmax(0), unseen)
    return mask


@torch.no_grad()
def _examples(model: nn.Module, test: Samples, count: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first `count` test images (displayable), their true masks and the predicted ones."""
    modality = modality_of(test)
    inputs = modality.model_input(test.inputs[:count], test)
    predicted = model.eval()(inputs).argmax(1)
    return modality.displayable(inputs, test), test.targets[:count].cpu(), predicted.cpu()
