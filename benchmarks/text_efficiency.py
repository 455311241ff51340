"""Label efficiency on text: what pretraining buys on real news articles (AG News) when labels are few.

For each encoder (random init; masked language modelling and contrastive learning, pretrained on the training
articles without labels), it fine-tunes through the recipe the CLI runs (configs/finetune10_ag_news.yaml) on 10
and 100 labelled articles per topic, with the labels alone and with the other training articles as unlabeled
data (pseudo-labels), and on every label of the training part (the 12,000 articles less the 10% validation
part); mean and spread over label-subset seeds (data.seed). The classic baseline is TF-IDF (unigrams and bigrams)
with logistic regression (scikit-learn), on the same labelled subsets.

Cells are cached as in label_efficiency.py (same cache format and digests), so an interrupted run continues.

    python benchmarks/text_efficiency.py --data-dir ../shared/data            # the full table
    python benchmarks/text_efficiency.py --data-dir ../shared/data --quick    # a smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audio_efficiency import budgets_of, cell_text, column_overrides, measure_row
from label_efficiency import Cells, recipe_digest, tuned_accuracy

from transferctl.config import load_config
from transferctl.data import load_split, load_training_data
from transferctl.recipes import pretrain

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FINETUNE = CONFIGS / "finetune10_ag_news.yaml"
DATA = "ag_news"
ENCODERS = {  # key -> (row name, pretraining method or None, the encoder of a random-init row)
    "random": ("random init (gru)", None, ["model.name=gru", "model.embed_dim=128", "model.hidden_dim=256", "model.layers=1"]),
    # the masked language model's encoder (configs/mlm_ag_news.yaml), untrained
    "random_transformer": (
        "random init (transformer)",
        None,
        ["model.name=transformer", "model.width=256", "model.layers=2", "model.heads=4", "model.dropout=0.1"],
    ),
    "simclr": ("contrastive, gru (no labels)", "simclr", []),
    "mlm": ("masked language model, transformer (no labels)", "mlm", []),
}
CLASSIC = "TF-IDF (1-2 grams) + logistic regression"
UNLABELED_UNUSED = ("10", "100", "all")  # the classic baseline's columns: it learns from labelled articles only
LABELS_ONLY = ["finetune.unlabeled.weight=0"]
ALL_LABELS = ["data.labels_per_class=null", "finetune.unlabeled.weight=0", "data.batch_size=128", "train.max_steps=1500"]
COLUMNS = {  # column -> (labels per class or None for all, overrides)
    "10": (10, LABELS_ONLY),
    "10+u": (10, []),
    "100": (100, LABELS_ONLY),
    "100+u": (100, []),
    "all": (None, ALL_LABELS),
}
QUICK = ["train.max_steps=3", "data.eval_batch_size=256"]


def overrides_of(column: str, seed: int, extra: list[str]) -> list[str]:
    return [*column_overrides(COLUMNS, column), f"data.seed={seed}", *extra]


def classic_accuracy(column: str, seed: int, extra: list[str]) -> dict[str, Any]:
    """TF-IDF + logistic regression, fitted on exactly the labelled articles the fine-tunes get."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    cfg = load_config(FINETUNE, [*ENCODERS["random"][2], *overrides_of(column, seed, extra)])  # a model to name; it reads none
    train = load_training_data(cfg.data, labelled_subset=True).train
    test = load_split(cfg.data, train=False)
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1), LogisticRegression(max_iter=2000, C=10.0))
    model.fit(list(train.texts), train.targets.numpy())
    return {"accuracy": float(model.score(list(test.texts), test.targets.numpy()))}


def pretrained(method: str | None, cells: Cells, runs: Path, extra: list[str]) -> dict[str, Any]:
    if method is None:
        return {"source": None, "seconds": 0.0}
    config = CONFIGS / f"{method}_{DATA}.yaml"
    cell = cells.get(
        f"pretrain/{method}/{DATA}/{recipe_digest(config, extra)}", lambda: {"run": str(pretrain(config, extra, runs_dir=runs).run_dir)}
    )
    return {"source": cell["run"], "seconds": cell["seconds"]}


