"""Object detection: boxes and a class for every object in an image, from an anchor-free dense head (FCOS) over the
encoder's stage feature maps.

The head (`fcos`) fuses the deepest `levels` stage maps top-down (a small FPN), and at every position of every
level predicts class logits, the distances to the four sides of the object's box, and a centre-ness logit. Its
output is one tensor (N, positions, 8 + classes): each row the position (x, y) and stride, the decoded box (x1, y1,
x2, y2, model pixels), the centre-ness logit and the class logits. The loss (`fcos_loss`) assigns each position
to the smallest box whose centre region holds it at the level its size belongs to (FCOS), and sums sigmoid focal
loss, GIoU loss weighted by centre-ness (`torchvision.ops`) and centre-ness cross-entropy.

What the run serves (`Detection.served`: evaluation, predict, exports) is the network followed by its decoding:
scores (the square root of class probability times centre-ness), the best `candidates`, a score threshold and
class-aware NMS, all in plain tensor ops of fixed shapes, so that ONNX graphs hold the NMS and give the same
detections as eager mode. It returns (N, max_detections, 6): x1, y1, x2, y2, score, class; rows of score 0 pad.
Metrics are COCO's (torchmetrics' `MeanAveragePrecision`): `map` (mAP@[.5:.95]), `map_50` and per-class AP.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from transferctl import agreement, plots
from transferctl.data.samples import Samples
from transferctl.data.targets import TargetList
from transferctl.engine.evaluate import Evaluation
from transferctl.engine.train import Selection
from transferctl.errors import UsageError
from transferctl.modalities import modality_of
from transferctl.registry import HEADS, LOSSES, TASKS
from transferctl.tasks.base import Task

if TYPE_CHECKING:
    from transferctl.modalities.base import ReadBatch
    from transferctl.runs import Run

BOX = slice(3, 7)  # a head output row: px, py, stride, x1, y1, x2, y2, centre-ness, class logits...
CENTRENESS, CLASSES = 7, 8
RANGE_PER_STRIDE = 8  # a level takes objects whose farthest side lies up to this many strides from a position (FCOS)


# --------------------------------------------------------------------------- the head


def _norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(width, 16), width)


class FCOSHead(nn.Module):
    """An FPN over the deepest `levels` stage maps (1x1 laterals summed top-down, a 3x3 conv per level), then towers
    shared by every level: one for class logits, one for the box distances and centre-ness."""

    def __init__(self, stage_channels: tuple[int, ...], num_outputs: int, image_size: int, width: int, levels: int, convs: int):
        super().__init__()
        channels = stage_channels[-levels:]
        self.levels, self.image_size, self.num_classes = len(channels), image_size, num_outputs
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in channels)

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(convs):
                layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), _norm(width), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.class_tower, self.box_tower = tower(), tower()
        self.classify = nn.Conv2d(width, num_outputs, 3, padding=1)
        self.regress = nn.Conv2d(width, 4, 3, padding=1)
        self.centreness = nn.Conv2d(width, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(channels)))
        nn.init.constant_(self.classify.bias, -math.log(99))  # every class at 1% at first: focal loss starts calm
        for conv in (self.classify, self.regress, self.centreness):
            nn.init.normal_(conv.weight, std=0.01)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        maps = maps[-self.levels :]
        x = self.lateral[-1](maps[-1])
        fused = [self.smooth[-1](x)]
        for lateral, smooth, skip in zip(reversed(self.lateral[:-1]), reversed(self.smooth[:-1]), reversed(maps[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest") + lateral(skip)
            fused.insert(0, smooth(x))
        rows = [self._level(level, feature) for level, feature in enumerate(fused)]
        return torch.cat(rows, 1)

    def _level(self, level: int, feature: torch.Tensor) -> torch.Tensor:
        n, _, height, width = feature.shape
        stride = self.image_size / width
        boxes = self.box_tower(feature)
        logits = self.classify(self.class_tower(feature)).flatten(2).transpose(1, 2)
        distances = (self.scales[level] * self.regress(boxes)).float().clamp(max=math.log(4 * self.image_size / stride)).exp() * stride
        distances = distances.flatten(2).transpose(1, 2)  # (N, H*W, 4): left, top, right, bottom
        centreness = self.centreness(boxes).flatten(2).transpose(1, 2)
        ys, xs = torch.meshgrid(
            (torch.arange(height, device=feature.device, dtype=torch.float32) + 0.5) * (self.image_size / height),
            (torch.arange(width, device=feature.device, dtype=torch.float32) + 0.5) * stride,
            indexing="ij",
        )
        points = torch.stack([xs.flatten(), ys.flatten()], 1)  # (H*W, 2)
        box = torch.cat([points - distances[..., :2], points + distances[..., 2:]], -1)
        where = torch.cat([points, torch.full_like(points[:, :1], stride)], 1).expand(n, -1, -1)
        return torch.cat([where, box, centreness.float(), logits.float()], -1)


@HEADS.register("fcos", serves=("detection",), reads="feature_maps")
def fcos_head(
    stage_channels: tuple[int, ...],
    num_outputs: int,
    sample_shape: tuple[int, ...],
    width: PositiveInt = 64,
    levels: Annotated[int, Field(ge=1, le=5)] = 3,
    convs: Annotated[int, Field(ge=0, le=4)] = 2,
) -> nn.Module:
    """An anchor-free detection head (FCOS) over the deepest `levels` stage maps fused by a small FPN of `width`
    channels, with `convs` 3x3 convs in each of its class and box towers."""
    if len(stage_channels) < levels:
        raise UsageError(
            f"head.levels: {levels} levels, and the encoder has {len(stage_channels)} stages; set head.levels<={len(stage_channels)}"
        )
    return FCOSHead(stage_channels, num_outputs, sample_shape[-1], width, levels, convs)


# --------------------------------------------------------------------------- the loss


class FCOSLoss(nn.Module):
    """Focal loss on the class logits, GIoU loss of the positives' boxes weighted by their centre-ness target,
    cross-entropy of the centre-ness logits; each summed and divided by the batch's positives."""

    def __init__(self, centre_radius: float, alpha: float, gamma: float, box_weight: float):
        super().__init__()
        self.centre_radius, self.alpha, self.gamma, self.box_weight = centre_radius, alpha, gamma, box_weight

    def forward(self, outputs: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        outputs = outputs.float()
        points, strides = outputs[0, :, :2], outputs[0, :, 2]
        num_classes = outputs.shape[-1] - CLASSES
        matched, truth = assign(points, strides, targets, self.centre_radius)  # (N, P): box index, -1 none, -2 ignored
        positive = matched >= 0
        classes = torch.zeros_like(outputs[..., CLASSES:])
        classes[positive] = F.one_hot(truth[positive][:, 4].long(), num_classes).float()
        counted = matched != -2
        positives = max(int(positive.sum()), 1)
        focal = sigmoid_focal_loss(outputs[..., CLASSES:][counted], classes[counted], self.alpha, self.gamma, reduction="sum") / positives
        if not positive.any():
            return focal + 0.0 * outputs[..., BOX].sum()  # no object in the batch: only "nothing here" to learn
        box, goal = outputs[..., BOX][positive], truth[positive][:, :4]
        centre = centreness_target(points.expand(len(outputs), -1, -1)[positive], goal)
        giou = (generalized_box_iou_loss(box, goal, reduction="none") * centre).sum() / centre.sum().clamp_min(1e-6)
        centre_loss = F.binary_cross_entropy_with_logits(outputs[..., CENTRENESS][positive], centre, reduction="sum") / positives
        return focal + self.box_weight * giou + centre_loss


def assign(points: torch.Tensor, strides: torch.Tensor, targets: list[torch.Tensor], radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS's assignment: each position to the smallest object box that holds it within `radius` strides of the box's
    centre and whose farthest side lies in the position's level range. Returns (N, P) the box's index (-1:
    background; -2: unassigned inside a crowd region, at any level: neither object nor background) and (N, P, 6)
    the assigned box rows."""
    levels = strides.unique(sorted=True)
    upper = torch.where(strides == levels[-1], torch.inf, strides * RANGE_PER_STRIDE)
    lower = torch.zeros_like(strides)
    for below, level in itertools.pairwise(levels.tolist()):
        lower = torch.where(strides == level, below * RANGE_PER_STRIDE, lower)
    most = max((len(t) for t in targets), default=0)
    boxes = torch.zeros(len(targets), max(most, 1), 6, device=points.device)
    present = torch.zeros(len(targets), max(most, 1), dtype=torch.bool, device=points.device)
    for i, rows in enumerate(targets):
        boxes[i, : len(rows)], present[i, : len(rows)] = rows.to(points.device).float().reshape(-1, 6), True
    crowd = present & (boxes[..., 5] > 0)
    x, y = points[None, :, None, 0], points[None, :, None, 1]  # (1, P, 1)
    x1, y1, x2, y2 = (boxes[:, None, :, k] for k in range(4))  # (N, 1, M)
    sides = torch.stack([x - x1, y - y1, x2 - x, y2 - y], -1)  # (N, P, M, 4)
    cx, cy, reach = (x1 + x2) / 2, (y1 + y2) / 2, radius * strides[None, :, None]
    near_centre = ((x - cx).abs() < reach) & ((y - cy).abs() < reach)
    farthest = sides.amax(-1)
    inside = sides.amin(-1) > 0
    in_range = (farthest >= lower[None, :, None]) & (farthest <= upper[None, :, None])
    holds = inside & near_centre & in_range & (present & ~crowd)[:, None]
    area = ((x2 - x1) * (y2 - y1)).expand_as(holds)
    index = torch.where(holds, area, torch.inf).argmin(-1)  # (N, P)
    matched = torch.where(holds.any(-1), index, -1)
    matched = torch.where((matched == -1) & (inside & crowd[:, None]).any(-1), -2, matched)
    return matched, boxes.gather(1, index[..., None].expand(-1, -1, 6))


def centreness_target(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS's centre-ness of positions (K, 2) inside their boxes (K, 4): 1 at the centre, towards 0 at an edge."""
    left, top = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
    right, bottom = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
    horizontal = torch.minimum(left, right) / torch.maximum(left, right).clamp_min(1e-6)
    vertical = torch.minimum(top, bottom) / torch.maximum(top, bottom).clamp_min(1e-6)
    return (horizontal.clamp_min(0) * vertical.clamp_min(0)).sqrt()


@LOSSES.register(serves=("detection",))
def fcos_loss(
    centre_radius: Annotated[float, Field(gt=0.0)] = 1.5,
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25,
    gamma: Annotated[float, Field(ge=0.0)] = 2.0,
    box_weight: Annotated[float, Field(ge=0.0)] = 1.0,
) -> nn.Module:
    """FCOS's loss: sigmoid focal loss (alpha, gamma) on the classes, GIoU on the boxes (times box_weight), centre-ness
    cross-entropy; positions within centre_radius strides of an object's centre are its positives."""
    return FCOSLoss(centre_radius, alpha, gamma, box_weight)


# --------------------------------------------------------------------------- decoding


class Detector(nn.Module):
    """A detection network followed by its decoding and NMS: images -> (N, max_detections, 6) x1, y1, x2, y2, score,
    class, best first, rows of score 0 padding. Fixed shapes throughout, so an ONNX graph of it is the same computation."""

    def __init__(self, network: nn.Module, score_threshold: float, nms_iou: float, max_detections: int, candidates: int):
        super().__init__()
        self.network = network
        self.score_threshold, self.nms_iou, self.max_detections, self.candidates = score_threshold, nms_iou, max_detections, candidates

    def forward(self, inputs: torch.Tensor, **side: torch.Tensor) -> torch.Tensor:
        return detections(self.network(inputs, **side).float(), self.score_threshold, self.nms_iou, self.max_detections, self.candidates)


def detections(outputs: torch.Tensor, score_threshold: float, nms_iou: float, max_detections: int, candidates: int) -> torch.Tensor:
    """The head's outputs as final detections (see `Detector`)."""
    num_classes = outputs.shape[-1] - CLASSES
    scores = (outputs[..., CLASSES:].sigmoid() * outputs[..., CENTRENESS : CENTRENESS + 1].sigmoid()).sqrt()
    count = min(candidates, scores.shape[1] * num_classes)
    best, index = scores.flatten(1).topk(count, dim=1)  # best first
    labels = index % num_classes
    boxes = outputs[..., BOX].gather(1, (index // num_classes)[..., None].expand(-1, -1, 4))
    best = best * (best >= score_threshold)
    kept = best * cluster_nms(boxes, labels, best > 0, nms_iou)
    score, order = kept.topk(min(max_detections, count), dim=1)
    rows = torch.cat(
        [boxes.gather(1, order[..., None].expand(-1, -1, 4)), score[..., None], labels.gather(1, order)[..., None].float()], -1
    )
    rows = rows * (score > 0)[..., None]
    return F.pad(rows, (0, 0, 0, max_detections - rows.shape[1]))  # always max_detections rows


def cluster_nms(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, threshold: float, rounds: int = 16) -> torch.Tensor:
    """Class-aware greedy NMS of boxes (N, K, 4) sorted best first, as Cluster-NMS computes it with matrix operations:
    a box is kept unless a kept, better box of its class overlaps it by more than `threshold` IoU. Each round lets
    the boxes suppressed only by suppressed boxes back; `rounds` of them give greedy NMS exactly unless a chain of
    suppressions is longer. Returns (N, K) 1.0 for kept boxes, 0.0 for the rest (and for boxes not `valid`)."""
    area = (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)
    low = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
    high = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    overlap = (high - low).clamp_min(0).prod(-1)
    iou = overlap / (area[..., :, None] + area[..., None, :] - overlap).clamp_min(1e-9)
    same_class = labels[..., :, None] == labels[..., None, :]
    better = torch.ones_like(iou[0], dtype=torch.bool).triu(1)  # row i better than column j
    suppresses = (iou > threshold) & same_class & better & valid[..., :, None]
    kept = valid.float()
    for _ in range(rounds):
        kept = valid.float() * (1 - (suppresses.float() * kept[..., :, None]).amax(1))
    return kept


# --------------------------------------------------------------------------- metrics


def mean_average_precision(found: list[torch.Tensor], truth: list[torch.Tensor], per_class: bool = False) -> dict[str, Any]:
    """COCO's mAP@[.5:.95] (`map`), mAP@.5 (`map_50`) and, with `per_class`, each class's AP (`per_class_ap`, by class
    index; None for a class in neither truth nor detections) of detections (K, 6) against box rows (M, 6)."""
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError:
        raise UsageError('detection metrics need torchmetrics and faster-coco-eval: pip install "transferctl[detection]"') from None
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=per_class, backend="faster_coco_eval")
    predictions = [{"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].long()} for d in (d[d[:, 4] > 0] for d in found)]
    targets = [{"boxes": t[:, :4], "labels": t[:, 4].long(), "iscrowd": t[:, 5].long()} for t in truth]
    metric.update(predictions, targets)
    scores = metric.compute()
    result: dict[str, Any] = {"map": max(float(scores["map"]), 0.0), "map_50": max(float(scores["map_50"]), 0.0)}
    if per_class:
        classes = scores["classes"].flatten().tolist()
        values = scores["map_per_class"].flatten().tolist()
        result["per_class_ap"] = {int(c): (v if v >= 0 else None) for c, v in zip(classes, values, strict=True)}
    return result


@torch.no_grad()
def detect(model: nn.Module, data: Samples, batch_size: int) -> list[torch.Tensor]:
    """Each image's detections (K, 6) by a served detector, on the CPU."""
    model.eval()
    modality, found = modality_of(data), []
    for start in range(0, len(data), batch_size):
        rows = model(modality.model_input(data.inputs[start : start + batch_size], data)).float().cpu()
        found += [r[r[:, 4] > 0] for r in rows]
    return found


def _truth(data: Samples) -> list[torch.Tensor]:
    return [t.float().cpu() for t in data.targets]


@TASKS.register("detection")
@dataclass
class Detection(Task):
    """Boxes and a class for every object: an anchor-free FCOS head over the stage feature maps, focal, GIoU and
    centre-ness losses; COCO mAP@[.5:.95], mAP@.5 and per-class AP."""

    score_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    nms_iou: Annotated[float, Field(gt=0.0, le=1.0)] = 0.6
    max_detections: Annotated[int, Field(ge=1, le=1000)] = 100
    candidates: Annotated[int, Field(ge=1, le=1000)] = 300  # the best-scoring (position, class) pairs NMS looks at (K x K IoUs)

    head = "fcos"
    loss = "fcos_loss"
    serves = "detection"
    target_kind = "boxes"
    selection = Selection("val_map", higher_is_better=True)
    validation_metrics: ClassVar[Mapping[str, bool]] = {"val_map": True, "val_map_50": True}
    output = "detections"
    exported_as = "detector"
    augmentation = "upright"  # crops, shifts and flips move the boxes; a rotation would not keep them tight
    minimum_agreement: ClassVar[Mapping[str, float]] = {"detection_agreement": 0.99}
    compares_values = False  # a detection near the threshold may come or go: parity counts matching detections

    def num_outputs(self, data: Samples) -> int:
        return data.num_classes

    def breaking_effects(self) -> frozenset[str]:
        return frozenset({"rotation"})

    def collate(self, targets: TargetList) -> list[torch.Tensor]:
        return list(targets)

    def served(self, network: nn.Module) -> nn.Module:
        return Detector(network, self.score_threshold, self.nms_iou, self.max_detections, self.candidates)

    def validate(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, float]:
        scores = mean_average_precision(detect(self.served(network), val, batch_size), _truth(val))
        return {"val_map": scores["map"], "val_map_50": scores["map_50"]}

    def evaluate(self, model: nn.Module, test: Samples, batch_size: int, run: Run) -> Evaluation:
        found, truth, classes = detect(model, test, batch_size), _truth(test), list(test.classes)
        scores = mean_average_precision(found, truth, per_class=True)
        per_class = {name: scores["per_class_ap"].get(i) for i, name in enumerate(classes)}
        modality = modality_of(test)
        shown = modality.displayable(modality.model_input(test.inputs[:8], test), test)
        plots.write_detections(run, shown, truth[:8], found[:8], classes)
        metrics = {"map": scores["map"], "map_50": scores["map_50"], "objects": sum(len(t) for t in truth)}
        return Evaluation(metrics, {"per_class_ap": per_class})

    def compare(self, expected: torch.Tensor, actual: torch.Tensor) -> agreement.Counts:
        """Detections of either output that the other has too (the same class and a box of IoU >= 0.99), both ways; an
        image where neither finds anything agrees once."""
        from torchvision.ops import box_iou

        agreeing, counted = 0, 0
        for want, got in zip(expected, actual, strict=True):
            want, got = want[want[:, 4] > 0], got[got[:, 4] > 0]
            if not len(want) and not len(got):
                agreeing, counted = agreeing + 1, counted + 1
                continue
            counted += len(want) + len(got)
            if len(want) and len(got):
                same = (box_iou(want[:, :4], got[:, :4]) >= 0.99) & (want[:, 5, None] == got[None, :, 5])
                agreeing += int(same.any(1).sum()) + int(same.any(0).sum())
        return {"detection_agreement": (agreeing, counted)}

    def decode(
        self, outputs: torch.Tensor, fitted: Mapping[str, Any], top_k: int = 1, batch: ReadBatch | None = None
    ) -> list[dict[str, Any]]:
        """Each image's objects, best first: class, score and box (x1, y1, x2, y2) in the input's own pixels where the
        batch says where they lie, else in the model's."""
        classes, placements = list(fitted["classes"]), batch.placements if batch is not None else None
        records = []
        for i, rows in enumerate(outputs):
            rows = rows[rows[:, 4] > 0].double()
            boxes = rows[:, :4] if placements is None else placements[i].to_input(rows[:, :4])
            if placements is not None:
                limit = torch.tensor([placements[i].width, placements[i].height] * 2, dtype=boxes.dtype)
                boxes = boxes.clamp_min(0).minimum(limit)
            objects = [
                {"label": classes[int(row[5])], "score": round(float(row[4]), 4), "box": [round(v, 2) for v in box.tolist()]}
                for row, box in zip(rows, boxes, strict=True)
            ]
            records.append({"objects": objects, "count": len(objects)})
        return records

    def draw(self, image: Any, record: dict[str, Any]) -> Any:
        """The image with each object's box and its class and score (`predict --save-images`)."""
        from PIL import ImageDraw

        drawn, palette = image.copy(), ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
        pen, line = ImageDraw.Draw(drawn), max(1, round(max(image.size) / 300))
        for found in record["objects"]:
            colour = palette[zlib.crc32(found["label"].encode()) % len(palette)]
            x1, y1, x2, y2 = found["box"]
            pen.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=line)
            pen.text((x1 + 2, max(0, y1 - 11)), f"{found['label']} {found['score']:.2f}", fill=colour)
        return drawn

    def card(self, data: Samples) -> dict[str, Any]:
        return {
            "classes": list(data.classes),
            "output_meaning": (
                f"(N, {self.max_detections}, 6) detections, best first: x1, y1, x2, y2 in the input square's pixels, score, "
                f"class index; rows of score 0 are padding (inside: NMS at IoU {self.nms_iou}, score threshold {self.score_threshold})"
            ),
        }
