"""Does pretraining pay off beyond classification? Few-label regression and segmentation, through the same recipes
the CLI runs.

- **Regression** on `mnist_rotation` (real MNIST digits turned by a seeded angle in [-45, 45] degrees; the target
  is the angle), with 100, 1,000 and all labelled training images: the test set's mean absolute error in degrees,
  through configs/regress_mnist_rotation.yaml (600 steps of 64 images; with all labels 2,000 steps of 128).
  Encoders: random init (the same recipe without --from), SimCLR, the denoising autoencoder and MAE, each
  pretrained on MNIST's training digits without labels by its shipped recipe; and SimCLR with views turned by
  up to 45 degrees instead of 10, an encoder taught to ignore the very thing the task measures.
- **Segmentation** on `mnist_scenes` (64x64 canvases of 1 to 4 real MNIST digits; 10,000 training and 2,000 test
  scenes, 11 classes), with 50, 500 and all labelled scenes: the test scenes' mIoU, through
  configs/segment_mnist_scenes.yaml (a U-Net decoder; 600 steps of 32 scenes; with all labels 1,500). Encoders: random init,
  SimCLR and MAE (masked modelling, the reconstruction objective closest to a dense task).
- **Detection** on the same scenes (a box and a class per digit, 10 classes), with 50, 500 and all labelled scenes:
  the test scenes' mAP@.5 and, beside it, COCO's mAP@[.5:.95], through configs/detect_mnist_scenes.yaml (an FCOS
  head over the last three stages; 600 steps of 32 scenes; with all labels 1,500). Encoders: random init, SimCLR, MAE.
- **Multi-label** on the same scenes (the set of digits present, about 2.3 distinct a scene, 10 classes), with 50, 500
  and all labelled scenes: the test scenes' mAP and, beside it, micro F1 at the thresholds chosen on the validation
  split, through configs/multilabel_mnist_scenes.yaml (class maps pooled by log-sum-exp; 600 steps of 32 scenes; with
  all labels 4,500). Encoders: random init, SimCLR, and SimCLR pretrained on the training scenes themselves without
  their labels.
- The pretraining runs are the label-efficiency benchmark's, shared through its cells (`--pretrain-out`), so
  neither benchmark trains them twice.
- The small budgets are repeated over 3 label-subset seeds (mean and spread); all labels run once. Every cell
  is stored in --out with its wall time, keyed by a digest of its recipe, overrides and source run.

    python benchmarks/dense_tasks.py --data-dir ../shared/data            # 70 min on a 2-core CPU, plus pretraining
    python benchmarks/dense_tasks.py --data-dir ../shared/data --quick    # the plumbing, seconds
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from label_efficiency import QUICK, REPO, Cells, encoders, recipe_digest

from transferctl.recipes import evaluate, finetune, pretrain

CONFIGS = REPO / "configs"
# Pretraining variants beyond the shipped recipes: SimCLR taught to ignore rotations (its recipe turns by up to 10
# degrees); SimCLR on the training scenes themselves, without their labels (28 epochs of 9,000 scenes: 980 steps, a
# quarter of the MNIST recipe's, of images 5 times larger)
VARIANTS = {
    "simclr_rotation45": ("SimCLR, views turned by up to 45 degrees (no labels)", "simclr", ["data.augment.rotation=45"]),
    "simclr_scenes": ("SimCLR on the scenes (no labels)", "simclr", ["data.name=mnist_scenes", "train.epochs=28"]),
}


@dataclass(frozen=True)
class Bench:
    """One task of the benchmark: its recipe, the metric it reports, its label budgets and encoders."""

    tag: str  # in cell keys and the table
    label: str  # the table's task column
    config: Path
    metric: str
    lower_is_better: bool
    budgets: dict[str, list[str]]  # budget -> the overrides that choose its labelled samples
    encoders: tuple[str, ...]
    variants: tuple[str, ...] = ()
    digits: int = 2  # decimals in the table
    quick: tuple[str, ...] = ()  # --quick: smaller data, so that the plumbing check takes seconds
    beside: tuple[str, str] | None = None  # a second metric shown in each cell: (its key, its label)


ROTATION = Bench(
    "rotation",
    "rotation: mean abs error (degrees)",
    CONFIGS / "regress_mnist_rotation.yaml",
    "mean_abs_error",
    True,
    {
        "100": ["data.labeled_samples=100"],
        "1000": ["data.labeled_samples=1000"],
        "all": ["data.labeled_samples=null", "train.max_steps=2000", "data.batch_size=128"],
    },
    ("random", "simclr", "autoencoder", "mae"),
    ("simclr_rotation45",),
)
SCENES = Bench(
    "scenes",
    "scenes: mIoU",
    CONFIGS / "segment_mnist_scenes.yaml",
    "miou",
    False,
    {
        "50": ["data.labeled_samples=50"],
        "500": ["data.labeled_samples=500"],
        "all": ["data.labeled_samples=null", "train.max_steps=1500"],
    },
    ("random", "simclr", "mae"),
    digits=3,
    quick=("data.train_scenes=600", "data.test_scenes=50"),
)
DETECTION = Bench(
    "detection",
    "scenes: mAP@.5",
    CONFIGS / "detect_mnist_scenes.yaml",
    "map_50",
    False,
    {
        "50": ["data.labeled_samples=50"],
        "500": ["data.labeled_samples=500"],
        "all": ["data.labeled_samples=null", "train.max_steps=1500"],
    },
    ("random", "simclr", "mae"),
    digits=3,
    quick=("data.train_scenes=600", "data.test_scenes=50"),
    beside=("map", "mAP@[.5:.95]"),
)
MULTILABEL = Bench(
    "multilabel",
    "scenes: digits present, mAP",
    CONFIGS / "multilabel_mnist_scenes.yaml",
    "map",
    False,
    {
        "50": ["data.labeled_samples=50"],
        "500": ["data.labeled_samples=500"],
        "all": ["data.labeled_samples=null", "train.max_steps=4500"],
    },
    ("random", "simclr"),
    ("simclr_scenes",),
    digits=3,
    quick=("data.train_scenes=600", "data.test_scenes=50"),
    beside=("f1_micro", "micro F1"),
)
BENCHES = {"rotation": ROTATION, "scenes": SCENES, "detection": DETECTION, "multilabel": MULTILABEL}
TARGETS = {  # (budget, bound) per task
    "rotation": [("1000", 5.0)],
    "scenes": [("500", 0.80), ("all", 0.90)],
    "detection": [("all", 0.80)],
    "multilabel": [("all", 0.95)],
}


def variants(chosen: list[str], cells: Cells, runs: Path, extra: list[str]) -> dict[str, dict[str, Any]]:
    """Row name -> {source run, pretraining seconds} of each chosen pretraining variant (on MNIST)."""
    rows = {}
    for key in chosen:
        name, method, options = VARIANTS[key]
        config, overrides = CONFIGS / f"{method}_mnist.yaml", [*options, *extra]
        cell = cells.get(
            f"pretrain/{key}/mnist/{recipe_digest(config, overrides)}",
            lambda config=config, overrides=overrides: {"run": str(pretrain(config, overrides, runs_dir=runs).run_dir)},
        )
        rows[name] = {"source": cell["run"], "seconds": cell["seconds"]}
    return rows


def task_cell(bench: Bench, source: str | None, overrides: list[str], runs: Path) -> dict[str, Any]:
    tuned = finetune(source, bench.config, overrides, runs_dir=runs)
    tested = evaluate(str(tuned.run_dir), runs_dir=runs)
    numbers = {k: v for k, v in tested.metrics.items() if isinstance(v, float)}
    return numbers | {"run": str(tuned.run_dir)}


def task_row(
    bench: Bench, name: str, encoder: dict[str, Any], seeds: list[int], cells: Cells, runs: Path, extra: list[str]
) -> dict[str, Any]:
    source, row = encoder["source"], {"task": bench.tag, "encoder": name, "pretrain_min": encoder["seconds"] / 60}
    seconds = 0.0
    for budget, options in bench.budgets.items():
        measured = []
        for seed in seeds if budget != "all" else seeds[:1]:
            overrides = [*options, f"data.seed={seed}", *extra]
            key = f"{bench.tag}/{name}/{budget}/seed{seed}/{recipe_digest(bench.config, overrides, source)}"
            measured.append(cells.get(key, lambda overrides=overrides: task_cell(bench, source, overrides, runs)))
        values = [m[bench.metric] for m in measured]
        if bench.beside:
            row[f"{budget}_beside"] = statistics.mean(m[bench.beside[0]] for m in measured)
        row[budget] = statistics.mean(values)
        row[f"{budget}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        row[f"{budget}_min"] = sum(m["seconds"] for m in measured) / 60
        seconds += sum(m["seconds"] for m in measured)
    row["row_min"] = seconds / 60
    return row


def markdown(bench: Bench, rows: list[dict[str, Any]], seeds: int) -> str:
    def cell(row: dict[str, Any], budget: str) -> str:
        spread = f" ± {row[f'{budget}_sd']:.{bench.digits}f}" if row[f"{budget}_sd"] is not None else ""
        beside = f"{bench.beside[1]} {row[f'{budget}_beside']:.{bench.digits}f}; " if bench.beside else ""
        return f"{row[budget]:.{bench.digits}f}{spread} ({beside}{row[f'{budget}_min']:.1f} min)"

    columns = " | ".join(f"{b} labelled (n={1 if b == 'all' else seeds})" for b in bench.budgets)
    lines = [f"| task | encoder | pretraining (min) | {columns} |", "| --- | --- | --- |" + " --- |" * len(bench.budgets)]
    for r in rows:
        cells = " | ".join(cell(r, budget) for budget in bench.budgets)
        lines.append(f"| {bench.label} | {r['encoder']} | {r['pretrain_min']:.1f} | {cells} |")
    return "\n".join(lines)


def target_lines(bench: Bench, rows: list[dict[str, Any]]) -> list[str]:
    def better(a: float, b: float) -> bool:
        return a < b if bench.lower_is_better else a > b

    pick = min if bench.lower_is_better else max
    smallest = next(iter(bench.budgets))
    scratch = next((r for r in rows if r["encoder"] == "random init"), None)
    pretrained = [r for r in rows if r["encoder"] != "random init"]
    out = []
    if scratch and pretrained:
        best = pick(pretrained, key=lambda r: r[smallest])
        verdict = "met" if better(best[smallest], scratch[smallest]) else "NOT met"
        out.append(
            f"- {bench.tag} at {smallest} labelled, best pretrained ({best['encoder']}) against random init: "
            f"{best[smallest]:.{bench.digits}f} against {scratch[smallest]:.{bench.digits}f} (target: better): {verdict}"
        )
    for budget, bound in TARGETS[bench.tag] if rows else []:
        best = pick(rows, key=lambda r: r[budget])
        met = best[budget] <= bound if bench.lower_is_better else best[budget] >= bound
        sign = "<=" if bench.lower_is_better else ">="
        out.append(
            f"- {bench.tag} at {budget} labelled, best ({best['encoder']}): {best[budget]:.{bench.digits}f} "
            f"(target {sign} {bound}): {'met' if met else 'NOT met'}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="torchvision-layout folder with MNIST (else $TRANSFERCTL_DATA_DIR)")
    parser.add_argument("--tasks", nargs="+", default=list(BENCHES), choices=list(BENCHES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="label-subset seeds (data.seed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dense_tasks")
    parser.add_argument(
        "--pretrain-out", type=Path, default=REPO / "benchmarks" / "results" / "label_efficiency", help="where the pretraining cells live"
    )
    parser.add_argument("--encoders", nargs="+", choices=["random", "simclr", "autoencoder", "mae"], help="default: each task's own")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="pretraining variants' rows (default: each task's own)")
    parser.add_argument("--quick", action="store_true", help="3 steps per run: checks the plumbing, not the numbers")
    args = parser.parse_args()

    out, pretrained_in = (args.out / "quick", args.pretrain_out / "quick") if args.quick else (args.out, args.pretrain_out)
    for folder in (out, pretrained_in):
        folder.mkdir(parents=True, exist_ok=True)
    cells, pretrain_cells = Cells(out / "cells.jsonl"), Cells(pretrained_in / "cells.jsonl")
    extra = ([f"data.root={args.data_dir.resolve()}"] if args.data_dir else []) + (QUICK if args.quick else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells in {cells.path}", flush=True)
    report = []
    for bench in (BENCHES[name] for name in args.tasks):
        sources = encoders("mnist", pretrain_cells, pretrained_in / "runs", extra, list(args.encoders or bench.encoders))
        sources |= variants(list(bench.variants if args.variants is None else args.variants), pretrain_cells, pretrained_in / "runs", extra)
        task_extra = [*extra, *(bench.quick if args.quick else ())]
        rows = [task_row(bench, name, encoder, args.seeds, cells, out / "runs", task_extra) for name, encoder in sources.items()]
        report += [markdown(bench, rows, len(args.seeds)), "", *target_lines(bench, rows), ""]
    text = "\n".join(report)
    every = list(args.tasks) == list(BENCHES)
    (out / ("table.md" if every else f"table-{'-'.join(args.tasks)}.md")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
