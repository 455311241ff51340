"""Image data sets whose targets are boxes (object detection), in the two layouts users' data comes in: `coco_folder`
(a COCO annotations file beside its images) and `yolo_folder` (one label file of normalized boxes per image).
`mnist_scenes` (in `segmentation.py`) gives boxes too.

Images are letterboxed to the square input (the longer side resized, the rest padded: a centre crop would cut
boxes), and their boxes are brought to the same pixels (`Placement.to_model`). Boxes are the `boxes` target kind's
rows: x1, y1, x2, y2, class, crowd. A box slightly past its image's edge (common in real exports) is clipped;
one further out, one without area, or a class beyond the names is a one-line error naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import PositiveInt

from transferctl.data.datasets import cached_decoding, image_statistics, missing_data, split_folder
from transferctl.data.stream import IMG_EXTENSIONS, ImageDecoder
from transferctl.data.targets import TargetList
from transferctl.errors import UsageError
from transferctl.modalities.image import ImageData, ImageDecoding
from transferctl.registry import DATASETS

# A box may reach this far past an edge (then it is clipped): a few pixels, or this share of a large image's side;
# further is an error.
EDGE_SLACK, EDGE_SLACK_PIXELS = 0.02, 3.0


class ImageBoxes:
    """One image's objects as read: boxes (x1, y1, x2, y2) in the image's own pixels (or, `normalized`, as shares of its
    width and height), class indices, crowd flags, and where each came from (a file and line, for messages)."""

    def __init__(self, path: Path, normalized: bool = False):
        self.path, self.normalized = path, normalized
        self.boxes: list[list[float]] = []
        self.classes: list[int] = []
        self.crowd: list[int] = []
        self.origins: list[str] = []

    def add(self, box: list[float], label: int, origin: str, crowd: bool = False) -> None:
        self.boxes.append(box)
        self.classes.append(label)
        self.crowd.append(int(crowd))
        self.origins.append(origin)

    def rows(self, width: int, height: int) -> torch.Tensor:
        """The boxes checked against the image's size and clipped to it, as `boxes` rows (in the image's pixels)."""
        rows = torch.zeros(len(self.boxes), 6, dtype=torch.float32)
        scale = (width, height, width, height) if self.normalized else (1, 1, 1, 1)
        for i, box in enumerate(self.boxes):
            x1, y1, x2, y2 = (v * s for v, s in zip(box, scale, strict=True))
            slack_x, slack_y = max(EDGE_SLACK * width, EDGE_SLACK_PIXELS), max(EDGE_SLACK * height, EDGE_SLACK_PIXELS)
            outside = x1 < -slack_x or y1 < -slack_y or x2 > width + slack_x or y2 > height + slack_y
            if outside or min(x2, width) <= max(x1, 0) or min(y2, height) <= max(y1, 0):  # nothing of it left in the image
                raise UsageError(
                    f"{self.origins[i]}: the box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside its {width}x{height} image "
                    f"{self.path.name}; fix the annotation or drop the box"
                )
            rows[i, :4] = torch.tensor([min(max(x1, 0), width), min(max(y1, 0), height), min(x2, width), min(y2, height)])
            rows[i, 4], rows[i, 5] = self.classes[i], self.crowd[i]
        return rows


def box_dataset(name: str, images: list[ImageBoxes], classes: tuple[str, ...], image_size: int, channels: int, hflip: bool) -> ImageData:
    """Decode `images` letterboxed to `image_size` (kept decoded in the cache) and put their boxes on the same pixels."""
    decoding = ImageDecoding(image_size, channels, "letterbox")
    decoder = ImageDecoder(image_size, channels, "letterbox", decoding.interpolation)
    paths = [image.path for image in images]

    def decode_all() -> dict[str, torch.Tensor]:
        from PIL import Image

        pixels, sizes = [], []
        for path in paths:
            try:
                with Image.open(path) as picture:
                    picture.load()
                    sizes.append(picture.size)
                    pixels.append(decoder.decode(picture))
            except OSError as exc:
                raise UsageError(f"data set '{name}': cannot read {path} ({type(exc).__name__}); remove or replace it") from None
        stacked = torch.stack(pixels) if pixels else torch.empty((0, channels, image_size, image_size), dtype=torch.uint8)
        return {"images": stacked, "sizes": torch.tensor(sizes, dtype=torch.long).view(-1, 2)}

    decoded = cached_decoding(paths, decoder.options + ":sizes", decode_all)
    targets = []
    for image, (width, height) in zip(images, decoded["sizes"].tolist(), strict=True):
        rows = image.rows(width, height)
        rows[:, :4] = decoding.placement(width, height).to_model(rows[:, :4].double()).float()
        targets.append(rows)
    return ImageData(
        inputs=decoded["images"],
        targets=TargetList(targets),
        classes=classes,
        target_kind="boxes",
        **image_statistics(decoded["images"]),
        hflip=hflip,
        decoding=decoding,
    )


# --------------------------------------------------------------------------- COCO


@DATASETS.register(modality="image", resize="letterbox")
def coco_folder(
    root: Path,
    download: bool,
    train: bool,
    image_size: PositiveInt = 256,
    channels: int = 3,
    train_dir: str = "train",
    test_dir: str = "test",
    annotations_file: str = "annotations.json",
    hflip: bool = True,
) -> ImageData:
    """Your own boxes in COCO's layout: <root>/<train_dir>/<annotations_file> (`images`, `annotations` with `bbox` as x, y,
    w, h in pixels, `categories`), the images beside it; the same under <test_dir>. Letterboxed to image_size."""
    folder = split_folder("coco_folder", root, train, train_dir, test_dir)
    file = folder / annotations_file
    if not file.is_file():
        raise missing_data("coco_folder", root, f"{train_dir if train else test_dir}/{annotations_file}")
    coco = _read_coco(file)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    images: dict[int, ImageBoxes] = {}
    for entry in coco["images"]:
        path = folder / entry["file_name"]
        if not path.is_file():
            raise UsageError(f"{file}: image {entry['file_name']!r} is not beside it ({path}); add it or drop its entry")
        images[entry["id"]] = ImageBoxes(path)
    for n, annotation in enumerate(coco["annotations"]):
        where = f"{file}: annotation {n + 1} (id {annotation.get('id', '?')})"
        if annotation.get("image_id") not in images:
            raise UsageError(f"{where}: image_id {annotation.get('image_id')!r} is not in `images`; fix it or drop the annotation")
        if annotation.get("category_id") not in index:
            raise UsageError(
                f"{where}: category_id {annotation.get('category_id')!r} is not in `categories`; add the category or fix the id"
            )
        x, y, w, h = _bbox(annotation.get("bbox"), where)
        images[annotation["image_id"]].add(
            [x, y, x + w, y + h], index[annotation["category_id"]], where, bool(annotation.get("iscrowd", 0))
        )
    classes = tuple(str(c["name"]) for c in categories)
    return box_dataset("coco_folder", list(images.values()), classes, image_size, channels, hflip)


def _read_coco(file: Path) -> dict:
    try:
        coco = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{file}: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); export the annotations again") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file}: cannot read it ({type(exc).__name__}); point data.annotations_file at a COCO JSON file") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco, dict) or not isinstance(coco.get(key), list)]
    if missing:
        raise UsageError(f"{file}: a COCO annotations file needs the lists {', '.join(missing)}; this one lacks them")
    return coco


def _bbox(bbox: object, where: str) -> tuple[float, float, float, float]:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
        raise UsageError(f"{where}: bbox {bbox!r} is not [x, y, width, height]; fix it")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise UsageError(f"{where}: bbox {bbox!r} has no area (width and height must be positive); fix or drop it")
    return x, y, w, h


# --------------------------------------------------------------------------- YOLO


@DATASETS.register(modality="image", resize="letterbox")
def yolo_folder(
    root: Path,
    download: bool,
    train: bool,
    image_size: PositiveInt = 256,
    channels: int = 3,
    train_dir: str = "train",
    test_dir: str = "test",
    hflip: bool = True,
) -> ImageData:
    """Your own boxes in YOLO's layout: <root>/<train_dir>/images/* and <root>/<train_dir>/labels/<stem>.txt (a line
    `class x_centre y_centre width height` per object, normalized to [0, 1]), class names in <root>/classes.txt or a
    data.yaml's `names`; the same under <test_dir>. An image without a label file has no objects."""
    classes = _yolo_names(root)
    folder = split_folder("yolo_folder", root, train, train_dir, test_dir)
    if not (folder / "images").is_dir():
        raise missing_data("yolo_folder", root, f"{train_dir if train else test_dir}/images")
    paths = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
    by_stem = {p.stem: p for p in paths}
    labels = folder / "labels"
    for label in sorted(labels.glob("*.txt")) if labels.is_dir() else []:
        if label.stem not in by_stem:
            raise UsageError(f"{label}: no image {label.stem}.* in {folder / 'images'}; add it or remove the label file")
    images = []
    for path in paths:
        label = labels / f"{path.stem}.txt"
        image = ImageBoxes(path, normalized=True)
        if label.is_file():
            _read_yolo_labels(label, image, len(classes))
        images.append(image)
    return box_dataset("yolo_folder", images, classes, image_size, channels, hflip)


