"""Experiment trackers: a real run logs into a local MLflow SQLite store (read back with MLflow's own client), a
tracker that cannot be reached is one warning line while the run completes, and unknown or uninstalled loggers are
refused before a run exists."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL_SIMCLR, write_config


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, digits_root) -> Path:
    """A short SimCLR run that reports to MLflow (the default store: sqlite under its runs folder)."""
    from transferctl.recipes import pretrain

    folder = tmp_path_factory.mktemp("tracked")
    config = write_config(folder / "simclr.yaml", SMALL_SIMCLR.format(root=digits_root))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        return pretrain(config, ["train.max_steps=4", "train.log_every=2", "train.loggers=[mlflow]"], runs_dir=folder / "runs").run_dir


def test_mlflow_holds_the_runs_params_metrics_and_artifacts(tracked_run):
    from mlflow.tracking import MlflowClient

    summary = json.loads((tracked_run / "summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run.parent / 'mlflow.db'}")
    logged = client.get_run(summary["mlflow_run_id"])
    assert logged.info.run_name == tracked_run.name and logged.info.status == "FINISHED"
    assert logged.data.params["method.name"] == "simclr" and logged.data.params["train.max_steps"] == "4"
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "step/loss")] == [2, 4]
    (val_loss,) = client.get_metric_history(logged.info.run_id, "epoch/val_loss")
    assert val_loss.step == 4 and val_loss.value == pytest.approx(summary["metrics"]["val_loss"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"summary.json", "curves.png"} <= artifacts
    stored = Path(client.download_artifacts(logged.info.run_id, "summary.json", str(tracked_run / "downloaded")))
    assert json.loads(stored.read_text())["status"] == "completed"


def test_a_tracker_that_cannot_be_reached_is_one_warning_and_the_run_goes_on(cli, simclr_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    result = cli("pretrain", "-c", simclr_config, "train.max_steps=2", "train.loggers=[mlflow]", "--runs-dir", tmp_path / "runs", "--json")
    assert result.code == 0 and result.json["status"] == "completed"
    warnings = [line for line in result.stderr.splitlines() if "logger mlflow failed" in line]
    assert len(warnings) == 1 and "the run goes on without it" in warnings[0]
    run_dir = Path(result.json["run_dir"])
    assert (run_dir / "metrics.csv").is_file() and "logger mlflow failed" in (run_dir / "log.txt").read_text()


def test_unknown_and_uninstalled_loggers_are_refused_before_a_run(cli, simclr_config, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    result = cli("pretrain", "-c", simclr_config, "train.loggers=[mlfow]", "--runs-dir", runs)
    assert result.code == 2 and result.stderr.count("\n") == 1
    assert "train.loggers: unknown logger 'mlfow'; did you mean 'mlflow'? (registered: mlflow, tensorboard, wandb)" in result.stderr
    monkeypatch.setitem(sys.modules, "wandb", None)
    result = cli("pretrain", "-c", simclr_config, "train.loggers=[wandb]", "--runs-dir", runs)
    assert result.code == 2 and 'train.loggers: wandb needs the wandb package: pip install "transferctl[wandb]"' in result.stderr
    assert not runs.exists()
