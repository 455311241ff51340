"""Runs that survive: exact resume after SIGKILL or SIGINT, atomic checkpoints, resume refusals, NaN handling."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import SMALL_SIMCLR, write_config
from transferctl.checkpoints import Checkpoint
from transferctl.recipes import pretrain
from transferctl.runs import create_run, load_checkpoint
from transferctl.runs_index import list_runs

# 540 training images / batch 64 = 8 steps an epoch; 40 steps = 5 epochs, checkpoints every 3 steps.
LONG = ["train.epochs=5", "train.checkpoint_every=3", "train.log_every=1"]


@pytest.fixture
def config(tmp_path, digits_root):
    return write_config(tmp_path / "simclr.yaml", SMALL_SIMCLR.format(root=digits_root))


def launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "transferctl", *map(str, args), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_checkpoint(runs: Path, process: subprocess.Popen, timeout: float = 120.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(runs.glob("*/checkpoints/last.pt"))
        if found:
            return found[0].parent.parent
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


def killed_and_resumed(command: str, config: Path, overrides: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """The last checkpoints of a run left alone and of the same run killed (SIGKILL) after its first checkpoint
    and resumed: (whole, resumed)."""
    from transferctl.recipes import finetune

    if command == "pretrain":
        whole = pretrain(config, overrides, runs_dir=tmp_path / "whole").run_dir
    else:
        whole = finetune(None, config, overrides, runs_dir=tmp_path / "whole").run_dir
    runs = tmp_path / "runs"
    process = launch(command, "-c", config, *overrides, "--runs-dir", runs)
    run_dir = wait_for_checkpoint(runs, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert launch(command, "--resume", run_dir, "--runs-dir", runs).wait() == 0
    whole_state, resumed = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (whole, run_dir))
    return whole_state, resumed


def final_state(run_dir: Path) -> dict:
    """The last checkpoint's weights and training state, in one mapping."""
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    return {"model": checkpoint.model, **checkpoint.training}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["train_loss"], r["val_loss"]) for r in rows]


def assert_same_training(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sa["position"]["step"] == sb["position"]["step"] == 40
    assert sa["model"].keys() == sb["model"].keys()
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert losses(a) == losses(b)


@pytest.fixture
def reference(config, tmp_path):
    return pretrain(config, LONG, runs_dir=tmp_path / "reference").run_dir


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_interrupted_run_resumes_to_bit_identical_weights(config, tmp_path, reference, how):
    runs = tmp_path / "runs"
    process = launch("pretrain", "-c", config, *LONG, "--runs-dir", runs)
    run_dir = wait_for_checkpoint(runs, process)
    process.send_signal(getattr(signal, how))
    process.wait(timeout=60)
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = final_state(run_dir)["position"]["step"]
    assert stopped_at < 40, "the run finished before it was interrupted"
    if how == "SIGINT":
        assert process.returncode == 130
        assert summary["status"] == "interrupted" and "--resume" in summary["error"]
    else:
        assert process.returncode == -signal.SIGKILL and summary["status"] == "running"
        assert list_runs(runs).by_id()[run_dir.name].status() == "crashed"  # its writer is gone

    resumed = launch("pretrain", "--resume", run_dir, "--runs-dir", runs, "--json")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    result = json.loads(out)
    assert result["run_dir"] == str(run_dir) and result["status"] == "completed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumes"][0]["at_step"] == stopped_at
    assert_same_training(reference, run_dir)


