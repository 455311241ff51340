"""Label efficiency on audio: what pretraining buys on real spoken digits (FSDD) when labels are few.

For each split (`official`: takes 0-4 of every speaker are the test set; `speakers`: george and lucas are held
out, and pretraining never hears them) and each encoder (random init; SimCLR and a masked autoencoder pretrained
on the split's training clips without labels), it fine-tunes through the recipes the CLI runs
(configs/finetune10_fsdd.yaml) on 5 and 10 labelled clips per digit, with the labels alone and with the other
training clips as unlabeled data (pseudo-labels), and on all labels; mean and spread over label-subset seeds
(data.seed). The classic baseline is a time-pooled log-spectrogram with logistic regression (scikit-learn), on the
same labelled subsets.

Cells are cached as in label_efficiency.py (same cache format and digests), so an interrupted run continues.

    python benchmarks/audio_efficiency.py --data-dir ../shared/data            # the full table
    python benchmarks/audio_efficiency.py --data-dir ../shared/data --quick    # a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_efficiency import Cells, recipe_digest, tuned_accuracy

from transferctl.config import load_config
from transferctl.data import load_split, load_training_data
from transferctl.modalities.audio import decode
from transferctl.recipes import pretrain

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FINETUNE = CONFIGS / "finetune10_fsdd.yaml"
SPLITS = {"official": ["data.split=official"], "speakers": ["data.split=speakers", "data.test_speakers=[george,lucas]"]}
RANDOM_ENCODER = ["model.name=conv1d"]  # the random-init row: the SimCLR recipe's encoder, untrained
ENCODERS = {
    "random": ("random init (conv1d)", None),
    "simclr": ("SimCLR, conv1d (no labels)", "simclr"),
    "autoencoder": ("masked autoencoder, cnn (no labels)", "autoencoder"),
}
CLASSIC = "log-spectrogram + logistic regression"
UNLABELED_UNUSED = ("5", "10", "all")  # the classic baseline's columns: it learns from labelled clips only
LABELS_ONLY = ["finetune.unlabeled.weight=0"]
ALL_LABELS = ["data.labels_per_class=null", "finetune.unlabeled.weight=0", "train.max_steps=1000"]
COLUMNS = {  # column -> (labels per class or None for all, overrides)
    "5": (5, LABELS_ONLY),
    "5+u": (5, []),
    "10": (10, LABELS_ONLY),
    "10+u": (10, []),
    "all": (None, ALL_LABELS),
}
QUICK = ["train.max_steps=3", "data.eval_batch_size=256"]


def column_overrides(columns: dict[str, tuple[int | None, list[str]]], column: str) -> list[str]:
    """A column's labelled subset and budget (`columns`: column -> (labels per class or None for all, overrides)): what
    its cells are kept with."""
    labels, options = columns[column]
    return [*([f"data.labels_per_class={labels}"] if labels else []), *options]


def overrides_of(split: str, column: str, seed: int, extra: list[str]) -> list[str]:
    return [*SPLITS[split], *column_overrides(COLUMNS, column), f"data.seed={seed}", *extra]


# --------------------------------------------------------------------------- the classic baseline


def pooled_log_spectrogram(raw: torch.Tensor, clip: int, n_fft: int = 256, hop: int = 80) -> torch.Tensor:
    """(N, n_fft // 2 + 1): each clip's log power spectrum, averaged over its frames (the clip's start, as evaluated)."""
    waveforms = torch.nn.functional.pad(decode(raw[:, :clip]), (0, max(0, clip - raw.shape[1])))
    spectrum = torch.stft(waveforms, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs().square()
    return (spectrum + 1e-6).log().mean(dim=2)


def classic_accuracy(split: str, column: str, seed: int, extra: list[str]) -> dict[str, Any]:
    """Logistic regression on pooled log-spectrograms of exactly the labelled clips the fine-tunes get."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = load_config(FINETUNE, overrides_of(split, column, seed, extra))
    train = load_training_data(cfg.data, labelled_subset=True).train
    test = load_split(cfg.data, train=False)
    clip = train.clip_samples
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0))
    model.fit(pooled_log_spectrogram(train.inputs, clip).numpy(), train.targets.numpy())
    return {"accuracy": float(model.score(pooled_log_spectrogram(test.inputs, clip).numpy(), test.targets.numpy()))}


# --------------------------------------------------------------------------- rows


def pretrained(split: str, method: str | None, cells: Cells, runs: Path, extra: list[str]) -> dict[str, Any]:
    if method is None:
        return {"source": None, "seconds": 0.0}
    config, overrides = CONFIGS / f"{method}_fsdd.yaml", [*SPLITS[split], *extra]
    cell = cells.get(
        f"pretrain/{method}/fsdd-{split}/{recipe_digest(config, overrides)}",
        lambda: {"run": str(pretrain(config, overrides, runs_dir=runs).run_dir)},
    )
    return {"source": cell["run"], "seconds": cell["seconds"]}


def measure_row(
    name: str,
    measure,
    pretrain_seconds: float,
    seeds: list[int],
    cells: Cells,
    tag: str,
    budgets: dict[str, list[str]],
    metric: str = "accuracy",
    **fields: Any,
) -> dict[str, Any]:
    """One row (with `fields`, such as its split): each column's mean and spread of the cells' `metric` over the seeds
    (all labels: the first seed), and the row's wall time. `budgets`: each column's overrides (its labelled subset and
    steps), kept with its cells: a cell measured under other overrides is measured again, not reused under the
    column's name."""
    row: dict[str, Any] = {**fields, "encoder": name, "pretrain_min": pretrain_seconds / 60, "seeds": len(seeds)}
    seconds = pretrain_seconds
    for column, budget in budgets.items():
        done = [
            cells.get(
                f"{tag}/{column}/seed{seed}",
                lambda column=column, seed=seed, budget=budget: {**measure(column, seed), "budget": budget},
                usable=lambda cell, budget=budget: cell.get("budget") == budget,
            )
            for seed in (seeds if column != "all" else seeds[:1])
        ]
        scores = [cell[metric] for cell in done]
        row[column] = statistics.mean(scores)
        row[f"{column}_sd"] = statistics.stdev(scores) if len(scores) > 1 else None
        seconds += sum(cell["seconds"] for cell in done)
    row["row_min"] = seconds / 60
    return row


def budgets_of(columns: dict[str, tuple[int | None, list[str]]], chosen: tuple[str, ...]) -> dict[str, list[str]]:
    return {column: column_overrides(columns, column) for column in chosen}


def rows_of(split: str, encoders: list[str], seeds: list[int], cells: Cells, runs: Path, extra: list[str]) -> list[dict[str, Any]]:
    rows = []
    for key in encoders:
        name, method = ENCODERS[key]
        encoder = pretrained(split, method, cells, runs, extra)
        source = encoder["source"]

        encoder_options = RANDOM_ENCODER if source is None else []

        def measure(column: str, seed: int, source=source, options=encoder_options) -> dict[str, Any]:
            return tuned_accuracy(source, FINETUNE, [*options, *overrides_of(split, column, seed, extra)], runs)

        tag = f"fsdd-{split}/{key}/{recipe_digest(FINETUNE, [*encoder_options, *extra], source)}"
        rows.append(measure_row(name, measure, encoder["seconds"], seeds, cells, tag, budgets_of(COLUMNS, tuple(COLUMNS)), split=split))
    classic = lambda column, seed: classic_accuracy(split, column, seed, extra)
    tag = f"fsdd-{split}/classic/{recipe_digest(FINETUNE, extra)}"
    rows.append(measure_row(CLASSIC, classic, 0.0, seeds, cells, tag, budgets_of(COLUMNS, UNLABELED_UNUSED), split=split))
    return rows


# --------------------------------------------------------------------------- the table


def cell_text(row: dict[str, Any], column: str) -> str:
    if column not in row:
        return "—"
    spread = row[f"{column}_sd"]
    return f"{100 * row[column]:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")


def markdown(rows: list[dict[str, Any]], seeds: int) -> str:
    heads = ["5/class", "5/class + unlabeled", "10/class", "10/class + unlabeled", "all labels"]
    lines = [
        f"| test split | encoder | pretraining (min) | {' | '.join(heads)} | row wall time (min) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in heads) + " | --- |",
    ]
    for r in rows:
        cells = " | ".join(cell_text(r, c) for c in COLUMNS)
        lines.append(f"| {r['split']} | {r['encoder']} | {r['pretrain_min']:.1f} | {cells} | {r['row_min']:.1f} |")
    return "\n".join(lines) + f"\n\nMean ± standard deviation over {seeds} label-subset seeds; all labels: one run."


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for split in SPLITS:
        mine = {r["encoder"]: r for r in rows if r["split"] == split}
        classic = mine.get(CLASSIC)
        scratch = mine.get(ENCODERS["random"][0])
        pretrained_rows = [r for name, r in mine.items() if name not in (ENCODERS["random"][0], CLASSIC)]
        if not pretrained_rows:
            continue
        best = {c: max(r[c] for r in pretrained_rows) for c in COLUMNS}
        if classic:  # its budgets are labels per class; a pretrained encoder may use the unlabeled clips too
            best_at = {c: max(best[c], best.get(f"{c}+u", 0.0)) for c in UNLABELED_UNUSED}
            beaten = [c for c in UNLABELED_UNUSED if best_at[c] > classic[c]]
            verdict = "met" if len(beaten) == len(UNLABELED_UNUSED) else f"NOT met (beaten at {', '.join(beaten) or 'none'})"
            out.append(f"- {split}: best pretrained encoder beats the classic baseline at every budget: {verdict}")
        if scratch:
            gain = 100 * (best["5"] - scratch["5"])
            verdict = "met" if gain >= 5 else "NOT met"
            out.append(f"- {split}: best pretrained minus random init at 5/class: {gain:+.1f} points (target >= +5): {verdict}")
        if split == "official":
            ten, every = 100 * max(best["10"], best["10+u"]), 100 * best["all"]
            out.append(f"- official, 10/class: {ten:.1f} (reach >= 95): {'met' if ten >= 95 else 'not met'}")
            out.append(f"- official, all labels: {every:.1f} (reach >= 99): {'met' if every >= 99 else 'not met'}")
        else:
            every = 100 * best["all"]
            out.append(f"- held-out speakers, all labels: {every:.1f} (reach >= 85): {'met' if every >= 85 else 'not met'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="the folder with FSDD/recordings (else $TRANSFERCTL_DATA_DIR)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="label-subset seeds (data.seed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "audio_efficiency")
    parser.add_argument("--quick", action="store_true", help="3 steps per run: checks the plumbing, not the accuracy")
    args = parser.parse_args()

    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    cells = Cells(out / "cells.jsonl")
    extra = ([f"data.root={args.data_dir.resolve()}"] if args.data_dir else []) + (QUICK if args.quick else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells in {cells.path}", flush=True)
    rows = [row for split in args.splits for row in rows_of(split, args.encoders, args.seeds, cells, out / "runs", extra)]
    table, summary = markdown(rows, len(args.seeds)), "\n".join(target_lines(rows))
    (out / "table.md").write_text(table + "\n\n" + summary + "\n")
    print(table + "\n\n" + summary)


if __name__ == "__main__":
    main()
