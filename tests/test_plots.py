"""Plots (curves, confusion matrix, SimCLR view pairs) and TensorBoard event files, written into runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transferctl import plots
from transferctl.data import load_training_data
from transferctl.data.augment import simclr
from transferctl.data.pipeline import MemoryPipeline
from transferctl.modalities import modality_named

matplotlib_image = pytest.importorskip("matplotlib.image")
PNG = b"\x89PNG\r\n\x1a\n"


def _png_shape(path: Path) -> tuple[int, ...]:
    assert path.read_bytes().startswith(PNG)
    return matplotlib_image.imread(path).shape


def _pretrain(cli, config, runs, *overrides):
    result = cli("pretrain", "-c", config, "train.max_steps=4", "train.epochs=2", *overrides, "--runs-dir", runs, "--json")
    assert result.code == 0, result.stderr
    return result.json


def _drawn(monkeypatch) -> dict:
    """Capture every figure a run draws, by file name, as it is written."""
    figures = {}
    write = plots._write_png

    def capture(run, name, draw):
        figures[name] = draw()
        write(run, name, lambda: figures[name])

    monkeypatch.setattr(plots, "_write_png", capture)
    return figures


def _lines(figure) -> dict[str, dict[str, list]]:
    """{panel title: {line label: y values}} of a curves figure."""
    return {ax.get_title(): {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()} for ax in figure.axes}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_evaluation_and_simclr_plots(cli, simclr_config, tmp_path, monkeypatch):
    from transferctl.build import build_training
    from transferctl.config import load_config
    from transferctl.modalities import modality_named

    figures = _drawn(monkeypatch)
    runs = tmp_path / "runs"
    pre = _pretrain(cli, simclr_config, runs, "data.batch_size=128")  # 540 images: 4 batches, 1 epoch
    pre_dir = Path(pre["run_dir"])
    rows = _rows(pre_dir)
    assert _lines(figures["curves.png"]) == {
        "loss": {"train_loss": [r["train_loss"] for r in rows], "val_loss": [r["val_loss"] for r in rows]},
        "learning rate": {"lr": [r["lr"] for r in rows]},
    }
    # views.png shows the first batch's two views, exactly as the pipeline made them for the model
    training = build_training(load_config(simclr_config, ["train.max_steps=4", "train.epochs=2", "data.batch_size=128"]))
    first = next(iter(training.pipeline.batches(0))).inputs
    shown = [[ax.get_images()[0].get_array() for ax in figures["views.png"].axes[row * 8 : (row + 1) * 8]] for row in range(2)]
    for view, images in zip(first, shown, strict=True):
        expected = modality_named("image").displayable(view[:8], training.train)[..., 0].numpy()
        assert np.allclose(np.stack(images), expected, atol=1e-6)
    assert _png_shape(pre_dir / "views.png")[:2] == (300, 1040)  # the written file is that figure: 8 images, a row per view

    tuned = cli(
        "finetune",
        "--from",
        pre["run_id"],
        "data.labels_per_class=5",
        "data.batch_size=16",
        "train.max_steps=8",
        "train.epochs=2",
        "train.val_every=1",
        "--runs-dir",
        runs,
        "--json",
    ).json
    tuned_rows = _rows(Path(tuned["run_dir"]))
    shown = ("val_accuracy", "val_balanced_accuracy", "val_f1_macro")
    assert _lines(figures["curves.png"])["validation"] == {key: [r[key] for r in tuned_rows] for key in shown}
    assert not (Path(tuned["run_dir"]) / "views.png").exists()
    evaluated = cli("evaluate", "--from", tuned["run_id"], "--runs-dir", runs, "--json").json
    confusion = json.loads((Path(evaluated["run_dir"]) / "confusion.json").read_text())["confusion"]
    (matrix_axes, _colorbar) = figures["confusion.png"].axes
    assert np.array_equal(matrix_axes.get_images()[0].get_array(), np.array(confusion))
    assert [t.get_text() for t in matrix_axes.texts] == [str(c) for row in confusion for c in row]
    metrics = evaluated["metrics"]
    title = f"accuracy {metrics['accuracy']:.3f}, balanced {metrics['balanced_accuracy']:.3f}, macro F1 {metrics['f1_macro']:.3f}"
    assert matrix_axes.get_title() == title
    assert (Path(evaluated["run_dir"]) / "confusion.png").read_bytes().startswith(PNG)
    knn = cli("evaluate", "--from", pre["run_id"], "eval.knn_k=5", "--runs-dir", runs, "--json").json
    assert not list(Path(knn["run_dir"]).glob("*.png"))
    assert not list(runs.rglob(".*.tmp"))


def test_without_matplotlib_runs_have_no_plots_and_no_complaints(cli, simclr_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when it is not installed
    assert not plots.available()
    result = cli("pretrain", "-c", simclr_config, "train.max_steps=2", "--quiet", "--runs-dir", tmp_path / "runs")
    assert result.code == 0 and result.stderr == ""
    run_dir = Path(result.stdout.strip())
    assert (run_dir / "metrics.csv").exists() and not list(run_dir.glob("*.png"))
    assert "not written" not in (run_dir / "log.txt").read_text()


def test_a_plot_that_fails_never_fails_the_run(cli, simclr_config, tmp_path, monkeypatch):
    def broken(rows):
        raise ValueError("no fonts")

    monkeypatch.setattr(plots, "_curves", broken)
    run = _pretrain(cli, simclr_config, tmp_path / "runs")
    run_dir = Path(run["run_dir"])
    assert run["status"] == "completed" and not (run_dir / "curves.png").exists() and (run_dir / "views.png").exists()
    assert "curves.png not written: ValueError: no fonts" in (run_dir / "log.txt").read_text()


def test_first_batch_keeps_what_the_model_saw_and_changes_nothing(digits_root, simclr_config):
    from transferctl.config import load_config

    train = load_training_data(load_config(simclr_config).data, labelled_subset=False).train
    augment = simclr(hflip_default=False)

    def pipeline():
        return MemoryPipeline(train, augment, modality_named("image"), views=2, batch_size=32, seed=5, drop_last=True)

    plain, kept = pipeline(), plots.FirstBatch(pipeline(), keep=4)
    for epoch in range(2):
        for a, b in zip(plain.batches(epoch), kept.batches(epoch), strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs, strict=True))
    first = next(iter(pipeline().batches(0))).inputs
    assert len(kept.inputs) == 2 and all(torch.equal(v, f[:4]) for v, f in zip(kept.inputs, first, strict=True))
    assert torch.equal(kept.state()["augment"], plain.state()["augment"])


def test_tensorboard_event_files(cli, simclr_config, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator  # the dev extra installs it

    run = _pretrain(cli, simclr_config, tmp_path / "runs", "train.tensorboard=true", "train.log_every=1")
    (events,) = (Path(run["run_dir"]) / "tensorboard").iterdir()
    accumulator = event_accumulator.EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"step/loss", "step/lr", "step/samples_per_s", "epoch/train_loss", "epoch/val_loss"} <= tags
    assert [e.step for e in accumulator.Scalars("step/loss")] == [1, 2, 3, 4]
    (last,) = accumulator.Scalars("epoch/val_loss")
    assert last.step == 4 and last.value == pytest.approx(run["metrics"]["val_loss"], rel=1e-6)


def test_tensorboard_asked_for_but_not_installed(cli, simclr_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    result = cli("pretrain", "-c", simclr_config, "train.tensorboard=true", "--runs-dir", tmp_path / "runs")
    assert result.code == 2 and result.stderr.count("\n") == 1
    assert 'train.tensorboard: true needs the tensorboard package: pip install "transferctl[tensorboard]" (or drop it)' in result.stderr
    assert not (tmp_path / "runs").exists()