def test_sigterm_checkpoints_and_exits_143(config, tmp_path):
    runs = tmp_path / "runs"
    process = launch("pretrain", "-c", config, *LONG, "--runs-dir", runs)
    run_dir = wait_for_checkpoint(runs, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert final_state(run_dir)["position"]["step"] < 40


def test_a_write_that_dies_before_the_rename_leaves_last_loadable(tmp_path, monkeypatch):
    run = create_run(tmp_path / "runs", "x", {}, None, "pretrain")
    run.save_checkpoint("last", Checkpoint(config={}, model={"w": torch.zeros(3)}, data={}, epoch=0, step=1))

    def die(*args):
        raise KeyboardInterrupt  # as if the process were killed mid-checkpoint

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint("last", Checkpoint(config={}, model={"w": torch.ones(3)}, data={}, epoch=0, step=2))
    monkeypatch.undo()
    state = load_checkpoint(run.checkpoint_dir / "last.pt")
    assert state.step == 1 and torch.equal(state.model["w"], torch.zeros(3))


def test_resume_refuses_changed_config_with_a_diff(cli, config, tmp_path):
    runs = tmp_path / "runs"
    done = cli("pretrain", "-c", config, "train.max_steps=4", "--runs-dir", runs, "--json").json
    result = cli("pretrain", "--resume", done["run_id"], "optimizer.lr=0.5", "train.max_steps=8", "--runs-dir", runs)
    assert result.code == 2
    assert "cannot change optimizer.lr: 0.003 -> 0.5" in result.stderr and "train.epochs" in result.stderr


def test_a_run_older_than_a_setting_resumes_but_cannot_switch_it_on(cli, config, tmp_path):
    runs = tmp_path / "runs"
    done = cli("pretrain", "-c", config, "train.max_steps=4", "--runs-dir", runs, "--json").json
    saved = Path(done["run_dir"]) / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["train"]["ema_decay"]  # as a transferctl from before weight averaging wrote it
    saved.write_text(yaml.safe_dump(old))
    switched = cli("pretrain", "--resume", done["run_id"], "train.ema_decay=0.9", "train.max_steps=6", "--runs-dir", runs)
    assert switched.code == 2 and "cannot change train.ema_decay: 0.0 -> 0.9" in switched.stderr
    extended = cli("pretrain", "--resume", done["run_id"], "train.max_steps=6", "--runs-dir", runs, "--json")
    assert extended.code == 0, extended.stderr
    assert extended.json["metrics"]["step"] == 6


def test_resume_of_a_completed_run_has_nothing_to_do_unless_extended(cli, config, tmp_path):
    runs = tmp_path / "runs"
    done = cli("pretrain", "-c", config, "train.max_steps=4", "--runs-dir", runs, "--json").json
    nothing = cli("pretrain", "--resume", done["run_dir"], "--runs-dir", runs)
    assert nothing.code == 2 and "nothing to resume" in nothing.stderr

    extended = cli("pretrain", "--resume", done["run_dir"], "train.max_steps=10", "--runs-dir", runs, "--json")
    assert extended.code == 0, extended.stderr
    assert extended.json["metrics"]["step"] == 10
    summary = json.loads((Path(done["run_dir"]) / "summary.json").read_text())
    assert summary["resumes"][0]["changed"] == {"train.max_steps": [4, 10]}
    assert len(list(runs.iterdir())) == 1  # resumed in place


def test_resume_refuses_a_run_another_process_is_writing(cli, config, tmp_path):
    runs = tmp_path / "runs"
    done = cli("pretrain", "-c", config, "train.max_steps=4", "--runs-dir", runs, "--json").json
    with open(Path(done["run_dir"]) / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cli("pretrain", "--resume", done["run_dir"], "train.max_steps=8", "--runs-dir", runs)
    assert result.code == 2 and "being written by another transferctl process" in result.stderr


def test_resume_with_the_wrong_command_or_a_config(cli, config, tmp_path):
    runs = tmp_path / "runs"
    done = cli("pretrain", "-c", config, "train.max_steps=2", "--runs-dir", runs, "--json").json
    wrong = cli("finetune", "--resume", done["run_dir"], "--runs-dir", runs)
    assert wrong.code == 2 and "resume it with that command" in wrong.stderr
    both = cli("pretrain", "--resume", done["run_dir"], "-c", config, "--runs-dir", runs)
    assert both.code == 2 and "drop -c" in both.stderr


def test_on_nan_skip_skips_bad_steps_and_stop_keeps_the_last_good_checkpoint(cli, config, tmp_path):
    blow_up = ["optimizer.name=sgd", "optimizer.lr=1e12", "optimizer.weight_decay=0", "train.log_every=1"]
    skipped = cli("pretrain", "-c", config, *blow_up, "train.on_nan=skip", "train.max_steps=8", "--runs-dir", tmp_path / "a", "--json")
    assert skipped.code == 0, skipped.stderr
    assert skipped.json["metrics"]["skipped_steps"] > 0

    stopped = cli("pretrain", "-c", config, *blow_up, "train.checkpoint_every=1", "--runs-dir", tmp_path / "b", "--json")
    assert stopped.code == 1 and "train.on_nan=skip" in stopped.stderr
    (run_dir,) = list((tmp_path / "b").iterdir())
    last = final_state(run_dir)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


CLASSIFIER = """\
method: finetune
model: {{name: cnn, widths: [8, 16]}}
head: {{name: linear, dropout: 0.5}}
scheduler: {{name: constant}}
data: {{name: mnist, root: {root}, labels_per_class: 5, batch_size: 16, pipeline: {pipeline}, num_workers: 0}}
train: {{device: cpu, epochs: 10}}
"""


@pytest.mark.parametrize("pipeline, ema", [("memory", 0.0), ("loader", 0.0), ("memory", 0.8)])
def test_extending_a_run_that_stopped_mid_epoch_equals_running_it_whole(tmp_path, digits_root, pipeline, ema):
    """50 labelled images, batch 16: 4 steps an epoch. A run capped at 6 steps ends inside epoch 2;
    extended to 11 it must equal an 11-step run (dropout and the loader draw randomness too; with
    weight averaging, the average and the trained weights both)."""
    from transferctl.recipes import finetune, resume

    config = write_config(tmp_path / "ft.yaml", CLASSIFIER.format(root=digits_root, pipeline=pipeline))
    averaging = [f"train.ema_decay={ema}"]
    whole = finetune(None, config, ["train.max_steps=11", *averaging], runs_dir=tmp_path / "whole").run_dir
    part = finetune(None, config, ["train.max_steps=6", *averaging], runs_dir=tmp_path / "part").run_dir
    assert final_state(part)["position"]["batch_in_epoch"] == 2  # the checkpoint stays inside epoch 2
    resume(str(part), ["train.max_steps=11"], command="finetune", runs_dir=tmp_path / "part")
    a, b = final_state(whole), final_state(part)
    for weights in ("model", "trained_model") if ema else ("model",):
        assert all(torch.equal(a[weights][k], b[weights][k]) for k in a[weights])
    assert a.get("averaged_steps") == b.get("averaged_steps") == (11 if ema else None)
    rows = lambda d: [
        (r["epoch"], r["step"], r["train_loss"], r.get("val_accuracy"))
        for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
    ]
    assert rows(whole) == rows(part)


def test_a_finetune_resumes_from_any_working_directory(tmp_path, digits_root, config, monkeypatch):
    from transferctl.recipes import finetune, pretrain, resume

    monkeypatch.chdir(tmp_path)
    source = pretrain(config, ["train.max_steps=2"], runs_dir=Path("runs"))
    tuned = finetune(f"runs/{source.run_id}", None, ["data.labels_per_class=5", "train.max_steps=2"], runs_dir=Path("runs"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = resume(str(tmp_path / "runs" / tuned.run_id), ["train.max_steps=4"], command="finetune", runs_dir=Path("runs"))
    assert result.metrics["step"] == 4


def test_a_run_killed_after_its_last_checkpoint_is_closed_by_resume(cli, config, tmp_path):
    runs = tmp_path / "runs"
    done = cli("pretrain", "-c", config, "train.max_steps=4", "--runs-dir", runs, "--json").json
    summary_path = Path(done["run_dir"]) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "status": "running", "metrics": {}}))  # as if killed right then
    closed = cli("pretrain", "--resume", done["run_dir"], "--runs-dir", runs, "--json")
    assert closed.code == 0, closed.stderr
    assert json.loads(summary_path.read_text())["status"] == "completed"
    assert closed.json["metrics"]["step"] == 4


def test_on_nan_may_change_on_resume_and_large_seeds_work_with_the_loader(cli, config, tmp_path):
    # a constant learning rate: a run of 2 steps extended to 3 takes the steps a run of 3 takes; batches of 16 and no
    # validation keep the loader's per-image transforms few
    loader = ["train.seed=2000000", "data.pipeline=loader", "data.num_workers=0", "scheduler.name=constant"]
    loader += ["data.batch_size=16", "data.val_fraction=0"]
    runs = tmp_path / "runs"
    done = cli("pretrain", "-c", config, "train.max_steps=2", *loader, "--runs-dir", runs, "--json")
    assert done.code == 0, done.stderr
    resumed = cli("pretrain", "--resume", done.json["run_dir"], "train.on_nan=skip", "train.max_steps=3", "--runs-dir", runs, "--json")
    assert resumed.code == 0, resumed.stderr
    run_dir = Path(done.json["run_dir"])
    assert resumed.json["run_dir"] == str(run_dir) and resumed.json["metrics"]["step"] == 3  # the same run, extended
    # the change is recorded, and the run's config (what a later resume starts from) now says skip
    assert [r["changed"] for r in json.loads((run_dir / "summary.json").read_text())["resumes"]] == [
        {"train.max_steps": [2, 3], "train.on_nan": ["stop", "skip"]}
    ]
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    assert (stored["on_nan"], stored["seed"], stored["max_steps"]) == ("skip", 2000000, 3)
    # and it goes on exactly where it stopped, on the loader with a seed whose per-sample seeds pass 2**63 before they
    # are reduced: it equals one run straight through
    whole = cli("pretrain", "-c", config, "train.max_steps=3", *loader, "--runs-dir", tmp_path / "whole", "--json")
    assert whole.code == 0, whole.stderr
    a, b = final_state(Path(whole.json["run_dir"])), final_state(run_dir)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
