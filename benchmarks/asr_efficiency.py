"""Label efficiency in speech recognition: what pretraining without labels buys a recognizer of digit strings when
transcribed utterances are few.

Rows: the recipe's `conv1d` from random init, the same encoder pretrained by SimCLR on FSDD's single training
recordings (configs/simclr_fsdd.yaml: no label used; for the held-out-speaker split, pretrained on the other speakers'
recordings only), and pretrained by masked frame modelling on the training utterances without their transcripts
(configs/masked_frames_fsdd_sequences.yaml). Every row fine-tunes through the recipe the CLI runs (configs/asr_fsdd_sequences.yaml: CTC over
words, greedy decoding) on 50 and 500 labelled training utterances (three subset seeds: data.seed) and on all 2,000
once; each cell is the word error rate on the test split's 500 utterances (a tenth of the training utterances
validating). Two splits: `official` (test utterances made of takes 0-4, training of takes 5-49, every speaker in
both) and `speakers` (test utterances spoken by george and lucas alone, who are in no training utterance).

Cells are cached as in label_efficiency.py, so an interrupted run continues.

    python benchmarks/asr_efficiency.py --data-dir ../shared/data            # the full table
    python benchmarks/asr_efficiency.py --data-dir ../shared/data --quick    # a smoke test
    python benchmarks/asr_efficiency.py --data-dir ../shared/data --set train.precision=32   # fine-tunes in float32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audio_efficiency import cell_text, measure_row
from label_efficiency import Cells, recipe_digest

from transferctl.recipes import evaluate, finetune, pretrain

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FINETUNE = CONFIGS / "asr_fsdd_sequences.yaml"
PRETRAINING = {  # encoder -> the recipe that pretrains it, without labels
    "simclr": CONFIGS / "simclr_fsdd.yaml",
    "masked_frames": CONFIGS / "masked_frames_fsdd_sequences.yaml",
}
ENCODERS = {
    "random": "random init (conv1d)",
    "simclr": "SimCLR on single digits, conv1d (no labels)",
    "masked_frames": "masked frames on utterances, conv1d (no transcripts)",
}
COLUMNS = {  # column -> overrides: a labelled subset and its step budget, validating a few times
    "50": ["data.labeled_samples=50", "train.max_steps=200", "train.epochs=1000", "train.val_every=25"],
    "500": ["data.labeled_samples=500", "train.max_steps=400", "train.epochs=1000", "train.val_every=5"],
    "all": [],
}
HEADS = {"50": "50 utterances", "500": "500 utterances", "all": "all 2,000"}
QUICK = ["train.max_steps=3", "train.epochs=1", "data.train_utterances=600", "data.test_utterances=50"]
QUICK_PRETRAIN = ["train.max_steps=3", "train.epochs=1"]


def pretrained(key: str, split: str, cells: Cells, runs: Path, extra: list[str]) -> dict[str, Any]:
    if key == "random":
        return {"source": None, "seconds": 0.0}
    recipe, overrides = PRETRAINING[key], [f"data.split={split}", *extra]
    cell = cells.get(
        f"pretrain/{key}/{split}/{recipe_digest(recipe, overrides)}",
        lambda: {"run": str(pretrain(recipe, overrides, runs_dir=runs).run_dir)},
        usable=lambda row: Path(row["run"]).is_dir(),
    )
    return {"source": cell["run"], "seconds": cell["seconds"]}


def tuned_wer(source: str | None, overrides: list[str], runs: Path) -> dict[str, Any]:
    tuned = finetune(source, FINETUNE, overrides, runs_dir=runs)
    tested = evaluate(str(tuned.run_dir), runs_dir=runs)
    return {"wer": tested.metrics["wer"], "cer": tested.metrics["cer"], "run": str(tuned.run_dir)}


def rows_of(
    encoders: list[str], splits: dict[str, list[int]], cells: Cells, runs: Path, extra: list[str], columns: list[str], quick: bool
) -> list[dict[str, Any]]:
    rows = []
    for split, seeds in splits.items():
        for key in encoders:
            roots = [e for e in extra if e.startswith("data.root=")]
            source = pretrained(key, split, cells, runs, roots + (QUICK_PRETRAIN if quick else []))

            def measure(column: str, seed: int, source=source["source"], split=split) -> dict[str, Any]:
                return tuned_wer(source, [f"data.split={split}", *COLUMNS[column], f"data.seed={seed}", *extra], runs)

            tag = f"asr/{split}/{key}/{recipe_digest(FINETUNE, [f'data.split={split}', *extra], source['source'])}"
            budgets = {column: COLUMNS[column] for column in columns}
            row = measure_row(ENCODERS[key], measure, source["seconds"], seeds, cells, tag, budgets, metric="wer")
            rows.append({"split": split, **row})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"| test split | encoder | pretraining (min) | {' | '.join(HEADS.values())} | row wall time (min) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = " | ".join(cell_text(r, c) for c in COLUMNS)
        lines.append(f"| {r['split']} | {r['encoder']} | {r['pretrain_min']:.1f} | {cells} | {r['row_min']:.1f} |")
    seeds = ", ".join(sorted({f"{r['split']}: {r['seeds']}" for r in rows}))
    return "\n".join(lines) + (
        f"\n\nWord error rate (%) on the test split's 500 utterances, lower is better; mean ± standard deviation over the "
        f"labelled-subset seeds ({seeds}); all labels: one run."
    )


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    official = {r["encoder"]: r for r in rows if r["split"] == "official"}
    out = []
    if all("all" in r for r in official.values()) and official:
        best = min(r["all"] for r in official.values())
        verdict = "met (reach 2%: " + ("met)" if best <= 0.02 else "not met)") if best <= 0.05 else "NOT met"
        out.append(f"- official split, all labels, best row: {100 * best:.1f}% WER (must <= 5%): {verdict}")
    random, pretrained_rows = official.get(ENCODERS["random"]), [r for n, r in official.items() if n != ENCODERS["random"]]
    if random and pretrained_rows and "50" in random:
        gain = 100 * (random["50"] - min(r["50"] for r in pretrained_rows))
        out.append(
            f"- 50 utterances, random init minus the best pretrained: {gain:+.1f} WER points (must >= +10): "
            + ("met" if gain >= 10 else "NOT met")
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the folder with FSDD/")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="labelled-subset seeds of the official split")
    parser.add_argument("--speaker-seeds", nargs="+", type=int, default=[0], help="labelled-subset seeds of the speakers split")
    parser.add_argument("--splits", nargs="+", default=["official", "speakers"], choices=["official", "speakers"])
    parser.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=list(COLUMNS), help="labelled-utterance budgets")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "asr_efficiency")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of every fine-tune (recorded in its cells' keys)"
    )
    parser.add_argument("--quick", action="store_true", help="3 steps per run: checks the plumbing, not the scores")
    args = parser.parse_args()

    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    cells = Cells(out / "cells.jsonl")
    extra = [f"data.root={args.data_dir.resolve()}", *args.set, *(QUICK if args.quick else [])]
    splits = {split: args.seeds if split == "official" else args.speaker_seeds for split in args.splits}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells in {cells.path}", flush=True)
    rows = rows_of(args.encoders, splits, cells, out / "runs", extra, args.columns, args.quick)
    table, summary = markdown(rows), "\n".join(target_lines(rows))
    (out / "table.md").write_text(table + "\n\n" + summary + "\n")
    print(table + "\n\n" + summary)


if __name__ == "__main__":
    main()
