"""Does pretraining pay off beyond classification? Few-label regression (and, with the segmentation task,
segmentation), through the same recipes the CLI runs.

- **Regression** on `mnist_rotation` (real MNIST digits turned by a seeded angle in [-45, 45] degrees; the target
  is the angle), with 100, 1,000 and all labelled training images: the test set's mean absolute error in degrees,
  through configs/regress_mnist_rotation.yaml (600 steps of 64 images; with all labels 2,000 steps of 128).
- Encoders: random init (the same recipe without --from), and SimCLR, the denoising autoencoder and MAE, each
  pretrained on MNIST's training digits without labels by its shipped recipe; and SimCLR with views turned by
  up to 45 degrees instead of 10, an encoder taught to ignore the very thing the task measures. The pretraining runs are the
  label-efficiency benchmark's: they are shared through its cells (`--pretrain-out`), so neither benchmark
  trains them twice.
- The small budgets are repeated over 3 label-subset seeds (mean and spread); all labels run once. Every cell
  is stored in --out with its wall time, keyed by a digest of its recipe, overrides and source run.

    python benchmarks/dense_tasks.py --data-dir ../shared/data            # about 30 minutes on a 2-core CPU
    python benchmarks/dense_tasks.py --data-dir ../shared/data --quick    # the plumbing, seconds
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
from label_efficiency import QUICK, REPO, Cells, encoders, recipe_digest

from transferctl.recipes import evaluate, finetune, pretrain

CONFIGS = REPO / "configs"
ROTATION = CONFIGS / "regress_mnist_rotation.yaml"
ENCODER_ROWS = ["random", "simclr", "autoencoder", "mae"]
# Pretraining variants beyond the shipped recipes: SimCLR taught to ignore rotations (its recipe turns by up to 10 degrees)
VARIANTS = {"simclr_rotation45": ("SimCLR, views turned by up to 45 degrees (no labels)", "simclr", ["data.augment.rotation=45"])}
BUDGETS = {  # labelled training images -> the overrides that choose them (all: more steps, to see every image)
    "100": ["data.labeled_samples=100"],
    "1000": ["data.labeled_samples=1000"],
    "all": ["data.labeled_samples=null", "train.max_steps=2000", "data.batch_size=128"],
}
TARGET_MAE_AT_1000 = 5.0  # degrees


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


def regression_cell(source: str | None, overrides: list[str], runs: Path) -> dict[str, Any]:
    tuned = finetune(source, ROTATION, overrides, runs_dir=runs)
    tested = evaluate(str(tuned.run_dir), runs_dir=runs)
    return {key: tested.metrics[key] for key in ("mean_abs_error", "rmse", "r2")} | {"run": str(tuned.run_dir)}


def regression_row(name: str, encoder: dict[str, Any], seeds: list[int], cells: Cells, runs: Path, extra: list[str]) -> dict[str, Any]:
    source, row = encoder["source"], {"task": "rotation", "encoder": name, "pretrain_min": encoder["seconds"] / 60}
    seconds = 0.0
    for budget, options in BUDGETS.items():
        measured = []
        for seed in seeds if budget != "all" else seeds[:1]:
            overrides = [*options, f"data.seed={seed}", *extra]
            key = f"rotation/{name}/{budget}/seed{seed}/{recipe_digest(ROTATION, overrides, source)}"
            measured.append(cells.get(key, lambda overrides=overrides: regression_cell(source, overrides, runs)))
        errors = [m["mean_abs_error"] for m in measured]
        row[budget] = statistics.mean(errors)
        row[f"{budget}_sd"] = statistics.stdev(errors) if len(errors) > 1 else None
        row[f"{budget}_min"] = sum(m["seconds"] for m in measured) / 60
        seconds += sum(m["seconds"] for m in measured)
    row["row_min"] = seconds / 60
    return row


def markdown(rows: list[dict[str, Any]], seeds: int) -> str:
    def cell(row: dict[str, Any], budget: str) -> str:
        spread = f" ± {row[f'{budget}_sd']:.2f}" if row[f"{budget}_sd"] is not None else ""
        return f"{row[budget]:.2f}{spread} ({row[f'{budget}_min']:.1f} min)"

    lines = [
        f"| task | encoder | pretraining (min) | 100 labelled (n={seeds}) | 1,000 labelled (n={seeds}) | all labelled (n=1) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = " | ".join(cell(r, budget) for budget in BUDGETS)
        lines.append(f"| rotation: mean abs error (degrees) | {r['encoder']} | {r['pretrain_min']:.1f} | {cells} |")
    return "\n".join(lines)


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    scratch = next((r for r in rows if r["encoder"] == "random init"), None)
    pretrained = [r for r in rows if r["encoder"] != "random init"]
    out = []
    if scratch and pretrained:
        best = min(pretrained, key=lambda r: r["100"])
        verdict = "met" if best["100"] < scratch["100"] else "NOT met"
        out.append(
            f"- rotation at 100 labelled images, best pretrained ({best['encoder']}) against random init: "
            f"{best['100']:.2f} against {scratch['100']:.2f} degrees (target: lower): {verdict}"
        )
    if rows:
        best = min(rows, key=lambda r: r["1000"])
        verdict = "met" if best["1000"] <= TARGET_MAE_AT_1000 else "NOT met"
        out.append(f"- rotation at 1,000 labelled images, best ({best['encoder']}): {best['1000']:.2f} degrees (target <= 5): {verdict}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="torchvision-layout folder with MNIST (else $TRANSFERCTL_DATA_DIR)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="label-subset seeds (data.seed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dense_tasks")
    parser.add_argument(
        "--pretrain-out", type=Path, default=REPO / "benchmarks" / "results" / "label_efficiency", help="where the pretraining cells live"
    )
    parser.add_argument("--encoders", nargs="+", default=ENCODER_ROWS, choices=ENCODER_ROWS)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), help="pretraining variants' rows")
    parser.add_argument("--quick", action="store_true", help="3 steps per run: checks the plumbing, not the error")
    args = parser.parse_args()

    out, pretrained_in = (args.out / "quick", args.pretrain_out / "quick") if args.quick else (args.out, args.pretrain_out)
    for folder in (out, pretrained_in):
        folder.mkdir(parents=True, exist_ok=True)
    cells, pretrain_cells = Cells(out / "cells.jsonl"), Cells(pretrained_in / "cells.jsonl")
    extra = ([f"data.root={args.data_dir.resolve()}"] if args.data_dir else []) + (QUICK if args.quick else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells in {cells.path}", flush=True)
    sources = encoders("mnist", pretrain_cells, pretrained_in / "runs", extra, args.encoders)
    sources |= variants(args.variants, pretrain_cells, pretrained_in / "runs", extra)
    rows = [regression_row(name, encoder, args.seeds, cells, out / "runs", extra) for name, encoder in sources.items()]
    table, summary = markdown(rows, len(args.seeds)), "\n".join(target_lines(rows))
    (out / "table.md").write_text(table + "\n\n" + summary + "\n")
    print(table)
    print()
    print(summary)


if __name__ == "__main__":
    main()
