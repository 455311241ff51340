"""Label efficiency: what pretraining buys when labels are few, on MNIST and Fashion-MNIST.

For each target data set and each encoder (random init, supervised pretraining on the *other* data
set; SimCLR, autoencoder and MAE pretraining on the target's own training images without labels) it measures, through
the same recipes the CLI runs (`pretrain`, `finetune`, `evaluate`, with the shipped configs):

- linear probe on all labels (configs/linear_<data>.yaml), test accuracy;
- k-NN accuracy of the frozen encoder (k=20, cosine, temperature 0.07; training split as the bank);
- fine-tuning on 10 and 100 labels per class (configs/finetune{10,100}_<data>.yaml), mean and spread
  over label-subset seeds. The random-init row is the same recipe without --from: same steps, head,
  augmentation and unlabeled images, the encoder at the full learning rate from the first step;
- fine-tuning on the 10 labels per class alone, without the unlabeled images (the built-in recipe's
  settings: 200 steps, encoder LR 0.1x after a 50-step head warm-up).

Every finished cell is stored in --out, so an interrupted benchmark continues where it stopped. A
cell's key includes a digest of the recipe file, the overrides and the source run it ran with, so
editing a recipe measures again what depends on it (a change to transferctl's code does not: use a
new --out then).

    python benchmarks/label_efficiency.py --data-dir ../shared/data            # the full table
    python benchmarks/label_efficiency.py --data-dir ../shared/data --quick    # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from transferctl.build import load_trained
from transferctl.config import load_config, read_yaml
from transferctl.data import DATA_DIR_ENV
from transferctl.engine import knn_accuracy
from transferctl.recipes import evaluate, finetune, pretrain
from transferctl.recipes.training import recipe_path
from transferctl.runs import read_trained_run

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
DATASETS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
OTHER = {"mnist": "fashion_mnist", "fashion_mnist": "mnist"}
QUICK = ["train.max_steps=3", "data.eval_batch_size=512"]
LABELS_ONLY = ["finetune.unlabeled.weight=0", "finetune.encoder_lr_scale=0.1", "train.max_steps=200"]
TARGETS = {  # the targets, in percent: (data set, column) -> minimum for the SimCLR row
    ("mnist", "linear"): 99.3,
    ("mnist", "knn"): 99.0,
    ("mnist", "ft10"): 97.0,
    ("mnist", "ft100"): 98.8,
    ("fashion_mnist", "linear"): 89.0,
    ("fashion_mnist", "ft10"): 78.0,
}


class Cells:
    """Finished measurements, one JSON line each, keyed by name: a rerun skips what is done."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.done[row["key"]] = row

    def get(
        self, key: str, measure: Callable[[], dict[str, Any]], usable: Callable[[dict[str, Any]], bool] = lambda row: True
    ) -> dict[str, Any]:
        """The cell `key`, measured now unless it is done and still `usable` (a pretraining run's folder still there)."""
        if key not in self.done or not usable(self.done[key]):
            started = time.perf_counter()
            row = {"key": key, **measure(), "seconds": 0.0}
            row["seconds"] = round(time.perf_counter() - started, 1)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.done[key] = row
            print(f"  {key}: { ({k: v for k, v in row.items() if k not in ('key', 'run')}) }", flush=True)
        return self.done[key]


def recipe_digest(config: Path, overrides: list[str], source: str | None = None) -> str:
    """What a cell's result depends on besides the code: the recipe's settings (and the built-in fine-tune
    recipe's it is merged onto), the overrides, the encoder's run and the data folder. Settings, not text:
    a comment or the layout of a file changes nothing that runs."""
    recipes = [read_yaml(config), read_yaml(recipe_path("finetune"))]
    what = json.dumps([recipes, overrides, source, os.environ.get(DATA_DIR_ENV)], sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:10]


def knn_of_probe(probe_dir: str, runs: Path) -> float:
    """k-NN accuracy of the frozen encoder inside a linear-probe run (for random init: its seeded init)."""
    record = read_trained_run(probe_dir, runs)
    cfg = load_config(None, [], base=record.config)
    trained = load_trained(record, cfg, checkpoint="last", device=torch.device("cpu"), splits=("train", "test"))
    bank, test = trained.split(train=True), trained.split(train=False)
    encoder = trained.network.encoder.eval()
    return knn_accuracy(encoder, bank, test, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature, batch_size=cfg.data.eval_batch_size)


