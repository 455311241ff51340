"""The issue's acceptance chain on the real MNIST files; runs when TRANSFERCTL_DATA_DIR points at them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
# Resolved now: the tests run in temporary working directories.
DATA_DIR = Path(os.environ["TRANSFERCTL_DATA_DIR"]).resolve() if os.environ.get("TRANSFERCTL_DATA_DIR") else None

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(DATA_DIR is None or not (DATA_DIR / "MNIST" / "raw").is_dir(), reason="set TRANSFERCTL_DATA_DIR to real MNIST"),
]


@pytest.fixture
def real_data(monkeypatch):
    monkeypatch.setenv("TRANSFERCTL_DATA_DIR", str(DATA_DIR))


def test_shipped_recipes_run_the_chain_on_real_mnist(cli, real_data, tmp_path):
    runs = tmp_path / "runs"
    small_val = "data.val_fraction=0.02"  # 1,200 validation images keep the test fast
    pre = cli("pretrain", "-c", REPO / "configs" / "simclr_mnist.yaml", "train.max_steps=20", small_val, "--json", "--runs-dir", runs)
    assert pre.code == 0, pre.stderr
    assert pre.json["metrics"]["step"] == 20

    tuned = cli("finetune", "--from", pre.json["run_dir"], "train.max_steps=30", small_val, "--json", "--runs-dir", runs)
    assert tuned.code == 0, tuned.stderr
    evaluated = cli("evaluate", "--from", tuned.json["run_dir"], "--json", "--runs-dir", runs)
    assert evaluated.code == 0, evaluated.stderr
    assert evaluated.json["metrics"]["test_images"] == 10_000
    assert evaluated.json["metrics"]["accuracy"] > 0.2  # well above chance after 30 steps on 100 labels

    probe = cli(
        "finetune",
        "--from",
        pre.json["run_dir"],
        "-c",
        REPO / "configs" / "linear_mnist.yaml",
        "train.max_steps=20",
        small_val,
        "--json",
        "--runs-dir",
        runs,
    )
    assert probe.code == 0, probe.stderr
    assert probe.json["metrics"]["val_accuracy"] > 0.3


def test_supervised_recipe_learns_fast_on_real_mnist(cli, real_data, tmp_path):
    result = cli(
        "pretrain",
        "-c",
        REPO / "configs" / "supervised_mnist.yaml",
        "train.max_steps=60",
        "scheduler.warmup_steps=10",
        "data.val_fraction=0.02",
        "--json",
        "--runs-dir",
        tmp_path / "runs",
    )
    assert result.code == 0, result.stderr
    assert result.json["metrics"]["val_accuracy"] > 0.6  # 10 classes: chance is 0.1


SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.stem not in ("quickstart", "finetune_imagefolder"))
NEEDS_FSDD = pytest.mark.skipif(DATA_DIR is None or not (DATA_DIR / "FSDD" / "recordings").is_dir(), reason="no FSDD beside MNIST")
NEEDS_AG_NEWS = pytest.mark.skipif(DATA_DIR is None or not (DATA_DIR / "AGNews" / "train.csv").is_file(), reason="no AG News beside MNIST")


NEEDS_CONLL = pytest.mark.skipif(
    DATA_DIR is None or not (DATA_DIR / "CoNLL2003" / "train.txt").is_file(), reason="no CoNLL2003 beside MNIST"
)
# they read the corpus benchmarks/ner_efficiency.py writes from AG News and CoNLL-2003
NEWS_CASED = ("mlm_news_cased", "electra_news_cased")


def _needs(config: Path) -> tuple:
    if config.stem in NEWS_CASED:
        return (NEEDS_AG_NEWS, NEEDS_CONLL)
    if "conll" in config.stem:
        return (NEEDS_CONLL,)
    return (NEEDS_FSDD,) if "fsdd" in config.stem else (NEEDS_AG_NEWS,) if "ag_news" in config.stem else ()


@pytest.mark.parametrize("config", [pytest.param(p, marks=_needs(p)) for p in SHIPPED], ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_builds_and_takes_a_batch(cli, real_data, config, tmp_path):
    overrides = []
    if config.stem in NEWS_CASED:  # its corpus, written as its header says
        sys.path.insert(0, str(REPO / "benchmarks"))
        from ner_efficiency import write_corpus

        overrides = [f"data.root={write_corpus(DATA_DIR, tmp_path / 'news_cased')}"]
    result = cli("config", "check", "-c", config, *overrides, "--json")
    assert result.code == 0, result.stderr
    assert result.json["status"] == "ok" and result.json["loss"] > 0


def test_the_semi_supervised_recipe_learns_from_unlabeled_images_on_real_mnist(cli, real_data, tmp_path):
    runs = tmp_path / "runs"
    pre = cli(
        "pretrain",
        "-c",
        REPO / "configs" / "simclr_mnist.yaml",
        "train.max_steps=20",
        "data.val_fraction=0.02",
        "--json",
        "--runs-dir",
        runs,
    )
    assert pre.code == 0, pre.stderr
    tuned = cli(
        "finetune",
        "--from",
        pre.json["run_dir"],
        "-c",
        REPO / "configs" / "finetune10_mnist.yaml",
        "train.max_steps=20",
        "finetune.head_warmup_steps=5",
        "finetune.unlabeled.threshold=0.5",
        "data.val_fraction=0.02",
        "--json",
        "--runs-dir",
        runs,
    )
    assert tuned.code == 0, tuned.stderr
    rows = [json.loads(line) for line in (Path(tuned.json["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    # pseudo-labels were drawn on the unlabeled images, and more of them pass the threshold as the classifier improves
    # (this run: 1% of them in the first 2 steps, 95% in the last 2)
    rates = [row.get("pseudo_label_rate") for row in rows]
    assert None not in rates and rates[0] < 0.2 and rates[-1] > 0.6, rates
    # and it learns from them: 0.89-0.90 here (also with another seed, or in float32). With pseudo-labels drawn but
    # left out of the loss (their forward passes still adapt the batch-norm statistics) 0.70-0.81; with no unlabeled
    # images (finetune.unlabeled.weight=0) 0.54
    assert tuned.json["metrics"]["val_accuracy"] > 0.85
