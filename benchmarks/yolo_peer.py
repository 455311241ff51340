"""The peer of the detection benchmark: Ultralytics YOLOv8n trained from scratch on the same 500 labelled MNIST scenes
as configs/detect_mnist_scenes.yaml, at their 64 px, for the same wall time on the same CPU, scored on the same
2,000 test scenes by the same metric (torchmetrics' COCO mAP, as transferctl's evaluate).

Ultralytics is AGPL-3.0: it is never a dependency of transferctl. Install it in an environment of your own, beside
transferctl, and run this script there (no weights are downloaded: the model starts from yolov8n.yaml):

    pip install ultralytics
    python benchmarks/yolo_peer.py --data-dir /path/to/data --minutes 5.5

`--minutes` is the wall time to give it: the transferctl cell's (benchmarks/results/dense_tasks/cells.jsonl,
`detection/random init/500/seed0/...`, `seconds`). The scenes, the 500 labelled ones and the validation split are
transferctl's own (`load_training_data`), written out in YOLO's layout.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from transferctl.config import load_config
from transferctl.data.datasets import load_split, load_training_data
from transferctl.tasks.detection import mean_average_precision

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "detect_mnist_scenes.yaml"


def write_split(folder: Path, images: torch.Tensor, targets: list[torch.Tensor]) -> None:
    """Scenes as YOLO's images/*.png and labels/*.txt (class x_centre y_centre width height, as fractions)."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    size = images.shape[-1]
    for i, (image, rows) in enumerate(zip(images, targets, strict=True)):
        Image.fromarray(image[0].numpy()).save(folder / "images" / f"{i:05d}.png")
        lines = []
        for x1, y1, x2, y2, label, _ in rows.tolist():
            lines.append(
                f"{int(label)} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}"
            )
        (folder / "labels" / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the folder holding MNIST")
    parser.add_argument("--minutes", type=float, required=True, help="wall time to train for (the transferctl cell's)")
    parser.add_argument("--labelled", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="data.seed: which labelled scenes")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dense_tasks" / "yolo_peer.jsonl")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    cfg = load_config(RECIPE, [f"data.root={args.data_dir.resolve()}", f"data.labeled_samples={args.labelled}", f"data.seed={args.seed}"])
    data = load_training_data(cfg.data, labelled_subset=True, target_kind="boxes")
    test = load_split(cfg.data, train=False, target_kind="boxes")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, split in (("train", data.train), ("val", data.val)):
            write_split(root / name, split.inputs, list(split.targets))
        (root / "data.yaml").write_text(
            json.dumps({"path": str(root), "train": "train/images", "val": "val/images", "names": list(data.train.classes)})
        )
        model = YOLO("yolov8n.yaml")
        started = time.perf_counter()
        model.train(
            data=str(root / "data.yaml"),
            imgsz=cfg.data.options["image_size"],
            epochs=1000,  # `time` ends it
            time=args.minutes / 60,
            batch=cfg.data.batch_size,
            device="cpu",
            workers=2,
            pretrained=False,
            amp=False,
            fliplr=0.0,  # a flipped digit is no digit (transferctl's scenes are not flipped either)
            plots=False,
            project=str(root / "runs"),
            verbose=False,
        )
        seconds = time.perf_counter() - started
        best = YOLO(str(root / "runs" / "train" / "weights" / "best.pt"))
        found = []
        for start in range(0, len(test), 256):
            images = [Image.fromarray(x[0].numpy()).convert("RGB") for x in test.inputs[start : start + 256]]
            for result in best.predict(images, imgsz=cfg.data.options["image_size"], conf=0.001, iou=0.6, max_det=100, verbose=False):
                boxes = result.boxes
                found.append(torch.cat([boxes.xyxy, boxes.conf[:, None], boxes.cls[:, None]], 1).float().cpu())
    scores = mean_average_precision(found, [t.float() for t in test.targets])
    row = {
        "peer": "YOLOv8n (Ultralytics, from scratch)",
        "labelled": args.labelled,
        "seed": args.seed,
        **scores,
        "seconds": round(seconds, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"| YOLOv8n, from scratch | {args.labelled} | {scores['map_50']:.3f} | {scores['map']:.3f} | {seconds / 60:.1f} |")


if __name__ == "__main__":
    main()