def rows_of(encoders: list[str], seeds: list[int], cells: Cells, runs: Path, extra: list[str]) -> list[dict[str, Any]]:
    rows = []
    for key in encoders:
        name, method, random_encoder = ENCODERS[key]
        source = pretrained(method, cells, runs, extra)
        options = random_encoder if source["source"] is None else []

        def measure(column: str, seed: int, source=source["source"], options=options) -> dict[str, Any]:
            return tuned_accuracy(source, FINETUNE, [*options, *overrides_of(column, seed, extra)], runs)

        tag = f"{DATA}/{key}/{recipe_digest(FINETUNE, [*options, *extra], source['source'])}"
        rows.append(measure_row(name, measure, source["seconds"], seeds, cells, tag, budgets_of(COLUMNS, tuple(COLUMNS)), split=DATA))
    classic = lambda column, seed: classic_accuracy(column, seed, extra)
    tag = f"{DATA}/classic/{recipe_digest(FINETUNE, extra)}"
    rows.append(measure_row(CLASSIC, classic, 0.0, seeds, cells, tag, budgets_of(COLUMNS, UNLABELED_UNUSED), split=DATA))
    return rows


def markdown(rows: list[dict[str, Any]], seeds: int) -> str:
    heads = ["10/class", "10/class + unlabeled", "100/class", "100/class + unlabeled", "all labels (10,800)"]
    lines = [
        f"| encoder | pretraining (min) | {' | '.join(heads)} | row wall time (min) |",
        "| --- | --- | " + " | ".join("---" for _ in heads) + " | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['pretrain_min']:.1f} | {' | '.join(cell_text(r, c) for c in COLUMNS)} | {r['row_min']:.1f} |")
    spread = f"mean ± standard deviation over {seeds} label-subset seeds; all labels: one run"
    return "\n".join(lines) + f"\n\nTest accuracy (%) on the 7,600 test articles; {spread}."


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    mine = {r["encoder"]: r for r in rows}
    scratch_names = [name for name, method, _ in ENCODERS.values() if method is None]
    classic = mine.get(CLASSIC)
    scratch_rows = [mine[name] for name in scratch_names if name in mine]
    scratch = {c: max(r[c] for r in scratch_rows) for c in COLUMNS} if scratch_rows else None  # the best random init
    pretrained_rows = [r for name, r in mine.items() if name not in (*scratch_names, CLASSIC)]
    if not pretrained_rows:
        return []
    best = {c: max(r[c] for r in pretrained_rows) for c in COLUMNS}
    best_at = {c: max(best[c], best.get(f"{c}+u", 0.0)) for c in UNLABELED_UNUSED}
    out = []
    if classic:
        margins = {c: 100 * (best_at[c] - classic[c]) for c in UNLABELED_UNUSED}
        every = all(m > 0 for m in margins.values())
        out.append(
            f"- best pretrained vs TF-IDF + LR: {', '.join(f'{c}: {m:+.1f}' for c, m in margins.items())} points; "
            f"beats it everywhere: {'met' if every else 'NOT met'}; by >= 15 at 10/class: {'met' if margins['10'] >= 15 else 'NOT met'}"
        )
    if scratch:
        gain = 100 * (best_at["10"] - max(scratch["10"], scratch["10+u"]))
        verdict = "met" if gain >= 10 else "NOT met"
        out.append(f"- best pretrained minus the best random init at 10/class: {gain:+.1f} points (target >= +10): {verdict}")
    ten, every = 100 * best_at["10"], 100 * best["all"]
    out.append(f"- 10/class: {ten:.1f} (reach >= 80): {'met' if ten >= 80 else 'not met'}")
    out.append(f"- all labels: {every:.1f} (reach >= 90): {'met' if every >= 90 else 'not met'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="the folder with AGNews/ (else $TRANSFERCTL_DATA_DIR)")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="label-subset seeds (data.seed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "text_efficiency")
    parser.add_argument("--quick", action="store_true", help="3 steps per run: checks the plumbing, not the accuracy")
    args = parser.parse_args()

    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    cells = Cells(out / "cells.jsonl")
    extra = ([f"data.root={args.data_dir.resolve()}"] if args.data_dir else []) + (QUICK if args.quick else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells in {cells.path}", flush=True)
    rows = rows_of(args.encoders, args.seeds, cells, out / "runs", extra)
    table, summary = markdown(rows, len(args.seeds)), "\n".join(target_lines(rows))
    (out / "table.md").write_text(table + "\n\n" + summary + "\n")
    print(table + "\n\n" + summary)


if __name__ == "__main__":
    main()
