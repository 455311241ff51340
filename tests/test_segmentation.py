"""Segmentation fine-tuning: masks that move with their images through every geometric augmentation, mIoU and
pixel accuracy against a hand computation, seeded mnist_scenes, segmentation folders and their bad masks, the
whole chain (train, evaluate, export with pixel agreement) and an exact resume after SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_config
from tests.test_resume import killed_and_resumed
from transferctl.data.augment import IGNORE_INDEX, BatchAugment
from transferctl.data.segmentation import compose_scenes
from transferctl.registry import MODELS
from transferctl.tasks.segmentation import dice_loss, iou_metrics, pixel_confusion, unet_head

SCENES = """\
method: finetune
task: segmentation
model: {{name: cnn, widths: [8, 16]}}
head: {{name: {head}, width: 8}}
optimizer: {{name: adamw, lr: 0.003}}
scheduler: {{name: constant}}
data: {{name: mnist_scenes, root: {root}, train_scenes: 80, test_scenes: 16, image_size: 32, batch_size: 16, eval_batch_size: 64,
        labeled_samples: 48}}
train: {{epochs: {epochs}, log_every: 2, device: cpu}}
"""


def _ok(result):
    assert result.code == 0, result.stderr
    return result.json


@pytest.mark.parametrize(
    "augment",
    [
        BatchAugment(rotation=90.0),
        BatchAugment(crop_scale=(0.3, 0.6), crop_ratio=(0.7, 1.4)),
        BatchAugment(translate=0.25),
        BatchAugment(hflip=True),
        BatchAugment(crop_scale=(0.5, 1.0), rotation=45.0, translate=0.1, hflip=True, brightness=0.5, jitter_p=1.0),
    ],
)
def test_a_mask_stays_on_its_image_through_every_geometric_augmentation(augment):
    # each image: a few bright rectangles on black, the mask naming each rectangle's pixels by its own class
    generator = torch.Generator().manual_seed(0)
    images, masks = torch.zeros(6, 1, 32, 32), torch.zeros(6, 32, 32, dtype=torch.uint8)
    for i in range(6):
        for cls in (1, 2, 3):
            top, left = torch.randint(0, 24, (2,), generator=generator).tolist()
            images[i, 0, top : top + 8, left : left + 6] = 1.0
            masks[i, top : top + 8, left : left + 6] = cls
    moved, moved_masks = augment.with_masks(images, masks, torch.Generator().manual_seed(1))
    labelled = (moved_masks > 0) & (moved_masks != IGNORE_INDEX)
    background = moved_masks == 0
    assert labelled.sum() > 100  # the rectangles survived
    # bright pixels sit where the mask names a rectangle; dark ones where it says background (edges blur a little)
    bright = 0.8 if augment.brightness == 0 else 0.45  # photometric jitter dims some images, the image only
    assert moved[:, 0][labelled].mean() > bright and moved[:, 0][background].mean() < 0.1
    if augment.brightness == 0:
        assert (moved[:, 0][labelled] > 0.5).float().mean() > 0.95
    same_draws, _ = augment.with_masks(images, masks, torch.Generator().manual_seed(1))
    assert torch.equal(moved, same_draws)  # seeded
    assert torch.equal(moved, augment(images, torch.Generator().manual_seed(1)))  # the images move exactly as without masks


def test_pixels_brought_in_from_outside_the_image_have_no_class():
    masks = torch.ones(2, 16, 16, dtype=torch.uint8)
    _, moved = BatchAugment(translate=0.4).with_masks(torch.ones(2, 1, 16, 16), masks, torch.Generator().manual_seed(3))
    assert set(moved.unique().tolist()) == {1, IGNORE_INDEX}


def test_miou_and_pixel_accuracy_agree_with_a_hand_computation():
    truth = torch.tensor([[0, 0, 1, 1], [0, 2, 2, IGNORE_INDEX]])
    guess = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    confusion = pixel_confusion(guess, truth, 4)
    # class 0: 3 true, 2 hit, predicted 3 times -> IoU 2 / (3 + 3 - 2); class 1: 2 true, 2 hit, predicted 3 -> 2 / 3;
    # class 2: 2 true, 1 hit, predicted 1 (the ignored pixel does not count) -> 1 / 2; class 3: absent everywhere
    metrics = iou_metrics(confusion)
    assert metrics["per_class_iou"][:3] == pytest.approx([0.5, 2 / 3, 0.5]) and metrics["per_class_iou"][3] is None
    assert metrics["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(5 / 7)


def test_dice_loss_is_zero_for_a_perfect_prediction_and_ignores_unlabelled_pixels():
    masks = torch.tensor([[[0, 1], [1, IGNORE_INDEX]]])
    perfect = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [1, 0]]]), 2).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, masks).item() == pytest.approx(0.0, abs=1e-3)
    # all wrong: per class (2 * 0 + 1) / (predicted + true + 1) = 1 / 4 for both (smoothing 1), so 1 - 1/4
    assert dice_loss(-perfect, masks).item() == pytest.approx(0.75)
    changed = perfect.clone()
    changed[0, :, 1, 1] = torch.tensor([-50.0, 50.0])  # the unlabelled pixel's prediction counts for nothing
    assert dice_loss(changed, masks).item() == pytest.approx(dice_loss(perfect, masks).item())


def test_scenes_are_seeded_and_their_masks_mark_the_strokes():
    digits = torch.zeros(3, 28, 28, dtype=torch.uint8)
    digits[:, 8:20, 12:16] = 255  # a bar
    labels = torch.tensor([4, 7, 9])
    first = compose_scenes(digits, labels, 20, 64, 4, torch.Generator().manual_seed(5))
    again = compose_scenes(digits, labels, 20, 64, 4, torch.Generator().manual_seed(5))
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    assert all(torch.equal(a, b) for a, b in zip(first.boxes + first.labels, again.boxes + again.labels, strict=True))
    images, masks = first.images, first.masks
    assert set(masks.unique().tolist()) <= {0, 5, 8, 10}  # a digit's class + 1; 0 the background
    assert ((images[:, 0] >= 128) == (masks > 0)).all()  # a stroke pixel is a masked pixel, and only those


# the U-Net stacks more batch norms: their running statistics need more steps before eval mode predicts sensibly
@pytest.mark.parametrize(("head", "epochs"), [("fpn", 3), ("unet", 8)])
def test_a_segmenter_trains_evaluates_and_exports_with_pixel_agreement(cli, tmp_path, digits_root, head, epochs):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "scenes.yaml", SCENES.format(root=digits_root, head=head, epochs=epochs))
    tuned = _ok(cli("finetune", "-c", config, "optimizer.lr=0.01", "--runs-dir", runs, "--json"))  # 9 or 24 steps: learn fast
    assert {"val_miou", "val_pixel_accuracy", "best_val_miou"} <= set(tuned["metrics"])
    evaluation = _ok(cli("evaluate", "--from", tuned["run_id"], "--runs-dir", runs, "--json"))
    saved = json.loads((Path(evaluation["run_dir"]) / "confusion.json").read_text())
    confusion = np.array(saved["pixel_confusion"])  # rows the true class, columns the predicted
    assert len(saved["classes"]) == 11 and confusion.sum() == 16 * 32 * 32
    reported = iou_metrics(torch.from_numpy(confusion))
    assert evaluation["metrics"]["miou"] == pytest.approx(reported["miou"])
    assert evaluation["metrics"]["pixel_accuracy"] == pytest.approx(reported["pixel_accuracy"])
    # it learnt where the digits are: the IoU of digit pixels (any digit's class) against the background. Background
    # everywhere scores 0 (and a pixel accuracy of 0.82, the background's share), a digit everywhere 0.18, these runs
    # trained on blank masks 0-0.02 (0.40-0.46 at lr 0.003, where so few steps barely move the network); these runs
    # 0.77-0.83. (Which digit it is, they do not learn in so few steps.)
    hits, digits, guessed = confusion[1:, 1:].sum(), confusion[1:].sum(), confusion[:, 1:].sum()
    assert hits / (digits + guessed - hits) > 0.6 and hits / digits > 0.8, confusion
    assert (Path(evaluation["run_dir"]) / "segmentation.png").is_file()
    export = _ok(cli("export", "--from", tuned["run_id"], "--format", "torchscript", "--format", "onnx", "--runs-dir", runs, "--json"))
    assert all(p["passed"] and p["pixel_agreement"] >= 0.999 and p["top1_agreement"] is None for p in export["parity"].values())
    card = json.loads((Path(export["export_dir"]) / "model_card.json").read_text())
    assert card["kind"] == "segmenter" and card["output"]["shape"] == ["batch", 11, 32, 32] and card["classes"][0] == "background"


@pytest.mark.parametrize(
    ("encoder", "options"),
    [("cnn", {"widths": (8,)}), ("cnn", {"widths": (8, 16, 32)}), ("resnet18", {"small_images": False})],  # resnet18: strides 4 to 32
)
@pytest.mark.parametrize("context", [0, 2])
def test_the_unet_head_gives_class_logits_for_every_input_pixel(encoder, options, context):
    body = MODELS.build(encoder, options, in_channels=1, image_size=40)
    head = unet_head(body.stage_channels, num_outputs=11, sample_shape=(1, 40, 40), width=4, context=context)
    logits = head(body.feature_maps(torch.rand(2, 1, 40, 40)))
    assert logits.shape == (2, 11, 40, 40) and logits.std() > 0


def test_bad_segmentation_configs_are_one_line_errors(cli, tmp_path, digits_root):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "scenes.yaml", SCENES.format(root=digits_root, head="fpn", epochs=3))
    for override, named in {
        "data.labels_per_class=5": "data.labeled_samples",
        "data.pipeline=loader": "does not move masks",
        "model.name=mlp": "stage feature maps",
    }.items():
        result = cli("finetune", "-c", config, override, "--runs-dir", runs)
        assert result.code == 2 and named in result.stderr and len(result.stderr.strip().splitlines()) == 1, (override, result.stderr)
    assert not runs.exists() or not any(runs.iterdir())


def _folder(root: Path, mask_size: int = 12, bad_index: int | None = None) -> Path:
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("sky\nground\n")
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(8):
            mask = np.zeros((mask_size, mask_size), dtype=np.uint8)
            mask[mask_size // 2 :] = 1
            if bad_index is not None and i == 3:
                mask[0, 0] = bad_index
            Image.fromarray((mask * 200).astype(np.uint8)).convert("RGB").resize((12, 12)).save(root / split / "images" / f"s{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"s{i}.png")
    return root


FOLDER = """\
method: finetune
task: segmentation
model: {{name: cnn, widths: [8, 16]}}
head: {{name: fpn, width: 8}}
data: {{name: segmentation_folder, root: {root}, image_size: 16, batch_size: 4, val_fraction: 0.25}}
train: {{epochs: 1, device: cpu}}
"""


@pytest.mark.parametrize(("mask_size", "bad_index", "named"), [(12, None, None), (10, None, "give them the same size"), (12, 7, "outside")])
def test_segmentation_folders_and_their_bad_masks(cli, tmp_path, mask_size, bad_index, named):
    root, runs = _folder(tmp_path / "data", mask_size, bad_index), tmp_path / "runs"
    result = cli("finetune", "-c", write_config(tmp_path / "folder.yaml", FOLDER.format(root=root)), "--runs-dir", runs)
    if named is None:
        assert result.code == 0, result.stderr
        return
    assert result.code == 2 and named in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_a_killed_segmentation_fine_tune_resumes_bit_exactly(tmp_path, digits_root):
    config = write_config(tmp_path / "scenes.yaml", SCENES.format(root=digits_root, head="unet", epochs=3))
    short = ["train.epochs=3", "train.checkpoint_every=2"]
    a, b = killed_and_resumed("finetune", config, short, tmp_path)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
