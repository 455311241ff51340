"""Run directories written by transferctl 0.8.0 (commit 3f0d340, checkpoint format 2: an image pretrain and its
fine-tune, and audio, text, regression and segmentation fine-tunes) still evaluate exactly as they did then, serve
as `finetune --from` and export. The fixture's README.md and YAML headers say how it was made."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import make_mnist_root

FIXTURE = Path(__file__).parent / "fixtures" / "format2"
MADE_IN = "/tmp/format2/data"  # where the data lay when the runs were made: their config.yaml name it

PRETRAIN = "20261206-031308-simclr-mnist_sample-e1bc"
# each run that trained, and the run that evaluated it then
EVALUATED = {
    PRETRAIN: "20261206-031329-evaluate-mnist_sample-6bf3",  # k-NN
    "20261206-031318-finetune-mnist_sample-3652": "20261206-031340-evaluate-mnist_sample-3e1c",
    "20261206-031351-finetune-audio_folder-1d86": "20261206-031400-evaluate-audio_folder-2de3",
    "20261206-031409-finetune-text_csv-1252": "20261206-031416-evaluate-text_csv-cac1",
    "20261206-031424-finetune-mnist_rotation-1998": "20261206-031434-evaluate-mnist_rotation-9f83",
    "20261206-031444-finetune-mnist_scenes-acf0": "20261206-031500-evaluate-mnist_scenes-21f4",
}
IMAGE, AUDIO, TEXT, REGRESSION, SEGMENTATION = list(EVALUATED)[1:]
KINDS = {  # the model card's kind and task of each run's export
    PRETRAIN: ("encoder", None),
    IMAGE: ("classifier", "classification"),
    AUDIO: ("classifier", "classification"),
    TEXT: ("classifier", "classification"),
    REGRESSION: ("regressor", "regression"),
    SEGMENTATION: ("segmenter", "segmentation"),
}
RESULT_FILES = ("confusion.json", "regression.json")  # what an evaluation writes beside its summary


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: models this small run fastest on one thread


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A copy of the runs whose configs name data that is here: the shipped audio and text, and the digits made as
    they were then. Tests only read it (new runs go to their own --runs-dir; an export writes into its run: a copy)."""
    root = tmp_path_factory.mktemp("format2")
    data = Path(shutil.copytree(FIXTURE / "data", root / "data"))
    make_mnist_root(data / "mnist", 200, 100)
    copied = Path(shutil.copytree(FIXTURE / "runs", root / "runs"))
    for config in copied.glob("*/config.yaml"):
        config.write_text(config.read_text().replace(MADE_IN, str(data)))
    return copied


def _ok(result) -> dict:
    assert result.code == 0, result.stderr
    return result.json


def _checkpoint(run_dir: Path, name: str = "last") -> dict:
    return torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)


def test_the_fixture_is_format_2_and_names_data_elsewhere():
    for run in EVALUATED:
        for name in ("last", "best"):
            saved = _checkpoint(FIXTURE / "runs" / run, name)
            assert saved["format"] == 2 and saved["transferctl"] == "0.8.0" and "task" in saved, (run, name)
            assert ("training" in saved) == (name == "last") and "position" not in saved, (run, name)
    assert _checkpoint(FIXTURE / "runs" / REGRESSION)["task"]["target_names"] == ["angle"]
    configs = [(FIXTURE / "runs" / run / "config.yaml").read_text() for run in EVALUATED]
    assert sum(MADE_IN in text for text in configs) == 4  # all but the image runs' (mnist_sample ships with transferctl)


def test_a_fine_tune_resumes(cli, runs, tmp_path):
    """The audio fine-tune goes on from its format-2 last.pt (step 3 of its 2 epochs' 4). Not compared with a fresh
    4-step run: that is equal only on the two threads that made the fixture, and slow on a busy machine."""
    copy = Path(shutil.copytree(runs / AUDIO, tmp_path / "runs" / AUDIO))  # a resume writes into its run
    resumed = _ok(cli("finetune", "--resume", copy, "train.max_steps=4", "--runs-dir", tmp_path / "runs", "--json"))
    saved = _checkpoint(copy)
    assert resumed["run_id"] == AUDIO and resumed["metrics"]["step"] == saved["step"] == 4 and saved["epoch"] == 2
    before = _checkpoint(runs / AUDIO)
    assert any(not torch.equal(before["model"][k], saved["model"][k]) for k in before["model"])  # it trained on


