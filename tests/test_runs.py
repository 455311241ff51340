"""Run directories: unique ids, atomic files, resolving --from, safe checkpoint loading."""

from __future__ import annotations

import json

import pytest
import torch

from transferctl.checkpoints import Checkpoint
from transferctl.errors import UsageError
from transferctl.runs import atomic_write_bytes, create_run, load_checkpoint, metrics_csv, read_run, resolve_run
from transferctl.runs_index import list_runs, show_run


def make_run(runs, label="simclr-mnist"):
    return create_run(runs, label, {"method": "simclr"}, parent=None, command="pretrain")


def test_run_ids_are_readable_and_never_reused(tmp_path):
    runs = tmp_path / "runs"
    ids = {make_run(runs).id for _ in range(20)}
    assert len(ids) == 20
    assert all("-simclr-mnist-" in run_id for run_id in ids)
    assert all(json.loads((runs / i / "summary.json").read_text())["status"] == "running" for i in ids)


def test_resolve_by_path_or_bare_id(tmp_path):
    runs = tmp_path / "runs"
    run = make_run(runs)
    assert resolve_run(str(run.path), runs) == run.path
    assert resolve_run(run.id, runs) == runs / run.id
    assert read_run(run.id, runs).config == {"method": "simclr"}


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "runs" / "stray").mkdir(parents=True)
    with pytest.raises(UsageError, match="is not a transferctl run"):
        resolve_run("stray", tmp_path / "runs")


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def _checkpoint(weights: torch.Tensor, step: int = 3) -> Checkpoint:
    return Checkpoint(config={"method": {"name": "simclr"}}, model={"w": weights}, data={"classes": ["a"]}, epoch=1, step=step)


def test_checkpoints_round_trip_with_weights_only(tmp_path):
    run = make_run(tmp_path / "runs")
    path = run.save_checkpoint("last", _checkpoint(torch.ones(2)))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 3 and "training" not in raw and raw["task"] == {}
    state = load_checkpoint(path)
    assert state.step == 3 and torch.equal(state.model["w"], torch.ones(2)) and state.training is None


def test_a_format_1_checkpoint_reads_as_format_2(tmp_path):
    """0.1.0 kept the training state at the top level."""
    position = {"step": 4, "epoch": 1}
    torch.save(
        {
            "format": 1,
            "config": {},
            "model": {"w": torch.ones(2)},
            "data": {"classes": []},
            "epoch": 1,
            "step": 4,
            "position": position,
            "optimizer": {"state": {}},
            "world_size": 1,
        },
        tmp_path / "old.pt",
    )
    state = load_checkpoint(tmp_path / "old.pt")
    assert state.training == {"position": position, "optimizer": {"state": {}}, "world_size": 1} and state.task == {}


@pytest.mark.parametrize("version", [0, 4, None])
def test_a_checkpoint_of_another_format_names_its_version(tmp_path, version):
    torch.save({"format": version, "model": {}}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match=f"checkpoint format {version if version is not None else 'unknown'} is not one that transferctl"):
        load_checkpoint(tmp_path / "other.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_truncated_or_foreign_checkpoints_are_usage_errors(tmp_path, content):
    run = make_run(tmp_path / "runs")
    path = run.save_checkpoint("last", _checkpoint(torch.ones(1000)))
    path.write_bytes(path.read_bytes()[:100] if content is None else content)
    with pytest.raises(UsageError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_checkpoint_with_unpickleable_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": object()}, path)
    with pytest.raises(UsageError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_unwritable_runs_root_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="runs root"):
        make_run(blocker / "runs")


def test_metrics_csv_has_the_union_of_keys_in_first_seen_order():
    rows = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25, "val_loss": None, "partial": True, "shape": [1, 2]}]
    assert metrics_csv(rows) == 'epoch,train_loss,val_loss,partial,shape\n1,0.5,,,\n2,0.25,,True,"[1, 2]"\n'


def test_metrics_csv_is_written_beside_the_jsonl_and_follows_a_resume_truncation(tmp_path):
    import csv

    run = make_run(tmp_path / "runs")
    run.log_metrics({"epoch": 1, "step": 5, "train_loss": 1.0})
    run.log_metrics({"epoch": 2, "step": 10, "train_loss": 0.5, "val_loss": 0.75})
    with open(run.path / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table == [
        {"epoch": "1", "step": "5", "train_loss": "1.0", "val_loss": ""},
        {"epoch": "2", "step": "10", "train_loss": "0.5", "val_loss": "0.75"},
    ]
    run.keep_metrics_through(5)
    assert (run.path / "metrics.csv").read_text() == "epoch,step,train_loss\n1,5,1.0\n"
    assert not list(run.path.glob(".*.tmp"))


def test_a_run_whose_process_died_lists_as_crashed(tmp_path):
    runs = tmp_path / "runs"
    alive = make_run(runs)  # this process holds its writer lock
    dead = make_run(runs).id  # the Run and its lock are dropped, as when a killed process's are
    assert {info.id: info.status() for info in list_runs(runs).runs} == {alive.id: "running", dead: "crashed"}
    assert f"transferctl pretrain --resume {runs / dead}" in show_run(dead, runs)["error"]
    assert show_run(alive.id, runs)["error"] is None
    evaluation = create_run(runs, "evaluate-mnist", {"method": "finetune"}, parent=None, command="evaluate").id  # dropped too
    assert "run `transferctl evaluate` again" in show_run(evaluation, runs)["error"]  # evaluate has no --resume
