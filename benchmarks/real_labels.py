"""What real labelled data needs, measured: imbalanced classes and early stopping, through the shipped recipes.

- **Imbalance**: Fashion-MNIST made long-tailed (`data.imbalance=100`: class i keeps 6,000 * 100^(-i/9) training
  images, 60 for the tail, seeded by `data.seed`; the test split stays balanced), trained by
  configs/supervised_fashion_mnist.yaml as it is ("plain"), with `loss.class_weights=balanced`, with
  `data.sampler=balanced`, and with both. The test split's accuracy, balanced accuracy and macro F1, mean and spread
  over the seeds (each seed draws its own long tail, val part and initialisation).
- **Early stopping**: configs/supervised_mnist.yaml and configs/supervised_ag_news.yaml with all their labels, as
  they are and with `train.early_stop` (patience 3 validations of `train.val_every_steps=100`, min_delta 0.001 of
  validation accuracy): the steps each trained and the test accuracy of the checkpoint evaluation reads (best.pt
  when a run stopped early). And on a budget with room to spare (twice the epochs): the cosine schedule stretched
  over it, against early stopping on the plateau schedule: on validation accuracy with min_delta 0.001 and with any
  gain counting, and on validation loss (`--early-stop-budgets` picks the budgets).

- **Pseudo-label guard**: configs/finetune10_fsdd.yaml and configs/finetune10_ag_news.yaml (10 labels per class and
  the rest of the training split without labels) from their SimCLR (FSDD) and masked-language-model (AG News)
  encoders, pretrained by the shipped recipes: pseudo-labels as before the guard (`align=false`, `warmup_steps=0`),
  as shipped now (aligned, after a labels-only warm-up), and as shipped
  from a deliberately bad start: during the warm-up the labels are rotated (class c taught as c + 1), so the head
  that pseudo-labels begin with is confidently wrong. Test accuracy, and how often the run's `unlabeled_check` said
  it ended below a labels-only head.

Every cell is stored in --out with its wall time, keyed by a digest of its recipe and overrides; a rerun skips what
is done.

    python benchmarks/real_labels.py --data-dir ../shared/data --parts imbalance     # 12 runs, ~15 min on a 2-core CPU
    python benchmarks/real_labels.py --data-dir ../shared/data --parts early_stop    # 12 runs
    python benchmarks/real_labels.py --data-dir ../shared/data --parts guard         # 18 runs and two pretrainings
    python benchmarks/real_labels.py --data-dir ../shared/data --quick               # the plumbing, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from label_efficiency import QUICK, REPO, Cells, recipe_digest

from transferctl.methods.supervised import TaskObjective
from transferctl.recipes import evaluate, finetune, pretrain

CONFIGS = REPO / "configs"
IMBALANCE = {
    "plain": [],
    "class_weights=balanced": ["loss.class_weights=balanced"],
    "sampler=balanced": ["data.sampler=balanced"],
    "both": ["loss.class_weights=balanced", "data.sampler=balanced"],
}
EARLY_STOP = ["train.val_every_steps=100", "train.early_stop.patience=3", "train.early_stop.min_delta=0.001"]
EARLY_STOP_RECIPES = {"MNIST": "supervised_mnist.yaml", "AG News": "supervised_ag_news.yaml"}
# a budget with room to spare, as a user who does not know the right number of epochs sets one: twice the recipe's
# epochs, without early stopping (its cosine schedule stretched) and with it, on the plateau schedule that anneals
# where validation levels off (patience 2 validations a cut, 5 to stop: a cut gets time to pay before the run ends)
ROOM = {"MNIST": ["train.epochs=10"], "AG News": ["train.epochs=20"]}
PLATEAU_STOP = [*EARLY_STOP, "train.early_stop.patience=5", "scheduler.name=plateau", "scheduler.patience=2"]
# warmup-stable-decay: a constant rate until validation levels off, then a linear cooldown over a fifth of the steps
# taken so far before stopping (Hägele et al. 2024: a 20% cooldown matches a cosine schedule of that length)
COOLDOWN_STOP = [*EARLY_STOP, "scheduler.name=constant", "train.early_stop.cooldown=0.2"]
EARLY_STOP_BUDGETS = {  # budget -> (its overrides per recipe, what early stopping adds)
    "as shipped": ({}, EARLY_STOP),
    "twice the epochs, plateau schedule": (ROOM, PLATEAU_STOP),
    # early stopping's default elsewhere (Keras, Lightning): any gain resets the patience, as it does the schedule's
    "twice the epochs, plateau schedule, any gain counts": (ROOM, [*PLATEAU_STOP, "train.early_stop.min_delta=0"]),
    # validation loss keeps falling after accuracy has levelled (the schedule watches it too; best.pt stays by accuracy)
    "twice the epochs, plateau schedule on validation loss": (
        ROOM,
        [*PLATEAU_STOP, "train.early_stop.metric=val_loss", "train.early_stop.min_delta=0"],
    ),
    "twice the epochs, constant rate, cooldown before the stop": (ROOM, COOLDOWN_STOP),
    # the plateau rows' patience: five validations (about 400 steps), then the same cooldown, and one of half the steps
    "twice the epochs, constant rate, patience 5, cooldown before the stop": (ROOM, [*COOLDOWN_STOP, "train.early_stop.patience=5"]),
    "twice the epochs, constant rate, patience 5, cooldown of half the steps": (
        ROOM,
        [*COOLDOWN_STOP, "train.early_stop.patience=5", "train.early_stop.cooldown=0.5"],
    ),
}


def trained_and_tested(config: Path, overrides: list[str], runs: Path) -> dict[str, Any]:
    """Train `config` with `overrides`, evaluate the checkpoint evaluation picks; the test metrics and the steps trained."""
    trained = pretrain(config, overrides, runs_dir=runs)
    summary = json.loads((trained.run_dir / "summary.json").read_text())
    tested = evaluate(str(trained.run_dir), runs_dir=runs).metrics
    return {
        **{k: tested[k] for k in ("accuracy", "balanced_accuracy", "f1_macro")},
        "steps": trained.metrics["step"],
        "early_stopped_at": summary.get("early_stopped_at"),
        "run": str(trained.run_dir),
    }


def mean_sd(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * spread:.{digits}f}"


def imbalance_table(cells: Cells, runs: Path, extra: list[str], seeds: list[int], ratio: float) -> str:
    config = CONFIGS / "supervised_fashion_mnist.yaml"
    lines = [
        f"| Fashion-MNIST, imbalance {ratio:g} | accuracy % | balanced accuracy % | macro F1 % | minutes per run |",
        "|---|---|---|---|---|",
    ]
    for name, options in IMBALANCE.items():
        measured = []
        for seed in seeds:
            overrides = [f"data.imbalance={ratio}", *options, f"data.seed={seed}", f"train.seed={seed}", *extra]
            key = f"imbalance/{name}/seed{seed}/{recipe_digest(config, overrides)}"
            measured.append(cells.get(key, lambda overrides=overrides: trained_and_tested(config, overrides, runs)))
        columns = [mean_sd([m[k] for m in measured]) for k in ("accuracy", "balanced_accuracy", "f1_macro")]
        minutes = statistics.mean(m["seconds"] for m in measured) / 60
        lines.append(f"| {name} | {' | '.join(columns)} | {minutes:.1f} |")
    return "\n".join(lines)


def early_stop_table(cells: Cells, runs: Path, extra: list[str], seeds: list[int], chosen: list[str], budgets: list[str]) -> str:
    lines = [
        "| recipe (all labels) | budget | steps, without | test accuracy % | steps, early stop | test accuracy % (best.pt) | steps saved |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, name in ((k, v) for k, v in EARLY_STOP_RECIPES.items() if k in chosen):
        config = CONFIGS / name
        for budget in budgets:
            room, stopping = EARLY_STOP_BUDGETS[budget]
            both = {}
            # budgets with the same room share their runs without early stopping: keyed by the first such budget
            first = next(b for b, (r, _) in EARLY_STOP_BUDGETS.items() if r == room)
            for variant, options in (("full", room.get(label, [])), ("early", [*room.get(label, []), *stopping])):
                keyed_by = first if variant == "full" else budget
                row = label if keyed_by == "as shipped" else f"{label}, {keyed_by}"  # the shipped budget's cells keep their keys
                measured = []
                for seed in seeds:
                    overrides = [*options, f"data.seed={seed}", f"train.seed={seed}", *extra]
                    key = f"early_stop/{row}/{variant}/seed{seed}/{recipe_digest(config, overrides)}"
                    measured.append(cells.get(key, lambda overrides=overrides, config=config: trained_and_tested(config, overrides, runs)))
                both[variant] = measured
            steps = {v: statistics.mean(m["steps"] for m in both[v]) for v in both}
            saved = 1 - steps["early"] / steps["full"]
            lines.append(
                f"| {label} | {budget} | {steps['full']:.0f} | {mean_sd([m['accuracy'] for m in both['full']], digits=2)} | "
                f"{steps['early']:.0f} ({', '.join(str(m['steps']) for m in both['early'])}) | "
                f"{mean_sd([m['accuracy'] for m in both['early']], digits=2)} | {100 * saved:.0f}% |"
            )
    return "\n".join(lines)


GUARD_RECIPES = {"FSDD": ("simclr_fsdd.yaml", "finetune10_fsdd.yaml"), "AG News": ("mlm_ag_news.yaml", "finetune10_ag_news.yaml")}
GUARD_VARIANTS = {
    "pseudo-labels, before the guard": ["finetune.unlabeled.align=false", "finetune.unlabeled.warmup_steps=0"],
    "pseudo-labels, guarded (as shipped)": [],
    "guarded, from a bad start": [],
}


@contextmanager
def rotated_labels(steps: int) -> Iterator[None]:
    """A deliberately bad start: for the first `steps` steps every fine-tune is taught class c as c + 1."""
    original = TaskObjective.loss

    def loss(self: TaskObjective, batch: Any, step: int) -> Any:
        if step < steps:
            batch = replace(batch, targets=(batch.targets + 1) % self.network.head[-1].out_features)
        return original(self, batch, step)

    TaskObjective.loss = loss
    try:
        yield
    finally:
        TaskObjective.loss = original


def guarded_cell(source: str, config: Path, overrides: list[str], runs: Path, bad_start: int) -> dict[str, Any]:
    if bad_start:
        with rotated_labels(bad_start):
            tuned = finetune(source, config, overrides, runs_dir=runs)
    else:
        tuned = finetune(source, config, overrides, runs_dir=runs)
    summary = json.loads((tuned.run_dir / "summary.json").read_text())
    check = summary.get("unlabeled_check") or {}
    tested = evaluate(str(tuned.run_dir), runs_dir=runs).metrics
    return {"accuracy": tested["accuracy"], "verdict": check.get("verdict"), "check": check, "run": str(tuned.run_dir)}


def guard_table(cells: Cells, runs: Path, extra: list[str], seeds: list[int], chosen: list[str]) -> str:
    from transferctl.config import read_yaml

    lines = ["| data (10 labels per class) | fine-tune | test accuracy % | runs that warned |", "|---|---|---|---|"]
    for label, (pretrain_name, recipe) in ((k, v) for k, v in GUARD_RECIPES.items() if k in chosen):
        pretrain_config, config = CONFIGS / pretrain_name, CONFIGS / recipe
        source = cells.get(
            f"guard/pretrain/{label}/{recipe_digest(pretrain_config, extra)}",
            lambda pretrain_config=pretrain_config: {"run": str(pretrain(pretrain_config, extra, runs_dir=runs).run_dir)},
            usable=lambda row: Path(row["run"]).is_dir(),
        )["run"]

        def measure(overrides: list[str], config: Path = config, source: str = source, bad: int = 0) -> dict[str, Any]:
            return guarded_cell(source, config, overrides, runs, bad)

        bad_steps = int(read_yaml(config)["finetune"]["unlabeled"]["warmup_steps"])
        for variant, options in GUARD_VARIANTS.items():
            bad = bad_steps if "bad start" in variant else 0
            measured = []
            for seed in seeds:
                overrides = [*options, f"data.seed={seed}", *extra]
                key = f"guard/{label}/{variant}/seed{seed}/{recipe_digest(config, [*overrides, f'bad={bad}'], source)}"
                measured.append(cells.get(key, lambda overrides=overrides, bad=bad: measure(overrides, bad=bad)))
            warned = sum(m["verdict"] == "hurt" for m in measured)
            checked = sum(m["verdict"] is not None for m in measured)
            lines.append(
                f"| {label} | {variant} | {mean_sd([m['accuracy'] for m in measured])} | {f'{warned} of {checked}' if checked else '—'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="the folder with FashionMNIST, MNIST and ag_news (else $TRANSFERCTL_DATA_DIR)")
    parser.add_argument("--parts", nargs="+", default=["imbalance", "early_stop", "guard"], choices=["imbalance", "early_stop", "guard"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="data.seed and train.seed of each repeat")
    parser.add_argument(
        "--early-stop-data", nargs="+", default=list(EARLY_STOP_RECIPES), choices=list(EARLY_STOP_RECIPES), help="early stopping's recipes"
    )
    budgets = list(EARLY_STOP_BUDGETS)
    parser.add_argument("--early-stop-budgets", nargs="+", default=budgets, choices=budgets, help="early stopping's budgets")
    parser.add_argument("--guard-data", nargs="+", default=list(GUARD_RECIPES), choices=list(GUARD_RECIPES), help="the guard's data sets")
    parser.add_argument("--imbalance", type=float, default=100.0, help="the head class's count over the tail's")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real_labels")
    parser.add_argument("--quick", action="store_true", help="3 steps per run: checks the plumbing, not the results")
    args = parser.parse_args()

    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    runs, cells = out / "runs", Cells(out / "cells.jsonl")
    extra = ([f"data.root={args.data_dir.resolve()}"] if args.data_dir else []) + (QUICK if args.quick else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells in {cells.path}", flush=True)
    tables = []
    if "imbalance" in args.parts:
        tables.append(imbalance_table(cells, runs, extra, args.seeds, args.imbalance))
    if "early_stop" in args.parts:
        tables.append(early_stop_table(cells, runs, extra, args.seeds, args.early_stop_data, args.early_stop_budgets))
    if "guard" in args.parts:
        tables.append(guard_table(cells, runs, extra, args.seeds, args.guard_data))
    text = "\n\n".join(tables)
    (out / f"table-{'-'.join(args.parts)}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
