"""Run directories written by transferctl 0.1.0 (checkpoint format 1, `method: simclr` configs without a task) still
resume, serve as --from, evaluate, export and show. The fixture was made with that release (tiny.yaml says how)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "format1"
PRETRAIN, FINETUNE, EVALUATE = (
    "20261201-093111-simclr-mnist_sample-8ac8",
    "20261201-093117-finetune-mnist_sample-abdc",
    "20261201-095322-evaluate-mnist_sample-53ed",
)


@pytest.fixture
def runs(tmp_path) -> Path:
    """A copy of the old runs (a resume writes into its run)."""
    return Path(shutil.copytree(FIXTURE / "runs", tmp_path / "runs"))


def _ok(result) -> dict:
    assert result.code == 0, result.stderr
    return result.json


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_the_fixture_is_format_1():
    saved = torch.load(FIXTURE / "runs" / PRETRAIN / "checkpoints" / "last.pt", weights_only=True)
    assert saved["format"] == 1 and "position" in saved and "training" not in saved


def _as_format_1(path: Path) -> None:
    """Rewrite a checkpoint in 0.1.0's layout: the training state at the top level, no task or network record."""
    saved = torch.load(path, weights_only=True)
    saved.update(saved.pop("training"))
    for key in ("task", "network"):
        saved.pop(key, None)
    torch.save({**saved, "format": 1}, path)


def test_an_old_run_resumes_exactly(cli, runs, tmp_path):
    """A format-1 checkpoint at step 3, extended to step 6, equals a 6-step run bit for bit: shown with today's 3-step
    run written back in format 1's layout, since the 0.1.0 fixture itself was trained on another CPU, whose kernels
    round differently (its own extension lands within float rounding of today's 6-step run, and is rewritten as
    format 3)."""
    config, fresh_runs, part_runs = FIXTURE / "tiny.yaml", tmp_path / "fresh", tmp_path / "part"
    fresh = _ok(cli("pretrain", "-c", config, "train.max_steps=6", "--runs-dir", fresh_runs, "--json"))
    part = _ok(cli("pretrain", "-c", config, "train.max_steps=3", "--runs-dir", part_runs, "--json"))
    _as_format_1(Path(part["run_dir"]) / "checkpoints" / "last.pt")
    assert _ok(cli("pretrain", "--resume", part["run_id"], "train.max_steps=6", "--runs-dir", part_runs, "--json"))["metrics"]["step"] == 6
    new, resumed = _weights(Path(fresh["run_dir"])), _weights(Path(part["run_dir"]))
    assert new.keys() == resumed.keys() and all(torch.equal(new[k], resumed[k]) for k in new)

    assert _ok(cli("pretrain", "--resume", PRETRAIN, "train.max_steps=6", "--runs-dir", runs, "--json"))["metrics"]["step"] == 6
    old = _weights(runs / PRETRAIN)
    assert old.keys() == new.keys() and all(torch.allclose(old[k].float(), new[k].float(), atol=1e-5) for k in old)
    assert torch.load(runs / PRETRAIN / "checkpoints" / "last.pt", weights_only=True)["format"] == 3


def test_an_old_run_serves_as_from_and_its_fine_tune_evaluates_and_exports_as_before(cli, runs):
    tuned = _ok(
        cli(
            "finetune",
            "--from",
            PRETRAIN,
            "data.labels_per_class=2",
            "data.batch_size=10",
            "train.max_steps=2",
            "train.device=cpu",
            "--runs-dir",
            runs,
            "--json",
        )
    )
    pretrained = {
        k.removeprefix("encoder."): v
        for k, v in torch.load(runs / PRETRAIN / "checkpoints" / "last.pt", weights_only=True)["model"].items()
        if k.startswith("encoder.")
    }
    assert tuned["parent"] == PRETRAIN and set(pretrained) == {
        k.removeprefix("encoder.") for k in _weights(Path(tuned["run_dir"])) if k.startswith("encoder.")
    }
    knn = _ok(cli("evaluate", "--from", PRETRAIN, "--runs-dir", runs, "--json"))
    assert set(knn["metrics"]) == {"knn_accuracy", "test_images"}
    # the old fine-tune, evaluated today, scores exactly what 0.1.0 measured (and, since 0.14, balanced accuracy and macro F1)
    before = json.loads((runs / EVALUATE / "summary.json").read_text())["metrics"]
    now = _ok(cli("evaluate", "--from", FINETUNE, "--runs-dir", runs, "--json"))["metrics"]
    assert {k: now[k] for k in before} == before and set(now) - set(before) == {"balanced_accuracy", "f1_macro"}
    exported = _ok(cli("export", "--from", FINETUNE, "--format", "torchscript", "--runs-dir", runs, "--json"))
    card = json.loads((runs / FINETUNE / "export" / "model_card.json").read_text())
    assert exported["parity"]["torchscript"]["passed"] and (card["kind"], card["method"], card["task"]) == (
        "classifier",
        "finetune",
        "classification",
    )


def test_old_runs_show_in_runs_ls_show_and_diff(cli, runs):
    listing = _ok(cli("runs", "ls", "--runs-dir", runs, "--json"))
    briefs = {r["run_id"]: r for r in listing["runs"]}
    assert {(r["command"], r["method"], r["task"], r["trains"]) for r in briefs.values()} == {
        ("pretrain", "simclr", None, "simclr"),
        ("finetune", "finetune", "classification", "classification"),  # 0.1.0's fine-tunes trained classifiers
        ("evaluate", "finetune", "classification", "finetune classification"),
    }
    assert listing["unreadable"] == [] and all(r["status"] == "completed" for r in briefs.values())
    human = cli("runs", "show", EVALUATE, "--runs-dir", runs)
    assert human.code == 0 and "finetune finetune" not in human.stderr and f"{FINETUNE} (finetune classification," in human.stderr
    shown = _ok(cli("runs", "show", PRETRAIN, "--runs-dir", runs, "--json"))
    assert [c["run_id"] for c in shown["lineage"]["children"]] == [FINETUNE]
    assert [g["run_id"] for g in shown["lineage"]["children"][0]["children"]] == [EVALUATE]
    diff = _ok(cli("runs", "diff", PRETRAIN, FINETUNE, "--runs-dir", runs, "--json"))
    assert diff["config"]["method"] == {"a": "simclr", "b": "finetune"}
