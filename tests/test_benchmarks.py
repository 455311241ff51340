"""The label-efficiency benchmark's cache: a cell is measured once, and again when what it ran changes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "label_efficiency.py"


@pytest.fixture(scope="module")
def label_efficiency():
    spec = importlib.util.spec_from_file_location("label_efficiency", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_cell_is_measured_once_and_remembered_across_runs(label_efficiency, tmp_path):
    calls = []
    measure = lambda: calls.append(1) or {"accuracy": 0.5}
    cells = label_efficiency.Cells(tmp_path / "cells.jsonl")
    assert cells.get("a", measure)["accuracy"] == 0.5
    cells.get("a", measure)
    label_efficiency.Cells(tmp_path / "cells.jsonl").get("a", measure)  # a rerun of the benchmark
    assert len(calls) == 1


def test_the_digest_changes_with_the_recipe_the_overrides_and_the_source(label_efficiency, tmp_path):
    recipe = tmp_path / "linear.yaml"
    recipe.write_text("train:\n  epochs: 5\n")
    digest = label_efficiency.recipe_digest
    first = digest(recipe, ["data.seed=0"], "runs/a")
    assert digest(recipe, ["data.seed=0"], "runs/a") == first
    assert digest(recipe, ["data.seed=1"], "runs/a") != first
    assert digest(recipe, ["data.seed=0"], "runs/b") != first
    recipe.write_text("# why five epochs\ntrain: {epochs: 5}  # the same settings, written otherwise\n")
    assert digest(recipe, ["data.seed=0"], "runs/a") == first  # a comment or the layout measures nothing again
    recipe.write_text("train:\n  epochs: 10\n")
    second = digest(recipe, ["data.seed=0"], "runs/a")
    assert second != first


def test_the_digest_follows_the_built_in_finetune_recipe_and_the_data_folder(label_efficiency, tmp_path, monkeypatch):
    recipe, built_in = tmp_path / "linear.yaml", tmp_path / "finetune.yaml"
    recipe.write_text("train:\n  epochs: 5\n")
    built_in.write_text("finetune:\n  head_warmup_steps: 50\n")
    monkeypatch.setattr(label_efficiency, "recipe_path", lambda name: built_in)
    first = label_efficiency.recipe_digest(recipe, [])
    built_in.write_text("finetune:\n  head_warmup_steps: 0\n")
    second = label_efficiency.recipe_digest(recipe, [])
    monkeypatch.setenv(label_efficiency.DATA_DIR_ENV, str(tmp_path))
    assert len({first, second, label_efficiency.recipe_digest(recipe, [])}) == 3


def test_editing_a_recipe_measures_again_only_the_cells_that_ran_it(label_efficiency, tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("linear_digits", "finetune10_digits", "finetune100_digits"):
        (configs / f"{name}.yaml").write_text("train:\n  epochs: 5\n")
    measured: list[str] = []

    def fake_tuned(source, config, overrides, runs):
        measured.append(config.stem)
        return {"accuracy": 0.5, "run": "runs/x"}

    monkeypatch.setattr(label_efficiency, "CONFIGS", configs)
    monkeypatch.setattr(label_efficiency, "tuned_accuracy", fake_tuned)
    monkeypatch.setattr(label_efficiency, "knn_of_probe", lambda probe, runs: 0.5)
    cells = label_efficiency.Cells(tmp_path / "cells.jsonl")
    encoder = {"source": "runs/simclr", "seconds": 0.0}

    def measure() -> list[str]:
        measured.clear()
        label_efficiency.measure_row("digits", "SimCLR", encoder, [0, 1], cells, tmp_path / "runs", [])
        return sorted(measured)

    assert measure() == ["finetune100_digits"] * 2 + ["finetune10_digits"] * 4 + ["linear_digits"]
    assert measure() == []
    (configs / "finetune10_digits.yaml").write_text("train:\n  epochs: 6\n")
    assert measure() == ["finetune10_digits"] * 4  # 10/class with and without the unlabeled images, 2 seeds each


def test_the_throughput_benchmark_measures_a_pipeline_through_the_assembly_layer(monkeypatch):
    """On a fake clock (no wall-clock comparison, which a busy machine turns around): drawing a batch takes 1 tick,
    a step's loss 10 and its optimizer step 100, so the rates say exactly what work each phase timed."""
    from transferctl import build

    spec = importlib.util.spec_from_file_location("throughput", BENCHMARK.parent / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    clock, assembled = [0.0], []
    build_training = build.build_training

    def ticking(cfg, **options):
        t = build_training(cfg, **options)
        assembled.append(t)
        batches, loss = t.pipeline.batches, t.objective.loss

        def drawn(epoch):
            for batch in batches(epoch):
                clock[0] += 1
                yield batch

        def stepped(*args):
            clock[0] += 10
            return loss(*args)

        t.pipeline.batches, t.objective.loss = drawn, stepped
        t.optimizer.register_step_post_hook(lambda *_: clock.__setitem__(0, clock[0] + 100))
        return t

    monkeypatch.setattr(build, "build_training", ticking)
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    row = throughput.measure("cnn", "memory", "32", batch=32, steps=1, warmup=1, workers=0, device="cpu")
    assert len(assembled) == 1  # built by the assembly layer, as `transferctl pretrain` builds a run
    assert (row["pipeline"], row["data"], row["batch"]) == ("memory", "mnist_sample", 32)
    # data only: the timed draws (not the warm-up's), 1 tick a batch; training: the timed steps, each a draw, a loss
    # and an optimizer step (1 + 10 + 100 ticks)
    assert row["data_images_per_s"] == 32 / 1 and row["train_images_per_s"] == 32 / 111
    assert row["data_share"] == pytest.approx(1 / 111)


def test_the_dense_tasks_benchmark_runs_its_cells_through_the_recipes(tmp_path):
    import subprocess
    import sys

    from tests.conftest import make_mnist_root

    digits_root = make_mnist_root(tmp_path / "data", 1200, 100)  # 1,080 training digits: room for 1,000 labelled
    script = BENCHMARK.parent / "dense_tasks.py"
    # rotation and detection: scenes' rows run through the same code as detection's (the recipes have tests of their own)
    tasks = ["--tasks", "rotation", "detection"]
    command = [
        sys.executable,
        str(script),
        "--quick",
        *tasks,
        "--encoders",
        "random",
        "--variants",
        "--seeds",
        "0",
        "--data-dir",
        str(digits_root),
    ]
    out = ["--out", str(tmp_path / "dense"), "--pretrain-out", str(tmp_path / "pretrain")]
    done = subprocess.run([*command, *out], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cells = (tmp_path / "dense" / "quick" / "cells.jsonl").read_text().splitlines()
    assert len(cells) == 6  # per task: the two small budgets and all labels
    assert "| rotation: mean abs error (degrees) | random init | 0.0 |" in done.stdout and "target <= 5" in done.stdout
    assert "| scenes: mAP@.5 | random init | 0.0 |" in done.stdout and "mAP@[.5:.95] 0." in done.stdout and "target >= 0.8" in done.stdout


def test_the_audio_benchmark_runs_its_cells_through_the_recipes(tmp_path):
    import subprocess
    import sys

    from tests.test_audio import make_fsdd

    root = make_fsdd(tmp_path / "data", takes=20)  # 3 digits x 3 speakers: 15 training takes each, room for 10 a digit
    script = BENCHMARK.parent / "audio_efficiency.py"
    command = [sys.executable, str(script), "--quick", "--splits", "official", "--encoders", "random", "--seeds", "0"]
    done = subprocess.run(
        [*command, "--data-dir", str(root), "--out", str(tmp_path / "audio")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    cells = (tmp_path / "audio" / "quick" / "cells.jsonl").read_text().splitlines()
    assert len(cells) == 5 + 3  # random init: 5 budgets; the classic baseline: the 3 without unlabeled clips
    assert "| official | random init (conv1d) | 0.0 |" in done.stdout
    assert "| official | log-spectrogram + logistic regression | 0.0 |" in done.stdout and "— |" in done.stdout


def test_the_text_benchmark_runs_its_cells_through_the_recipes(tmp_path):
    import random
    import subprocess
    import sys

    from tests.test_text import TOPICS, article, write_csv

    root, rng = tmp_path / "data", random.Random(0)
    topics = [*TOPICS, "science"]  # AG News has four classes; two share words here, which no check needs apart
    for split, count in (("train", 125), ("test", 10)):  # room for 100 labels a class beside the validation part
        write_csv(root / "AGNews" / f"{split}.csv", [(str(i + 1), article(t, rng)) for _ in range(count) for i, t in enumerate(topics)])
    (root / "AGNews" / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    script = BENCHMARK.parent / "text_efficiency.py"
    command = [sys.executable, str(script), "--quick", "--encoders", "random", "--seeds", "0", "--data-dir", str(root)]
    done = subprocess.run([*command, "--out", str(tmp_path / "text")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cells = (tmp_path / "text" / "quick" / "cells.jsonl").read_text().splitlines()
    assert len(cells) == 5 + 3  # random init: 5 budgets; the classic baseline: the 3 without unlabeled texts
    assert "| random init (gru) | 0.0 |" in done.stdout and "| TF-IDF (1-2 grams) + logistic regression | 0.0 |" in done.stdout


def test_the_ner_benchmarks_overrides_reach_the_fine_tunes_and_never_the_pretraining(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("ner_efficiency", BENCHMARK.parent / "ner_efficiency.py")
    ner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ner)
    pretrained, tuned = [], []
    run = SimpleNamespace(run_dir=tmp_path)
    monkeypatch.setattr(ner, "pretrain", lambda config, overrides, runs_dir: pretrained.append(overrides) or run)
    monkeypatch.setattr(ner, "tuned_f1", lambda source, overrides, runs: tuned.append((source, overrides)) or {"f1": 0.5})

    extra = ["data.root=/data", "head.crf=false"]  # what `--set head.crf=false` gives every fine-tune
    cells = ner.Cells(tmp_path / "cells.jsonl")
    rows = ner.rows_of(["electra", "electra_in_context"], [0], cells, tmp_path / "runs", tmp_path / "corpus", extra, ["100"], False, [])
    corpus, start = f"data.root={tmp_path / 'corpus'}", tmp_path  # the masked model, then ELECTRA on from it, once each
    electra = [corpus, f"model.weights={start / 'checkpoints' / 'last.pt'}", f"data.tokenizer.path={start / 'tokenizer.json'}"]
    assert pretrained == [[corpus], electra]  # the shipped recipes on the corpus: no fine-tune override reaches them
    context = ner.ENCODERS["electra_in_context"][2]
    assert context == ["data.document_context=32"]  # the row that reads document context: the same encoder
    assert tuned == [
        (str(tmp_path), [*ner.COLUMNS["100"], "data.seed=0", *extra]),
        (str(tmp_path), [*context, *ner.COLUMNS["100"], "data.seed=0", *extra]),
    ]
    assert rows[0]["100"] == rows[1]["100"] == 0.5


def test_the_ner_benchmarks_electra_row_goes_on_from_the_masked_models_run(tmp_path, monkeypatch):
    """ELECTRA starts from the masked model's encoder and tokenizer (one masked model for both rows); its row's
    pretraining time is both runs'."""
    spec = importlib.util.spec_from_file_location("ner_efficiency", BENCHMARK.parent / "ner_efficiency.py")
    ner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ner)
    pretrained = []

    def pretrain(config, overrides, runs_dir):
        pretrained.append((Path(config).name, overrides))
        folder = tmp_path / f"run{len(pretrained)}"
        folder.mkdir()
        return SimpleNamespace(run_dir=folder)

    monkeypatch.setattr(ner, "pretrain", pretrain)
    monkeypatch.setattr(ner, "tuned_f1", lambda source, overrides, runs: {"f1": 0.5})
    cells = ner.Cells(tmp_path / "cells.jsonl")
    rows = ner.rows_of(["mlm", "electra"], [0], cells, tmp_path / "runs", tmp_path / "corpus", [], ["100"], False, [])
    corpus = f"data.root={tmp_path / 'corpus'}"
    start = tmp_path / "run1"
    assert pretrained == [
        ("mlm_news_cased.yaml", [corpus]),
        (
            "electra_news_cased.yaml",
            [corpus, f"model.weights={start / 'checkpoints' / 'last.pt'}", f"data.tokenizer.path={start / 'tokenizer.json'}"],
        ),
    ]
    seconds = {
        row["key"].split("/")[1]: row["seconds"]
        for row in map(json.loads, cells.path.read_text().splitlines())
        if row["key"].startswith("pretrain/")
    }
    assert rows[1]["pretrain_min"] == pytest.approx((seconds["mlm"] + seconds["electra"]) / 60)


def test_a_ner_benchmark_cell_is_measured_again_when_its_column_s_budget_changes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("ner_efficiency", BENCHMARK.parent / "ner_efficiency.py")
    ner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ner)
    tuned = []
    monkeypatch.setattr(ner, "tuned_f1", lambda source, overrides, runs: tuned.append(overrides) or {"f1": 0.1 * len(tuned)})
    measure = lambda: ner.rows_of(["random_gru"], [0], ner.Cells(tmp_path / "cells.jsonl"), tmp_path, tmp_path, [], ["100"], False, [])
    assert measure()[0]["100"] == pytest.approx(0.1) and measure()[0]["100"] == pytest.approx(0.1)  # the cell, reused
    assert len(tuned) == 1
    monkeypatch.setitem(ner.COLUMNS, "100", ["data.labeled_samples=100", "train.max_steps=600"])  # a new budget, same name
    assert measure()[0]["100"] == pytest.approx(0.2) and len(tuned) == 2  # measured again under it
    assert tuned[-1][len(ner.GRU) : len(ner.GRU) + 2] == ner.COLUMNS["100"]


def test_a_text_benchmark_cell_is_measured_again_when_its_all_labels_budget_changes(tmp_path, monkeypatch):
    """The text and audio benchmarks keep each column's budget with its cells too: their all-labels column's step
    budget is a constant, not its name."""
    spec = importlib.util.spec_from_file_location("text_efficiency", BENCHMARK.parent / "text_efficiency.py")
    text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(text)
    tuned = []
    monkeypatch.setattr(text, "tuned_accuracy", lambda source, config, overrides, runs: tuned.append(overrides) or {"accuracy": 0.5})
    monkeypatch.setattr(text, "classic_accuracy", lambda column, seed, extra: {"accuracy": 0.4})
    monkeypatch.setattr(text, "COLUMNS", {"all": text.COLUMNS["all"]})
    monkeypatch.setattr(text, "UNLABELED_UNUSED", ("all",))
    measure = lambda: text.rows_of(["random"], [0], text.Cells(tmp_path / "cells.jsonl"), tmp_path, [])
    assert measure()[0]["all"] == 0.5 and measure()[0]["all"] == 0.5 and len(tuned) == 1  # the cell, reused
    monkeypatch.setitem(text.COLUMNS, "all", (None, [*text.ALL_LABELS[:-1], "train.max_steps=3000"]))
    assert measure()[0]["all"] == 0.5 and len(tuned) == 2 and "train.max_steps=3000" in tuned[-1]  # measured again
