"""Object detection: boxes that move with their images through every augmentation the task takes (and the rotation it
refuses), the COCO and YOLO readers and their bad input, mAP against pycocotools, NMS in tensor ops against
torchvision's, and the chain: train, a killed run resumed bit-exactly, evaluate, export with the NMS in the ONNX
graph, predict from the export folder with boxes in the input's own pixels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import write_config
from tests.test_resume import killed_and_resumed
from transferctl.data.augment import BatchAugment
from transferctl.data.datasets import load_split
from transferctl.data.targets import Geometry, TargetList, target_kind_named
from transferctl.registry import MODELS
from transferctl.schema import DataConfig
from transferctl.tasks.detection import Detection, assign, cluster_nms, detections, fcos_head, mean_average_precision

BOXES = target_kind_named("boxes")

SCENES = """\
method: finetune
task: detection
model: {{name: cnn, widths: [8, 16, 32]}}
head: {{name: fcos, width: 16, levels: 2, convs: 1}}
optimizer: {{name: adamw, lr: 0.003}}
scheduler: {{name: constant}}
data: {{name: mnist_scenes, root: {root}, train_scenes: 64, test_scenes: 16, image_size: 32, batch_size: 16, eval_batch_size: 64,
        max_digits: 2}}
train: {{epochs: 3, log_every: 2, device: cpu, checkpoint_every: 2}}
"""


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "augment",
    [
        BatchAugment(crop_scale=(0.4, 0.7), crop_ratio=(0.7, 1.4)),
        BatchAugment(translate=0.2),
        BatchAugment(hflip=True),
        BatchAugment(crop_scale=(0.5, 1.0), translate=0.1, hflip=True, brightness=0.5, jitter_p=1.0),
    ],
)
def test_a_box_stays_on_its_object_through_every_augmentation_detection_takes(augment):
    # each image: one bright rectangle on black, its box the rectangle's pixels
    generator = torch.Generator().manual_seed(0)
    images, rows = torch.zeros(16, 1, 48, 48), []
    for i in range(16):
        top, left = torch.randint(4, 28, (2,), generator=generator).tolist()
        height, width = torch.randint(8, 16, (2,), generator=generator).tolist()
        images[i, 0, top : top + height, left : left + width] = 1.0
        rows.append(torch.tensor([[left, top, left + width, top + height, 3, 0]], dtype=torch.float32))
    moved, boxes = augment.with_targets(images, TargetList(rows), BOXES, torch.Generator().manual_seed(1))
    assert torch.equal(moved, augment(images, torch.Generator().manual_seed(1)))  # the images move exactly as without boxes
    kept = 0
    for image, box in zip(moved, boxes, strict=True):
        bright = (image[0] > 0.5).nonzero()
        if len(box) == 0:  # dropped: little of the rectangle is left in view
            assert len(bright) < 0.3 * 16 * 16
            continue
        kept += 1
        ys, xs = bright[:, 0], bright[:, 1]
        seen = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert (box[0, :4] - seen).abs().max() <= 1.5, (box, seen)
        assert box[0, 4:].tolist() == [3, 0]  # class and crowd flag ride along
    assert kept >= 12


@pytest.mark.parametrize(("shift", "expected"), [(8, [0, 4, 8, 20]), (12, None), (16, None)])
def test_a_box_pushed_past_the_edge_is_clipped_or_dropped_by_the_share_it_keeps(shift, expected):
    theta = torch.tensor([[[1.0, 0.0, 2 * shift / 32], [0.0, 1.0, 0.0]]])  # reads shift pixels to the right: content moves left
    moved = BOXES.follow(TargetList([torch.tensor([[0.0, 4, 16, 20, 1, 0]])]), Geometry(theta, (32, 32)))[0]
    if expected is None:  # 4 of 16 columns left (a quarter), or none: dropped
        assert len(moved) == 0
    else:  # half of it left: clipped to the edge
        assert moved[0, :4].tolist() == pytest.approx(expected)


def test_detection_refuses_a_rotating_augmentation(cli, tmp_path, digits_root):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "scenes.yaml", SCENES.format(root=digits_root))
    result = cli("finetune", "-c", config, "data.augment.name=light", "--runs-dir", runs)
    assert result.code == 2 and "rotation" in result.stderr and "task.changed_by" not in result.stderr, result.stderr
    assert not runs.exists() or not any(runs.iterdir())


# --------------------------------------------------------------------------- readers


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (40, 90, 200)).save(path)


def _coco(root: Path, annotations: list[dict], name: str = "annotations.json") -> Path:
    for split in ("train", "test"):
        _image(root / split / "a.png", 80, 40)
        _image(root / split / "b.png", 40, 40)
        coco = {
            "images": [
                {"id": 1, "file_name": "a.png", "width": 80, "height": 40},
                {"id": 2, "file_name": "b.png", "width": 40, "height": 40},
            ],
            "annotations": annotations,
            "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        }
        (root / split / name).write_text(json.dumps(coco))
    return root


def _yolo(root: Path, lines: str, names: str = "classes.txt") -> Path:
    for split in ("train", "test"):
        _image(root / split / "images" / "a.png", 80, 40)
        _image(root / split / "images" / "b.png", 40, 40)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        (root / split / "labels" / "a.txt").write_text(lines)
    if names == "classes.txt":
        (root / "classes.txt").write_text("dog\ncat\n")
    else:
        (root / "data.yaml").write_text("names: {0: dog, 1: cat}\n")
    return root


def _read(name: str, root: Path, **options) -> object:
    return load_split(DataConfig(name=name, root=str(root), image_size=40, **options), train=True)


def test_coco_and_yolo_folders_letterbox_their_images_and_boxes_alike(tmp_path):
    # a.png is 80x40: letterboxed to 40x20 in the middle of the 40x40 square (10 rows of padding above)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [8, 4, 40, 20], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [-1, 30, 20, 11], "iscrowd": 1},  # a pixel past two edges: clipped
    ]
    coco = _read("coco_folder", _coco(tmp_path / "coco", annotations, "_annotations.coco.json"), annotations_file="_annotations.coco.json")
    assert coco.classes == ("dog", "cat") and coco.target_kind == "boxes" and tuple(coco.inputs.shape) == (2, 3, 40, 40)  # by category id
    assert torch.allclose(coco.targets[0], torch.tensor([[4, 12, 24, 22, 0, 0], [0, 25, 9.5, 30, 1, 1]]))
    assert len(coco.targets[1]) == 0  # an image without objects
    yolo = _read("yolo_folder", _yolo(tmp_path / "yolo", "0 0.35 0.35 0.5 0.5\n1 0.1 0.875 0.2 0.25\n", names="data.yaml"))
    assert yolo.classes == ("dog", "cat") and torch.equal(yolo.inputs, coco.inputs)
    assert torch.allclose(yolo.targets[0], torch.tensor([[4, 12, 24, 22, 0, 0], [0, 25, 8, 30, 1, 0.0]]), atol=1e-5)


@pytest.mark.parametrize(
    ("layout", "content", "named"),
    [
        ("coco", "not json {", "not JSON (line 1"),
        ("coco", {"images": [], "categories": []}, "needs the lists annotations"),
        ("coco", [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [60, 5, 30, 10]}], "lies outside its 80x40 image"),
        ("coco", [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10]}], "has no area"),
        ("coco", [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [5, 5, 10, 10]}], "category_id 4 is not in `categories`"),
        ("yolo", "2 0.5 0.5 0.2 0.2\n", "a.txt:1: class 2 is beyond the 2 class names"),
        ("yolo", "0 0.5 0.5 0.2\n", "a.txt:1: expected `class x_centre"),
        ("yolo", "0 0.5 0.5 0.2 0.2\n0 1.2 0.5 0.2 0.2\n", "a.txt:2: the box (88, 16, 104, 24) lies outside its 80x40 image"),
        ("yolo", "0 1.02 0.5 0.02 0.2\n", "a.txt:1: the box (80.8, 16, 82.4, 24) lies outside"),  # within the slack, but nothing inside
        ("yolo", "orphan", "no image orphan.* in"),
    ],
)
def test_bad_box_files_are_one_line_errors_and_no_run(cli, tmp_path, layout, content, named):
    root = tmp_path / "data"
    if layout == "coco":
        _coco(root, [])
        if isinstance(content, str):
            (root / "train" / "annotations.json").write_text(content)
        elif isinstance(content, dict):
            (root / "train" / "annotations.json").write_text(json.dumps(content))
        else:
            coco = json.loads((root / "train" / "annotations.json").read_text())
            (root / "train" / "annotations.json").write_text(json.dumps({**coco, "annotations": content}))
    elif content == "orphan":
        _yolo(root, "")
        (root / "train" / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    else:
        _yolo(root, content)
    config = write_config(
        tmp_path / "boxes.yaml",
        f"method: finetune\ntask: detection\nmodel: {{name: cnn, widths: [8, 16]}}\nhead: {{name: fcos, levels: 2}}\n"
        f"data: {{name: {layout}_folder, root: {root}, image_size: 40}}\ntrain: {{max_steps: 1, device: cpu}}\n",
    )
    runs = tmp_path / "runs"
    result = cli("finetune", "-c", config, "--runs-dir", runs)
    assert result.code == 2 and named in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not runs.exists() or not any(runs.iterdir())


# --------------------------------------------------------------------------- metrics and NMS


def test_map_agrees_with_pycocotools_on_hand_made_detections():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = [
        torch.tensor([[10, 10, 30, 40, 0, 0], [50, 50, 70, 60, 1, 0], [0, 0, 100, 100, 1, 1]], dtype=torch.float32),  # a crowd
        torch.tensor([[5, 5, 25, 25, 0, 0]], dtype=torch.float32),
        torch.zeros(0, 6),
    ]
    found = [
        torch.tensor([[11, 9, 31, 38, 0.9, 0], [48, 52, 69, 61, 0.8, 1], [20, 20, 40, 40, 0.7, 1], [12, 10, 30, 41, 0.6, 0]]),
        torch.tensor([[6, 4, 24, 27, 0.5, 0], [60, 60, 80, 80, 0.95, 0]]),
        torch.tensor([[1, 1, 9, 9, 0.3, 1]]),
    ]
    ours = mean_average_precision(found, truth, per_class=True)

    images = [{"id": i + 1, "width": 100, "height": 100} for i in range(len(truth))]
    boxes = [(i, r) for i, rows in enumerate(truth) for r in rows.tolist()]
    annotations = [
        {"id": n + 1, "image_id": i + 1, "category_id": int(r[4]) + 1, "bbox": [r[0], r[1], r[2] - r[0], r[3] - r[1]],
         "area": float((r[2] - r[0]) * (r[3] - r[1])), "iscrowd": int(r[5])}
        for n, (i, r) in enumerate(boxes)
    ]  # fmt: skip
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}, {"id": 2}]}
    coco.createIndex()
    results = [
        {"image_id": i + 1, "category_id": int(r[5]) + 1, "bbox": [r[0], r[1], r[2] - r[0], r[3] - r[1]], "score": r[4]}
        for i, rows in enumerate(found) for r in rows.tolist()
    ]  # fmt: skip
    evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert ours["map"] == pytest.approx(evaluation.stats[0], abs=1e-6) and ours["map_50"] == pytest.approx(evaluation.stats[1], abs=1e-6)
    assert 0 < ours["map"] < ours["map_50"] < 1
    for label in (0, 1):
        evaluation.params.catIds = [label + 1]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert ours["per_class_ap"][label] == pytest.approx(evaluation.stats[0], abs=1e-6)


def test_nms_in_tensor_ops_keeps_what_torchvision_keeps():
    from torchvision.ops import batched_nms

    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(3, 200, 2, generator=generator) * 80
    boxes = torch.cat([corners, corners + 5 + torch.rand(3, 200, 2, generator=generator) * 30], -1)  # crowded, overlapping
    scores = torch.rand(3, 200, generator=generator).sort(dim=1, descending=True).values
    labels = torch.randint(0, 3, (3, 200), generator=generator)
    kept = cluster_nms(boxes, labels, scores > 0.1, 0.5, rounds=200)
    for i in range(3):
        valid = scores[i] > 0.1
        expected = batched_nms(boxes[i][valid], scores[i][valid], labels[i][valid], 0.5)
        assert sorted(valid.nonzero().flatten()[expected].tolist()) == kept[i].nonzero().flatten().tolist()


def test_positions_go_to_the_smallest_box_that_holds_them_and_crowds_count_for_nothing():
    xs = (torch.arange(8) + 0.5) * 4
    points = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    strides = torch.full((64,), 4.0)
    big, small, crowd = [0, 0, 32, 32, 1, 0], [8, 8, 16, 16, 2, 0], [20, 20, 32, 32, 0, 1]
    matched, chosen = assign(points, strides, [torch.tensor([big, small, crowd], dtype=torch.float32)], radius=1.5)
    at = {(float(x), float(y)): i for i, (x, y) in enumerate(points.tolist())}
    assert matched[0, at[(10.0, 10.0)]] == 1 and chosen[0, at[(10.0, 10.0)], 4] == 2  # inside both: the small one
    assert matched[0, at[(14.0, 18.0)]] == 0  # the big box's centre region
    assert matched[0, at[(26.0, 26.0)]] == -2  # inside the crowd region only: neither object nor background
    assert matched[0, at[(2.0, 30.0)]] == -1  # outside every centre region
    # a crowd region over an object takes none of the object's positions
    matched, _ = assign(points, strides, [torch.tensor([small, [5, 5, 15, 15, 0, 1]], dtype=torch.float32)], radius=1.5)
    assert matched[0, at[(10.0, 10.0)]] == 0 and matched[0, at[(6.0, 6.0)]] == -2


@pytest.mark.parametrize(
    ("encoder", "options", "strides"), [("cnn", {"widths": (8, 16, 32)}, [2, 4]), ("resnet18", {"small_images": False}, [16, 32])]
)
def test_the_fcos_head_reads_any_encoders_stage_maps_at_their_strides(encoder, options, strides):
    body = MODELS.build(encoder, options, in_channels=1, image_size=64)
    head = fcos_head(body.stage_channels, num_outputs=3, sample_shape=(1, 64, 64), width=8, levels=2, convs=1)
    rows = head(body.feature_maps(torch.rand(2, 1, 64, 64)))
    positions = sum((64 // s) ** 2 for s in strides)
    assert rows.shape == (2, positions, 8 + 3) and sorted(rows[0, :, 2].unique().tolist()) == strides
    boxes = rows[..., 3:7]
    assert (boxes[..., 0] < rows[..., 0]).all() and (rows[..., 0] < boxes[..., 2]).all()  # each box around its position


def test_detections_pad_with_zero_rows_and_keep_the_best_first():
    outputs = torch.full((2, 5, 8 + 3), -20.0)
    outputs[..., 3:7] = torch.tensor([0.0, 0, 10, 10])  # every position: the same box
    outputs[0, 1, 7], outputs[0, 1, 8 + 2] = 20.0, 20.0  # image 0: one confident class-2 object
    outputs[0, 3, 7], outputs[0, 3, 8 + 2] = 20.0, 3.0  # the same object again, less sure: suppressed
    found = detections(outputs, 0.05, 0.6, 4, 10)
    assert found.shape == (2, 4, 6)
    assert found[0, 0].tolist() == pytest.approx([0, 0, 10, 10, 1.0, 2]) and (found[0, 1:] == 0).all() and (found[1] == 0).all()
    assert torch.equal(detections(outputs, 0.05, 0.6, 4, 2), found)  # fewer candidates than rows: padded all the same
    # parity counts matches both ways; an image where neither output finds anything agrees
    assert Detection().compare(found, found) == {"detection_agreement": (3, 3)}
    assert Detection().compare(found, torch.zeros_like(found)) == {"detection_agreement": (1, 2)}


# --------------------------------------------------------------------------- the chain


def test_a_detector_trains_resumes_evaluates_exports_with_nms_inside_and_predicts(cli, tmp_path, digits_root):
    config = write_config(tmp_path / "scenes.yaml", SCENES.format(root=digits_root))
    whole, resumed = killed_and_resumed("finetune", config, [], tmp_path)
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    run = next((tmp_path / "runs").iterdir())
    runs = tmp_path / "runs"
    evaluation = cli("evaluate", "--from", run, "--runs-dir", runs, "--json")
    assert evaluation.code == 0, evaluation.stderr
    metrics = evaluation.json["metrics"]
    assert 0 <= metrics["map"] <= metrics["map_50"] <= 1 and metrics["objects"] > 16
    assert set(evaluation.json["per_class_ap"]) == {
        f"{d} - {w}" for d, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    }
    assert (Path(evaluation.json["run_dir"]) / "detections.png").is_file()

    export = cli("export", "--from", run, "--format", "onnx", "--runs-dir", runs, "--json")
    assert export.code == 0, export.stderr
    parity = export.json["parity"]["onnx"]
    assert parity["passed"] and parity["detection_agreement"] >= 0.99
    import onnx

    graph = onnx.load(export.json["files"]["onnx"]).graph
    assert [o.name for o in graph.output] == ["detections"] and {"TopK", "Trilu"} <= {n.op_type for n in graph.node}
    card = json.loads((Path(export.json["export_dir"]) / "model_card.json").read_text())
    assert card["kind"] == "detector" and card["output"]["shape"][1:] == [100, 6]

    # predict from the export folder alone: boxes in the input's own pixels (a 96x48 image letterboxed into 32x32)
    Image.new("L", (96, 48)).save(tmp_path / "wide.png")
    drawn = tmp_path / "drawn"
    served = cli(
        "predict", "--from", export.json["export_dir"], tmp_path / "wide.png", "-o", tmp_path / "found.jsonl", "--save-images", drawn
    )
    assert served.code == 0, served.stderr
    record = json.loads((tmp_path / "found.jsonl").read_text())
    assert record["count"] == len(record["objects"]) > 0
    with Image.open(record["drawn"]) as image:  # the input's own pixels, with the boxes drawn in colour
        assert image.size == (96, 48) and len(image.getcolors(maxcolors=1 << 16)) > 1
    from_run = cli("predict", "--from", run, tmp_path / "wide.png", "--runs-dir", runs, "-o", tmp_path / "run.jsonl")
    assert from_run.code == 0, from_run.stderr
    best = json.loads((tmp_path / "run.jsonl").read_text())["objects"][0]
    assert best["label"] == record["objects"][0]["label"] and best["box"] == pytest.approx(record["objects"][0]["box"], abs=0.05)
    for found in record["objects"]:
        x1, y1, x2, y2 = found["box"]
        assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 48
