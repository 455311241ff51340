"""The audio chain on the real FSDD recordings; runs when TRANSFERCTL_DATA_DIR points at a folder holding FSDD."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from transferctl.components import load_components
from transferctl.registry import DATASETS

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ["TRANSFERCTL_DATA_DIR"]).resolve() if os.environ.get("TRANSFERCTL_DATA_DIR") else None

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        DATA_DIR is None or not (DATA_DIR / "FSDD" / "recordings").is_dir(), reason="set TRANSFERCTL_DATA_DIR to a folder with FSDD"
    ),
]


@pytest.fixture
def real_data(monkeypatch):
    monkeypatch.setenv("TRANSFERCTL_DATA_DIR", str(DATA_DIR))


def test_the_splits_of_the_real_recordings(real_data):
    load_components()

    def size(train: bool, **options) -> int:
        return len(DATASETS.build("fsdd", options, root=DATA_DIR, download=False, train=train))

    assert size(False) == 300  # takes 0-4 of 6 speakers x 10 digits
    assert size(False, split="speakers") == 1000  # every clip of george and lucas


def test_supervised_recipe_learns_spoken_digits_and_exports_waveform_parity(cli, real_data, tmp_path):
    runs = tmp_path / "runs"
    trained = cli(
        "pretrain", "-c", REPO / "configs" / "supervised_fsdd.yaml", "train.max_steps=40", "train.epochs=100", "--json", "--runs-dir", runs
    )
    assert trained.code == 0, trained.stderr
    assert trained.json["metrics"]["val_accuracy"] > 0.4  # 10 digits: chance is 0.1
    exported = cli("export", "--from", trained.json["run_dir"], "--format", "torchscript", "--json", "--runs-dir", runs)
    assert exported.code == 0, exported.stderr
    parity = exported.json["parity"]["torchscript"]
    assert parity["passed"] and parity["images"] == 300  # every real test clip, fed as a waveform