@pytest.mark.parametrize("run", list(EVALUATED))
def test_a_run_evaluates_exactly_as_it_did(cli, runs, tmp_path, run):
    evaluation = _ok(cli("evaluate", "--from", runs / run, "--runs-dir", tmp_path / "runs", "--json"))
    before = runs / EVALUATED[run]
    assert evaluation["parent"] == run
    measured = json.loads((before / "summary.json").read_text())["metrics"]
    assert {k: evaluation["metrics"][k] for k in measured} == measured
    assert set(evaluation["metrics"]) - set(measured) <= {"balanced_accuracy", "f1_macro"}  # what classifiers add since 0.14
    for name in RESULT_FILES:  # the confusion matrix (pixels, for the segmenter), the regressor's per-target errors
        if (before / name).is_file():
            assert json.loads((Path(evaluation["run_dir"]) / name).read_text()) == json.loads((before / name).read_text())


@pytest.mark.parametrize(
    ("run", "overrides"),
    [
        (PRETRAIN, ["data.labels_per_class=2", "data.batch_size=10"]),
        (AUDIO, ["data.labels_per_class=3", "data.batch_size=4"]),
        (TEXT, ["data.labels_per_class=5", "data.batch_size=8"]),
    ],
)
def test_a_run_serves_as_from_and_its_encoder_is_the_start(cli, runs, tmp_path, run, overrides):
    """With the encoder frozen, the fine-tune's encoder is the source's, weight for weight."""
    result = cli(
        "finetune",
        "--from",
        runs / run,
        *overrides,
        "finetune.freeze_encoder=true",
        "train.max_steps=2",
        "train.device=cpu",
        "--runs-dir",
        tmp_path / "runs",
        "--json",
    )
    tuned = _ok(result)
    assert tuned["parent"] == run and tuned["metrics"]["step"] == 2
    source, fine_tuned = _checkpoint(runs / run), _checkpoint(Path(tuned["run_dir"]))
    encoder = {k: v for k, v in source["model"].items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(fine_tuned["model"][k], v) for k, v in encoder.items())
    fitted = source["data"]  # the source's fitted inputs: mean and std, front end, tokenizer
    if run == AUDIO:  # 0.8 recorded the clip inside the front end; it is beside it now (the fine-tune's own: the same here)
        from transferctl.modalities.audio import FrontEnd

        assert FrontEnd.recorded(fine_tuned["data"]) == FrontEnd.recorded(fitted)
        fitted = {k: v for k, v in fitted.items() if k != "front_end"}
    assert {k: fine_tuned["data"].get(k) for k in fitted} == fitted
    if run == TEXT:
        assert (Path(tuned["run_dir"]) / "tokenizer.json").read_text() == (runs / run / "tokenizer.json").read_text()


@pytest.mark.parametrize("run", list(EVALUATED))
def test_a_run_exports_with_parity(cli, runs, tmp_path, run):
    copy = Path(shutil.copytree(runs / run, tmp_path / "runs" / run))  # an export writes its report into the run
    exported = _ok(cli("export", "--from", copy, "--format", "torchscript", "--runs-dir", tmp_path / "runs", "--json"))
    assert exported["verified"] and exported["parity"]["torchscript"]["passed"]
    card = json.loads((copy / "export" / "model_card.json").read_text())
    assert (card["kind"], card.get("task")) == KINDS[run]


def test_the_runs_show_in_runs_ls_with_their_lineage(cli, runs):
    listing = _ok(cli("runs", "ls", "--runs-dir", runs, "--json"))
    assert listing["unreadable"] == [] and all(r["status"] == "completed" for r in listing["runs"])
    parents = {r["run_id"]: r["parent"] for r in listing["runs"]}
    assert parents == {
        **{run: None for run in EVALUATED if run != IMAGE},
        IMAGE: PRETRAIN,
        **{evaluation: run for run, evaluation in EVALUATED.items()},
    }