def tuned_accuracy(source: str | None, config: Path, overrides: list[str], runs: Path) -> dict[str, Any]:
    tuned = finetune(source, config, overrides, runs_dir=runs)
    tested = evaluate(str(tuned.run_dir), runs_dir=runs)
    return {"accuracy": tested.metrics["accuracy"], "run": str(tuned.run_dir)}


# The encoders of each row: a pretraining recipe (its config, on the target data set or the other one), or none.
ENCODERS = {
    "random": ("random init", None, None),
    "supervised": ("supervised on {other}", "supervised", "other"),
    "simclr": ("SimCLR (no labels)", "simclr", "own"),
    "autoencoder": ("autoencoder (no labels)", "autoencoder", "own"),
    "mae": ("MAE (no labels)", "mae", "own"),
}
RECONSTRUCTION_ROWS = ("autoencoder (no labels)", "MAE (no labels)")
FINETUNE_COLUMNS = ("ft10", "ft100", "ft10_labels_only")


def encoders(data: str, cells: Cells, runs: Path, extra: list[str], chosen: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The chosen encoders for target `data` (default: all): row name -> {source run (None: random init), pretraining seconds}."""
    other, rows = OTHER[data], {}
    for key in chosen or list(ENCODERS):
        name, method, on = ENCODERS[key]
        if method is None:
            rows[name] = {"source": None, "seconds": 0.0}
            continue
        pretrained_on = other if on == "other" else data
        config = CONFIGS / f"{method}_{pretrained_on}.yaml"
        cell = cells.get(
            f"pretrain/{method}/{pretrained_on}/{recipe_digest(config, extra)}",
            lambda config=config: {"run": str(pretrain(config, extra, runs_dir=runs).run_dir)},
            usable=lambda row: Path(row["run"]).is_dir(),  # runs are not kept in git: a fresh clone pretrains again
        )
        rows[name.format(other=DATASETS[other])] = {"source": cell["run"], "seconds": cell["seconds"]}
    return rows


def measure_row(
    data: str, name: str, encoder: dict[str, Any], seeds: list[int], cells: Cells, runs: Path, extra: list[str]
) -> dict[str, Any]:
    source, tag = encoder["source"], f"{data}/{name}"
    target = [f"data.name={data}"]
    probe_config, probe_options = CONFIGS / f"linear_{data}.yaml", target + extra
    probe_key = f"{tag}/linear/{recipe_digest(probe_config, probe_options, source)}"
    probe = cells.get(probe_key, lambda: tuned_accuracy(source, probe_config, probe_options, runs))
    knn = cells.get(probe_key.replace("/linear/", "/knn/"), lambda: {"accuracy": knn_of_probe(probe["run"], runs)})
    row: dict[str, Any] = {"data": data, "encoder": name, "linear": probe["accuracy"], "knn": knn["accuracy"]}
    seconds = encoder["seconds"] + probe["seconds"] + knn["seconds"]
    for column, labels, options in (("ft10", 10, []), ("ft100", 100, []), ("ft10_labels_only", 10, LABELS_ONLY)):
        config = CONFIGS / f"finetune{labels}_{data}.yaml"
        runs_of_seed = []
        for seed in seeds:
            overrides = [*target, *options, f"data.seed={seed}", *extra]
            key = f"{tag}/{column}/seed{seed}/{recipe_digest(config, overrides, source)}"
            runs_of_seed.append(cells.get(key, lambda overrides=overrides, config=config: tuned_accuracy(source, config, overrides, runs)))
        accuracies = [r["accuracy"] for r in runs_of_seed]
        row[column] = statistics.mean(accuracies)
        row[f"{column}_sd"] = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        seconds += sum(r["seconds"] for r in runs_of_seed)
    row["pretrain_min"] = encoder["seconds"] / 60
    row["row_min"] = seconds / 60
    return row


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def markdown(rows: list[dict[str, Any]], seeds: int) -> str:
    lines = [
        f"| data | encoder | pretraining (min) | linear probe | k-NN | 10 labels/class (n={seeds}) | 100 labels/class (n={seeds}) "
        f"| 10 labels/class, labels only (n={seeds}) | row wall time (min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {DATASETS[r['data']]} | {r['encoder']} | {r['pretrain_min']:.1f} | {pct(r['linear'])} | {pct(r['knn'])} | "
            f"{pct(r['ft10'])} ± {pct(r['ft10_sd'])} | {pct(r['ft100'])} ± {pct(r['ft100_sd'])} | "
            f"{pct(r['ft10_labels_only'])} ± {pct(r['ft10_labels_only_sd'])} | {r['row_min']:.1f} |"
        )
    return "\n".join(lines)


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for data in DATASETS:
        mine = {r["encoder"]: r for r in rows if r["data"] == data}
        simclr, scratch = mine.get("SimCLR (no labels)"), mine.get("random init")
        if not simclr:
            continue
        for (d, column), minimum in TARGETS.items():
            if d == data:
                got = 100 * simclr[column]
                out.append(f"- {DATASETS[data]} {column}: {got:.2f} (target >= {minimum}): {'met' if got >= minimum else 'NOT met'}")
        if scratch:
            for column, what in (("ft10", "10 labels/class"), ("ft10_labels_only", "10 labels/class, labels only")):
                gain = 100 * (simclr[column] - scratch[column])
                verdict = "met" if gain >= 3 else "NOT met"
                out.append(f"- {DATASETS[data]} {what}, SimCLR minus random init: {gain:+.2f} points (target >= +3): {verdict}")
    return out + reconstruction_lines(rows)


def reconstruction_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The reconstruction encoders' targets: each beats random init by >= 3 points at 10 labels/class with the labels
    alone; the best of them beats SimCLR in at least one fine-tune column."""
    out = []
    for data in DATASETS:
        mine = {r["encoder"]: r for r in rows if r["data"] == data}
        scratch, simclr = mine.get("random init"), mine.get("SimCLR (no labels)")
        for name in RECONSTRUCTION_ROWS:
            if name in mine and scratch:
                gain = 100 * (mine[name]["ft10_labels_only"] - scratch["ft10_labels_only"])
                verdict = "met" if gain >= 3 else "NOT met"
                what = f"{DATASETS[data]} 10 labels/class, labels only, {name} minus random init"
                out.append(f"- {what}: {gain:+.2f} points (target >= +3): {verdict}")
        if simclr and any(name in mine for name in RECONSTRUCTION_ROWS):
            leads = {
                column: max(100 * (mine[name][column] - simclr[column]) for name in RECONSTRUCTION_ROWS if name in mine)
                for column in FINETUNE_COLUMNS
            }
            best = max(leads, key=leads.get)
            verdict = "met" if leads[best] > 0 else "NOT met"
            what = f"{DATASETS[data]} best reconstruction encoder minus SimCLR, best fine-tune column ({best})"
            out.append(f"- {what}: {leads[best]:+.2f} points (target > 0): {verdict}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="torchvision-layout folder with MNIST and FashionMNIST (else $TRANSFERCTL_DATA_DIR)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="label-subset seeds (data.seed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "label_efficiency")
    parser.add_argument("--quick", action="store_true", help="3 steps per run: checks the plumbing, not the accuracy")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS), help="the rows to measure")
    args = parser.parse_args()

    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    cells = Cells(out / "cells.jsonl")
    extra = ([f"data.root={args.data_dir.resolve()}"] if args.data_dir else []) + (QUICK if args.quick else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells in {cells.path}", flush=True)
    rows = []
    for data in args.datasets:
        for name, encoder in encoders(data, cells, runs, extra, args.encoders).items():
            rows.append(measure_row(data, name, encoder, args.seeds, cells, runs, extra))
    table = markdown(rows, len(args.seeds))
    summary = "\n".join(target_lines(rows))
    (out / "table.md").write_text(table + "\n\n" + summary + "\n")
    print(table)
    print()
    print(summary)


if __name__ == "__main__":
    main()
