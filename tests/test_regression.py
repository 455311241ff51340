"""Regression fine-tuning: metrics against a hand computation, standardized targets that round-trip through the
checkpoint and every export, the data sets (mnist_rotation, regression_folder) and their bad inputs, the label
budget (data.labeled_samples), augmentations that would corrupt the targets, and an exact resume after SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from tests.conftest import write_config
from tests.test_resume import killed_and_resumed
from transferctl.components import load_components
from transferctl.config import DataConfig, load_config
from transferctl.data import load_split, load_training_data
from transferctl.data.regression import rotate
from transferctl.tasks.regression import regression_metrics

ROTATION = """\
method: finetune
task: regression
model: {{name: cnn, widths: [8, 16]}}
optimizer: {{name: adamw, lr: 0.003}}
scheduler: {{name: constant}}
data: {{name: mnist_rotation, root: {root}, batch_size: 50, eval_batch_size: 256, labeled_samples: 200}}
train: {{epochs: 3, log_every: 2, device: cpu}}
"""


def _ok(result):
    assert result.code == 0, result.stderr
    return result.json


def test_metrics_agree_with_a_hand_computation():
    predictions = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 20.0]])
    targets = torch.tensor([[1.0, 12.0], [3.0, 18.0], [2.0, 24.0]])
    metrics = regression_metrics(predictions, targets)
    # column 0: errors 0, -1, 2; column 1: errors -2, 2, -4
    assert torch.allclose(metrics["mean_abs_error"], torch.tensor([1.0, 8 / 3], dtype=torch.float64))
    assert torch.allclose(metrics["rmse"], torch.tensor([(5 / 3) ** 0.5, 8**0.5], dtype=torch.float64))
    # r2 = 1 - SS_res / SS_tot: column 0 targets mean 2, SS_tot 2; column 1 mean 18, SS_tot 36 + 0 + 36
    assert torch.allclose(metrics["r2"], torch.tensor([1 - 5 / 2, 1 - 24 / 72], dtype=torch.float64))


def test_rotation_turns_counter_clockwise_as_torchvision_does():
    image = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    image[0, 0, 4:10, 12:16] = 255  # a bar above the centre
    ours = rotate(image, torch.tensor([90.0]))
    theirs = TF.rotate(image, 90.0, interpolation=TF.InterpolationMode.BILINEAR)
    assert ours[0, 0, 12:16, 4:10].float().mean() > 200  # now left of the centre
    assert (ours.float() - theirs.float()).abs().mean() < 5


def test_mnist_rotation_is_seeded_and_its_targets_are_the_angles(digits_root):
    load_components()
    cfg = load_config(None, base={"method": "finetune", "task": "regression", "data": {"name": "mnist_rotation", "root": str(digits_root)}})
    first, second = (load_training_data(cfg.data, labelled_subset=True).train for _ in range(2))
    assert torch.equal(first.inputs, second.inputs) and torch.equal(first.targets, second.targets)
    assert first.target_kind == "values" and first.target_names == ("angle",) and first.targets.shape == (540, 1)
    angles = first.targets[:, 0]
    assert angles.abs().max() <= 45 and angles.std() > 20  # spread over [-45, 45]


def test_labeled_samples_is_a_seeded_reproducible_subset(digits_root):
    load_components()

    def chosen(seed: int) -> torch.Tensor:
        cfg = load_config(
            None, base={"method": "finetune", "data": {"name": "mnist", "root": str(digits_root), "labeled_samples": 30, "seed": seed}}
        )
        return load_training_data(cfg.data, labelled_subset=True).train.inputs

    assert len(chosen(0)) == 30 and torch.equal(chosen(0), chosen(0))
    assert not torch.equal(chosen(0), chosen(1))


def test_a_regressor_trains_evaluates_and_exports_in_the_targets_units(cli, tmp_path, digits_root):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "rotation.yaml", ROTATION.format(root=digits_root))
    tuned = _ok(cli("finetune", "-c", config, "data.batch_size=16", "--runs-dir", runs, "--json"))  # 39 steps: room to learn
    checkpoint = torch.load(Path(tuned["run_dir"]) / "checkpoints" / "best.pt", weights_only=True)
    fitted = checkpoint["task"]
    assert fitted["target_names"] == ["angle"] and 15 < fitted["std"][0] < 35
    assert checkpoint["model"]["head.target_std"].item() == pytest.approx(fitted["std"][0])  # the head de-standardizes

    evaluation = _ok(cli("evaluate", "--from", tuned["run_id"], "--runs-dir", runs, "--json"))
    metrics = evaluation["metrics"]
    assert {"mean_abs_error", "rmse", "r2"} <= set(metrics) and metrics["rmse"] >= metrics["mean_abs_error"]
    # better than any constant guess: r2 > 0 beats the test angles' own mean (in squared error), and the mean absolute
    # error beats always guessing 0 (21.2 degrees on these test angles; 22.5 expected of uniform ones). This run: r2 0.2,
    # 18.9 degrees
    angles = load_split(DataConfig(name="mnist_rotation", root=str(digits_root)), train=False).targets[:, 0]
    assert metrics["r2"] > 0.1 and metrics["mean_abs_error"] < 0.95 * angles.abs().mean().item()
    saved = json.loads((Path(evaluation["run_dir"]) / "regression.json").read_text())
    assert saved["targets"]["angle"]["mean_abs_error"] == pytest.approx(metrics["mean_abs_error"])
    assert (Path(evaluation["run_dir"]) / "regression.png").is_file()

    export = _ok(
        cli(
            "export",
            "--from",
            tuned["run_id"],
            "--format",
            "torchscript",
            "--format",
            "onnx",
            "--format",
            "safetensors",
            "--runs-dir",
            runs,
            "--json",
        )
    )
    assert all(p["passed"] and p["top1_agreement"] is None for p in export["parity"].values())
    card = json.loads((Path(export["export_dir"]) / "model_card.json").read_text())
    assert card["kind"] == "regressor" and card["targets"] == ["angle"] and card["output"]["shape"] == ["batch", 1]
    assert card["target_std"] == pytest.approx(fitted["std"])
    from transferctl.export import load_safetensors

    rebuilt = load_safetensors(export["files"]["safetensors"])
    assert rebuilt.network.head.target_mean.item() == pytest.approx(fitted["mean"][0])  # the units survive the file (behind the pixels)


def test_bad_regression_configs_are_one_line_errors_that_write_nothing(cli, tmp_path, digits_root):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "rotation.yaml", ROTATION.format(root=digits_root))
    cases = {
        "data.augment.name=light": "rotation",  # light rotates: the angles would be wrong
        "data.name=mnist": "targets of kind 'values'",  # digits have classes, not values
        "data.labels_per_class=5": "data.labeled_samples",  # no class per sample
        "finetune.unlabeled.weight=1": "pseudo-labels",
    }
    for override, named in cases.items():
        result = cli("finetune", "-c", config, override, "--runs-dir", runs)
        assert result.code == 2 and named in result.stderr and len(result.stderr.strip().splitlines()) == 1, (override, result.stderr)
    both = cli("finetune", "-c", config, "data.name=mnist", "task=classification", "data.labels_per_class=5", "--runs-dir", runs)
    assert both.code == 2 and "set one of them" in both.stderr
    assert not runs.exists() or not any(runs.iterdir())


def _regression_folder(root: Path, rows: dict[str, str], header: str = "file,size,brightness") -> Path:
    for split in ("train", "test"):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(12):
            Image.new("L", (20, 20), color=i * 20).save(folder / f"im{i}.png")
        lines = [header, *(f"im{i}.png,{i},{i * 20}" for i in range(12))]
        (folder / "targets.csv").write_text("\n".join(lines) + "\n")
    table = root / "train" / "targets.csv"
    table.write_text(table.read_text() + "".join(f"{name},{values}\n" for name, values in rows.items()))
    return root


FOLDER = """\
method: finetune
task: regression
model: {{name: cnn, widths: [8, 16]}}
optimizer: {{name: adamw, lr: 0.003}}
data: {{name: regression_folder, root: {root}, image_size: 16, channels: 1, batch_size: 8, val_fraction: 0.25}}
train: {{epochs: 1, device: cpu}}
"""


def test_a_regression_folder_reads_several_targets(cli, tmp_path):
    root = _regression_folder(tmp_path / "data", {})
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "folder.yaml", FOLDER.format(root=root))
    tuned = _ok(cli("finetune", "-c", config, "--runs-dir", runs, "--json"))
    metrics = _ok(cli("evaluate", "--from", tuned["run_id"], "--runs-dir", runs, "--json"))["metrics"]
    assert {"size_mean_abs_error", "brightness_r2", "mean_abs_error"} <= set(metrics)
    other = (root / "test" / "targets.csv").read_text().replace("file,size,brightness", "file,size,weight")
    (root / "test" / "targets.csv").write_text(other)
    mismatch = cli("evaluate", "--from", tuned["run_id"], "--runs-dir", runs)
    assert mismatch.code == 2 and "differ from the trained targets ['size', 'brightness']" in mismatch.stderr
    assert len(list(runs.iterdir())) == 2  # the fine-tune and its evaluation: the refused one wrote nothing


@pytest.mark.parametrize(
    ("rows", "header", "named"),
    [
        ({"missing.png": "1,2"}, "file,size,brightness", "does not exist"),
        ({"im0.png": "1,"}, "file,size,brightness", "missing"),
        ({"im0.png": "1,bright"}, "file,size,brightness", "'bright' is not a number"),
        ({}, "file", "name the columns"),
    ],
)
def test_bad_targets_files_are_one_line_errors(cli, tmp_path, rows, header, named):
    root = _regression_folder(tmp_path / "data", rows, header)
    runs = tmp_path / "runs"
    result = cli("finetune", "-c", write_config(tmp_path / "folder.yaml", FOLDER.format(root=root)), "--runs-dir", runs)
    assert result.code == 2 and named in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_a_killed_regression_fine_tune_resumes_bit_exactly(tmp_path, digits_root):
    config = write_config(tmp_path / "rotation.yaml", ROTATION.format(root=digits_root))
    short = ["train.epochs=3", "train.checkpoint_every=2"]
    a, b = killed_and_resumed("finetune", config, short, tmp_path)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_fine_tune_on_another_data_set_takes_none_of_the_sources_data_options(cli, tmp_path, digits_root, simclr_config):
    runs = tmp_path / "runs"
    source = _ok(
        cli(
            "pretrain",
            "-c",
            simclr_config,
            "data.name=mnist_rotation",
            "data.max_angle=30",
            "train.max_steps=2",
            "--runs-dir",
            runs,
            "--json",
        )
    )
    classify = write_config(tmp_path / "digits.yaml", "data: {name: mnist, labels_per_class: 5}\ntrain: {max_steps: 2}\n")
    tuned = _ok(cli("finetune", "--from", source["run_id"], "-c", classify, "--runs-dir", runs, "--json"))  # no max_angle for mnist
    shown = _ok(cli("runs", "show", tuned["run_id"], "--runs-dir", runs, "--json"))
    assert shown["config"]["data"]["root"] == str(digits_root.resolve()) and "max_angle" not in shown["config"]["data"]


def test_a_regression_folder_refuses_the_same_folder_for_training_and_test(cli, tmp_path):
    root, runs = _regression_folder(tmp_path / "data", {}), tmp_path / "runs"
    config = write_config(tmp_path / "folder.yaml", FOLDER.format(root=root))
    result = cli("finetune", "-c", config, "data.test_dir=train", "--runs-dir", runs)
    assert result.code == 2 and "two different folders" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not runs.exists() or not any(runs.iterdir())
