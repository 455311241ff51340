"""Label efficiency on named entities: what pretraining on unlabeled news buys CoNLL-2003 when labelled sentences are few.

Rows: random init (`gru`, `transformer`); the `transformer` pretrained by masked language modelling or by
replaced-token detection (ELECTRA; also reading each sentence with its document's neighbouring words:
`electra_in_context`), and the
`gru` pretrained contrastively, all without labels on cased news (AG News training articles plus the CoNLL-2003
training sentences' words: the corpus this script writes); and a classic baseline, a CRF over hand-made word
features (sklearn-crfsuite: case, shape, prefixes, suffixes, the neighbours' words) on the same labelled
sentences. Every neural row fine-tunes through the recipe the CLI runs (configs/ner_conll2003.yaml) on 100 and
1,000 labelled training sentences (three subset seeds: data.seed) and on all 14,041 once; each cell is the entity
F1 on the official test split (3,453 sentences), dev validating.

Cells are cached as in label_efficiency.py, so an interrupted run continues; each keeps its column's overrides (the
labelled subset and step budget in COLUMNS), and a column whose budget changed is measured again.

    python benchmarks/ner_efficiency.py --data-dir ../shared/data            # the full table
    python benchmarks/ner_efficiency.py --data-dir ../shared/data --quick    # a smoke test
    python benchmarks/ner_efficiency.py --data-dir ../shared/data --write-corpus DIR   # only the pretraining corpus
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audio_efficiency import cell_text, measure_row
from label_efficiency import Cells, recipe_digest

from transferctl.config import load_config
from transferctl.data import load_split, load_training_data
from transferctl.data.tagging import read_conll
from transferctl.recipes import evaluate, finetune, pretrain
from transferctl.tasks.token_classification import entity_scores

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FINETUNE = CONFIGS / "ner_conll2003.yaml"
CASED = ["data.tokenizer.lowercase=false", "data.tokenizer.max_length=128", "data.tokenizer.vocab_size=10000"]
PRETRAINING = {  # method -> (recipe, overrides beyond data.root=<corpus>)
    "mlm": (CONFIGS / "mlm_news_cased.yaml", []),
    "electra": (CONFIGS / "electra_news_cased.yaml", []),
    # the AG News contrastive recipe's gru, on the cased corpus (5 epochs: about the masked model's time)
    "simclr": (CONFIGS / "simclr_ag_news.yaml", ["data.name=text_csv", "data.label_column=null", *CASED, "train.epochs=5"]),
}
# a pretraining that goes on from another's run: its encoder's weights and its tokenizer (the row's pretraining time
# is both runs')
CONTINUES = {"electra": "mlm"}
GRU = ["model.name=gru", "model.embed_dim=128", "model.hidden_dim=256", "model.layers=1"]  # simclr_ag_news.yaml's encoder
ENCODERS = {  # key -> (row name, pretraining method or None, the row's fine-tune overrides: a random init's encoder)
    "random_gru": ("random init (gru)", None, GRU),
    "random_transformer": ("random init (transformer)", None, []),  # the recipe's transformer: the masked model's
    "simclr": ("contrastive, gru (no labels)", "simclr", []),
    "mlm": ("masked language model, transformer (no labels)", "mlm", []),
    "electra": ("replaced-token detection (ELECTRA), transformer (no labels)", "electra", []),
    # ELECTRA's encoder reading each sentence with its document's neighbouring words (FLERT), untagged: 32 tokens a
    # side, half FLERT's 64, which would double the fine-tunes' time on a CPU
    "electra_in_context": ("ELECTRA, transformer, reading document context (no labels)", "electra", ["data.document_context=32"]),
}
CLASSIC = "CRF over word features (sklearn-crfsuite)"
# column -> overrides: a labelled subset and its step budget (about 80 to 100 passes over the labelled sentences: on the
# dev split 600 steps at 1,000 sentences stopped well short of where longer fine-tunes level off), validating a few times
COLUMNS = {
    "100": ["data.labeled_samples=100", "train.max_steps=300", "train.epochs=1000", "train.val_every=25"],
    "1000": ["data.labeled_samples=1000", "train.max_steps=2400", "train.epochs=1000", "train.val_every=5"],
    "all": [],
}
QUICK = ["train.max_steps=3", "train.epochs=1", "data.eval_batch_size=256"]


# --------------------------------------------------------------------------- the pretraining corpus


def conll_sentences(path: Path) -> list[str]:
    return [" ".join(words) for words in read_conll("conll2003", path).words]


def write_corpus(data_dir: Path, out: Path) -> Path:
    """train.csv: the AG News training articles and the CoNLL-2003 training sentences' words; test.csv: the CoNLL dev
    sentences (the masked model's held-out score). No labels, no test sentence."""
    with (data_dir / "AGNews" / "train.csv").open(newline="", encoding="utf-8") as f:
        articles = [row["text"] for row in csv.DictReader(f)]
    splits = {
        "train.csv": articles + conll_sentences(data_dir / "CoNLL2003" / "train.txt"),
        "test.csv": conll_sentences(data_dir / "CoNLL2003" / "dev.txt"),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, texts in splits.items():
        with (out / name).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text"])
            writer.writerows([text] for text in texts)
    return out


# --------------------------------------------------------------------------- cells


def pretrained(method: str | None, cells: Cells, runs: Path, corpus: Path, extra: list[str]) -> dict[str, Any]:
    if method is None:
        return {"source": None, "seconds": 0.0}
    config, options = PRETRAINING[method]
    overrides = [f"data.root={corpus}", *options, *[e for e in extra if not e.startswith("data.root=")]]
    before = {"seconds": 0.0}
    if method in CONTINUES:
        before = pretrained(CONTINUES[method], cells, runs, corpus, extra)
        start = Path(before["source"])
        overrides += [f"model.weights={start / 'checkpoints' / 'last.pt'}", f"data.tokenizer.path={start / 'tokenizer.json'}"]
    cell = cells.get(
        f"pretrain/{method}/news_cased/{recipe_digest(config, overrides)}",
        lambda: {"run": str(pretrain(config, overrides, runs_dir=runs).run_dir)},
        usable=lambda row: Path(row["run"]).is_dir(),
    )
    return {"source": cell["run"], "seconds": before["seconds"] + cell["seconds"]}


def tuned_f1(source: str | None, overrides: list[str], runs: Path) -> dict[str, Any]:
    tuned = finetune(source, FINETUNE, overrides, runs_dir=runs)
    tested = evaluate(str(tuned.run_dir), runs_dir=runs)
    return {"f1": tested.metrics["entity_f1"], "run": str(tuned.run_dir)}


def word_features(words: tuple[str, ...], i: int) -> dict[str, Any]:
    """The classic feature set of a word (sklearn-crfsuite's tutorial, with word shapes): its lowercased form,
    suffixes and prefixes, case and digit flags, shape, and the same for its neighbours."""

    def of(word: str, at: str) -> dict[str, Any]:
        shape = "".join("X" if c.isupper() else "x" if c.islower() else "d" if c.isdigit() else c for c in word)
        return {
            f"{at}lower": word.lower(),
            f"{at}suffix3": word[-3:],
            f"{at}suffix2": word[-2:],
            f"{at}prefix3": word[:3],
            f"{at}title": word.istitle(),
            f"{at}upper": word.isupper(),
            f"{at}digit": word.isdigit(),
            f"{at}shape": shape[:6],
        }

    features = {"bias": 1.0, **of(words[i], "")}
    for offset in (-2, -1, 1, 2):
        j = i + offset
        features.update(of(words[j], f"{offset}:") if 0 <= j < len(words) else {f"{offset}:edge": True})
    return features


def classic_f1(column: str, seed: int, extra: list[str]) -> dict[str, Any]:
    """A CRF over word features, fitted on exactly the labelled sentences the fine-tunes get."""
    import sklearn_crfsuite

    cfg = load_config(FINETUNE, [*COLUMNS[column], f"data.seed={seed}", *extra])
    train, test = load_training_data(cfg.data, labelled_subset=True).train, load_split(cfg.data, train=False)
    tags = list(train.classes)

    def features(data) -> list[list[dict[str, Any]]]:
        sentences = [getattr(text, "words", text) for text in data.texts]  # a sentence read in context: its own words
        return [[word_features(words, i) for i in range(len(words))] for words in sentences]

    model = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=0.1, c2=0.1, max_iterations=100 if "train.max_steps=3" not in extra else 3)
    model.fit(features(train), [[tags[i] for i in t.tolist()] for t in train.targets])
    truth = [[tags[i] for i in t.tolist()] for t in test.targets]
    return {"f1": entity_scores(truth, model.predict(features(test)))["entity_f1"]}


def rows_of(
    encoders: list[str],
    seeds: list[int],
    cells: Cells,
    runs: Path,
    corpus: Path,
    extra: list[str],
    columns: list[str],
    classic: bool,
    pretraining_extra: list[str],
) -> list[dict[str, Any]]:
    rows, budgets = [], {column: COLUMNS[column] for column in columns}
    for key in encoders:
        name, method, options = ENCODERS[key]
        source = pretrained(method, cells, runs, corpus, pretraining_extra)

        def measure(column: str, seed: int, source=source["source"], options=options) -> dict[str, Any]:
            return tuned_f1(source, [*options, *COLUMNS[column], f"data.seed={seed}", *extra], runs)

        tag = f"conll2003/{key}/{recipe_digest(FINETUNE, [*options, *extra], source['source'])}"
        rows.append(measure_row(name, measure, source["seconds"], seeds, cells, tag, budgets, metric="f1"))
    if classic:
        fit = lambda column, seed: classic_f1(column, seed, extra)
        tag = f"conll2003/classic/{recipe_digest(FINETUNE, extra)}"
        rows.append(measure_row(CLASSIC, fit, 0.0, seeds, cells, tag, budgets, metric="f1"))
    return rows


# --------------------------------------------------------------------------- the table


def markdown(rows: list[dict[str, Any]], seeds: int) -> str:
    lines = [
        "| encoder | pretraining (min) | 100 sentences | 1,000 sentences | all 14,041 | row wall time (min) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['pretrain_min']:.1f} | {' | '.join(cell_text(r, c) for c in COLUMNS)} | {r['row_min']:.1f} |")
    spread = f"mean ± standard deviation over {seeds} labelled-subset seeds; all labels: one run"
    return "\n".join(lines) + f"\n\nEntity F1 (%) on the CoNLL-2003 test split (3,453 sentences); {spread}."


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    mine = {r["encoder"]: r for r in rows}
    scratch = [mine[n] for n, method, _ in ENCODERS.values() if method is None and n in mine]
    pretrained_rows = [mine[n] for n, method, _ in ENCODERS.values() if method is not None and n in mine]
    if not pretrained_rows or not all(c in r for r in rows for c in COLUMNS):
        return []
    best = {c: max(r[c] for r in pretrained_rows) for c in COLUMNS}
    everything = max([best["all"], *(r["all"] for r in scratch)])
    out = [f"- all labels, best row: {100 * everything:.1f} F1 (must >= 80, reach 85): {'met' if everything >= 0.8 else 'NOT met'}"]
    if scratch:
        gain = 100 * (best["1000"] - max(r["1000"] for r in scratch))
        verdict = "met" if gain >= 10 else "NOT met"
        out.append(f"- 1,000 sentences, best pretrained minus the best random init: {gain:+.1f} (must >= +10): {verdict}")
    classic = mine.get(CLASSIC)
    if classic:
        margins = {c: 100 * (best[c] - classic[c]) for c in COLUMNS}
        must = "met" if margins["100"] > 0 and margins["1000"] > 0 else "NOT met"
        reach = "met" if margins["all"] > 0 else "not met"
        out.append(
            f"- best pretrained minus the CRF: {', '.join(f'{c}: {m:+.1f}' for c, m in margins.items())}; "
            f"beats it at 100 and 1,000 (must): {must}; with all labels (reach): {reach}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the folder with CoNLL2003/ and AGNews/")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="labelled-subset seeds (data.seed)")
    parser.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=list(COLUMNS), help="labelled-sentence budgets")
    parser.add_argument("--no-classic", action="store_true", help="leave out the CRF baseline's row")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ner_efficiency")
    parser.add_argument("--write-corpus", type=Path, help="write the pretraining corpus to this folder and stop")
    parser.add_argument("--quick", action="store_true", help="3 steps per run: checks the plumbing, not the scores")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of every fine-tune (head.crf=false)")
    args = parser.parse_args()

    data_dir = args.data_dir.resolve()
    if args.write_corpus:
        print(f"corpus: {write_corpus(data_dir, args.write_corpus.resolve())}")
        return
    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus"
    if not (corpus / "train.csv").is_file():  # written once: a rewrite would change the files the pretraining cells read
        write_corpus(data_dir, corpus)
    cells = Cells(out / "cells.jsonl")
    quick = QUICK if args.quick else []
    extra = [f"data.root={data_dir}", *args.set, *quick]  # every fine-tune's; --set reaches no pretraining
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells in {cells.path}", flush=True)
    rows = rows_of(args.encoders, args.seeds, cells, out / "runs", corpus, extra, args.columns, not args.no_classic, quick)
    table, summary = markdown(rows, len(args.seeds)), "\n".join(target_lines(rows))
    (out / f"table-{'-'.join(args.encoders)}.md").write_text(table + "\n\n" + summary + "\n")
    print(table + "\n\n" + summary)


if __name__ == "__main__":
    main()
