"""The text chain on the real AG News articles; runs when TRANSFERCTL_DATA_DIR points at a folder holding AGNews."""

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
        DATA_DIR is None or not (DATA_DIR / "AGNews" / "train.csv").is_file(), reason="set TRANSFERCTL_DATA_DIR to a folder with AGNews"
    ),
]


@pytest.fixture
def real_data(monkeypatch):
    monkeypatch.setenv("TRANSFERCTL_DATA_DIR", str(DATA_DIR))


def test_the_real_articles_are_read_and_tokenized_once(real_data):
    load_components()
    test = DATASETS.build("ag_news", {}, root=DATA_DIR, download=False, train=False)
    assert len(test) == 7600 and test.classes == ("World", "Sports", "Business", "Sci/Tech")
    assert test.targets.bincount().tolist() == [1900] * 4
    assert test.inputs.shape == (7600, 64) and (test.inputs[:, 0] == test.tokenization.boundary_ids[0]).all()  # [CLS] first
    again = DATASETS.build("ag_news", {}, root=DATA_DIR, download=False, train=False)
    assert again.tokenization == test.tokenization  # the cached tokenizer, not a new one


def test_the_supervised_recipe_learns_topics_and_exports_with_its_tokenizer(cli, real_data, tmp_path):
    runs = tmp_path / "runs"
    trained = cli("pretrain", "-c", REPO / "configs" / "supervised_ag_news.yaml", "train.max_steps=60", "--json", "--runs-dir", runs)
    assert trained.code == 0, trained.stderr
    assert trained.json["metrics"]["val_accuracy"] > 0.5  # 4 topics: chance is 0.25
    exported = cli("export", "--from", trained.json["run_dir"], "--format", "onnx", "--json", "--runs-dir", runs)
    assert exported.code == 0, exported.stderr
    parity = exported.json["parity"]["onnx"]
    assert parity["passed"] and parity["images"] == 1000  # real test articles, as ids and masks
    assert (Path(exported.json["export_dir"]) / "tokenizer.json").is_file()