def _yolo_names(root: Path) -> tuple[str, ...]:
    names, config = root / "classes.txt", root / "data.yaml"
    if names.is_file():
        return tuple(line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip())
    if config.is_file():
        import yaml

        try:
            listed = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("names")
        except (yaml.YAMLError, AttributeError):
            listed = None
        if isinstance(listed, dict):  # {0: person, 1: car}
            listed = [listed[k] for k in sorted(listed)]
        if isinstance(listed, list) and listed:
            return tuple(str(name) for name in listed)
        raise UsageError(f"{config}: no `names` list of classes in it; add one, or write the names in {names}")
    raise missing_data("yolo_folder", root, "classes.txt (or a data.yaml with `names`)")


def _read_yolo_labels(label: Path, image: ImageBoxes, num_classes: int) -> None:
    """Each line's normalized box as fractions of the image (scaled to pixels once the image's size is known)."""
    for number, line in _lines(label):
        fields = line.split()
        try:
            cls, xc, yc, w, h = int(fields[0]), *(float(v) for v in fields[1:])
        except (ValueError, TypeError, IndexError):
            cls = None
        if cls is None or len(fields) != 5:
            raise UsageError(f"{label}:{number}: expected `class x_centre y_centre width height`, got {line!r}; fix the line")
        if not 0 <= cls < num_classes:
            raise UsageError(
                f"{label}:{number}: class {cls} is beyond the {num_classes} class names (0-{num_classes - 1}); fix it or add the name"
            )
        if w <= 0 or h <= 0:
            raise UsageError(f"{label}:{number}: the box has no area (width and height must be positive); fix or drop the line")
        image.add([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], cls, f"{label}:{number}")


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read it ({type(exc).__name__}); fix or remove the label file") from None
    return ((n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip())
