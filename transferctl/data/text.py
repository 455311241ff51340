"""Text data sets: `ag_news` (AG's News topics) and `text_csv`, the user's own CSV or JSONL files.

A split is read once: its texts, its labels (names or integers), then its ids through the run's tokenizer
(`data.tokenizer`). Without `data.tokenizer.path` a WordPiece or BPE tokenizer is trained on the training
split's texts, the same one for both splits, and kept in the cache with the tokenized splits (keyed by the
files and the tokenizer), so the next run with the same data and options reads both from disk. Bad rows are
one-line errors that name the file and the row or column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from transferctl.data import label_sets as label_set
from transferctl.data.datasets import cached_decoding, default_cache_dir, missing_data
from transferctl.errors import UsageError
from transferctl.fileio import atomic_write_bytes
from transferctl.modalities.text import MASK_TOKENS, PAD_TOKENS, UNK_TOKENS, TextData, Tokenization, tokenization_of, tokenizers
from transferctl.registry import DATASETS

SPECIAL_TOKENS = [PAD_TOKENS[0], UNK_TOKENS[0], "[CLS]", "[SEP]", MASK_TOKENS[0]]
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")  # what a Hugging Face tokenizer folder holds
TEXT_SUFFIXES = (".csv", ".jsonl")
SENTENCE_WORDS = "tokens"  # a JSONL row's field that gives a sentence as its words (Hugging Face's tagged layout)


class TokenizerOptions(BaseModel):
    """`data.tokenizer`: the tokenizer trained on the training texts, or the one at `path`, and the ids' length."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["wordpiece", "bpe"] = "wordpiece"
    vocab_size: Annotated[int, Field(ge=100, le=500_000)] = 8000
    lowercase: bool = True
    max_length: Annotated[int, Field(ge=4, le=8192)] = 64
    truncation: Literal["right", "left"] = "right"
    path: str | None = None  # a tokenizer.json, or a Hugging Face tokenizer folder

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Stored absolute, so the run's config finds it from anywhere."""
        return str(Path(value).expanduser().resolve()) if value else None


DEFAULT_TOKENIZER = TokenizerOptions()


@dataclass(frozen=True)
class TextRows:
    """A file's texts and their labels as written (None where the file has no label column)."""

    path: Path
    texts: list[str]
    labels: list[str] | None
    lines: list[int]  # each row's line in the file, for messages


# --------------------------------------------------------------------------- reading files


def read_rows(
    name: str, path: Path, text_columns: list[str], label_column: str | None, drop_empty: bool, empty_label: bool = False
) -> TextRows:
    """A CSV (with a header) or JSONL file's texts (the text columns joined by a space) and labels (`empty_label`: an
    empty one is a label too, the empty set of a multi-label row)."""
    if not path.is_file():
        raise UsageError(f"data set '{name}': no file {path}; point data.train_file / data.test_file at a CSV or JSONL file")
    try:
        content = path.read_bytes().decode("utf-8-sig")  # a byte-order mark (Excel's CSV) is not part of the header
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UsageError(f"data set '{name}': {path} line {line} is not UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    records = file_records(path, content, f"data set '{name}': ")
    texts, labels, lines = [], [] if label_column else None, []
    for line, record in records:
        for column in [*text_columns, *([label_column] if label_column else [])]:
            if column not in record:
                columns = ", ".join(record) or "none"
                raise UsageError(
                    f"data set '{name}': {path} line {line} has no column '{column}' (columns: {columns}); "
                    f"set data.text_columns / data.label_column"
                )
        text = " ".join(_field(record[c]) for c in text_columns).strip()
        if not text:
            if drop_empty:
                continue
            raise UsageError(f"data set '{name}': {path} line {line} has an empty text; fill it, drop the row, or set data.drop_empty=true")
        texts.append(text)
        lines.append(line)
        if labels is not None:
            label = _field(record[label_column])
            if not label and not empty_label:
                raise UsageError(f"data set '{name}': {path} line {line} has no label; fill it or drop the row")
            labels.append(label)
    if not texts:
        raise UsageError(f"data set '{name}': {path} holds no texts; give a file with a header row and at least one row")
    return TextRows(path, texts, labels, lines)


def file_records(path: Path, content: str, where: str = "") -> list[tuple[int, dict[str, str]]]:
    """(line, record) of each row of a CSV (with a header) or JSONL file's `content`; `where` begins every message."""
    return _jsonl_records(where, path, content) if path.suffix.lower() == ".jsonl" else _csv_records(where, path, content)


def texts_of(path: Path, text_columns: list[str]) -> list[tuple[int, str | tuple[str, ...]]]:
    """(line, text) of each row of a CSV or JSONL file that has one (its text columns joined by a space, as the text
    data sets join them), or of each non-empty line of any other text file: what predict reads texts from. A JSONL
    row whose text column, or else whose `tokens` field, holds a list of strings is a sentence given as its words
    (Hugging Face's layout for tagged sentences)."""
    try:
        content = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror})") from None
    if path.suffix.lower() not in (".csv", ".jsonl"):
        return [(line, text.strip()) for line, text in enumerate(content.splitlines(), start=1) if text.strip()]
    texts = []
    for line, record in file_records(path, content):
        words = _words_of(record, text_columns)
        if words is not None:
            if words:
                texts.append((line, words))
            continue
        missing = [c for c in text_columns if c not in record]
        if missing:
            columns = ", ".join(record) or "none"
            raise UsageError(f"{path} line {line} has no column '{missing[0]}', the model's texts are read from (columns: {columns})")
        text = " ".join(_field(record[c]) for c in text_columns).strip()
        if text:
            texts.append((line, text))
    return texts


def _words_of(record: dict, text_columns: list[str]) -> tuple[str, ...] | None:
    """A JSONL row's sentence given as words: its one text column's, or its `tokens` field's list of strings."""
    for column in ([text_columns[0]] if len(text_columns) == 1 else []) + ([SENTENCE_WORDS] if not set(text_columns) & set(record) else []):
        value = record.get(column)
        if isinstance(value, list) and all(isinstance(word, str) for word in value):
            return tuple(value)
    return None


def _field(value: object) -> str:
    """A CSV or JSON field as text: JSON numbers as written, null as empty."""
    return "" if value is None else str(value).strip()


def _csv_records(where: str, path: Path, content: str) -> list[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(content, newline=""), strict=True)
    records = []
    try:
        for row in reader:
            if None in row or None in row.values():  # more or fewer fields than the header names
                more = "more" if None in row else "fewer"
                raise UsageError(f"{where}{path} line {reader.line_num} has {more} fields than the header; quote texts that hold commas")
            records.append((reader.line_num, row))
    except csv.Error as exc:
        raise UsageError(f"{where}{path} line {reader.line_num} is not valid CSV ({exc}); fix the quoting") from None
    if reader.fieldnames is None:
        raise UsageError(f"{where}{path} is empty; give a CSV file with a header row")
    return records


def _jsonl_records(where: str, path: Path, content: str) -> list[tuple[int, dict[str, str]]]:
    records = []
    for line, text in enumerate(content.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}{path} line {line} is not JSON ({exc.msg}); write one JSON object a line") from None
        if not isinstance(record, dict):
            raise UsageError(f"{where}{path} line {line} is not a JSON object; write one object a line")
        records.append((line, record))
    return records


def class_index(name: str, rows: TextRows, classes: tuple[str, ...], label_base: int | None) -> torch.Tensor:
    """Each row's label as a class index: a class name, or an integer counted from `label_base` (AG News: 1)."""
    assert rows.labels is not None
    lookup = {c: i for i, c in enumerate(classes)}
    if label_base is not None:
        lookup.update({str(i + label_base): i for i in range(len(classes))})
    indices = []
    for line, label in zip(rows.lines, rows.labels, strict=True):
        if label not in lookup:
            raise UsageError(
                f"data set '{name}': {rows.path} line {line} has label '{label}', which is not among the classes "
                f"({', '.join(classes)}); fix the label or the classes"
            )
        indices.append(lookup[label])
    return torch.tensor(indices, dtype=torch.long)


# --------------------------------------------------------------------------- tokenizers


def tokenization_for(name: str, options: TokenizerOptions, train_texts: list[str]) -> Tokenization:
    """The tokenizer at `options.path`, or one trained on the training texts (kept in the cache)."""
    if options.path:
        return Tokenization(read_tokenizer(Path(options.path).expanduser()), options.max_length, options.truncation)
    key = hashlib.sha256(json.dumps(options.model_dump(), sort_keys=True).encode())
    for text in train_texts:
        key.update(text.encode())
        key.update(b"\0")
    cache = default_cache_dir() / "tokenizers" / f"{key.hexdigest()[:32]}.json"
    if cache.is_file():
        return Tokenization(cache.read_text(), options.max_length, options.truncation)
    trained = train_tokenizer(train_texts, options)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, trained.encode())
    return Tokenization(trained, options.max_length, options.truncation)


def train_tokenizer(texts: list[str], options: TokenizerOptions) -> str:
    """A WordPiece or BPE tokenizer (BERT's normalization and pre-tokenization, [CLS] text [SEP]) trained on
    `texts`, as its JSON."""
    tk = tokenizers()
    if options.kind == "wordpiece":
        tokenizer = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
        trainer = tk.trainers.WordPieceTrainer(vocab_size=options.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
        tokenizer.decoder = tk.decoders.WordPiece()
    else:
        tokenizer = tk.Tokenizer(tk.models.BPE(unk_token="[UNK]"))
        trainer = tk.trainers.BpeTrainer(vocab_size=options.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
        tokenizer.decoder = tk.decoders.BPEDecoder()
    tokenizer.normalizer = tk.normalizers.BertNormalizer(lowercase=options.lowercase)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = tk.processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer.to_str()


def read_tokenizer(path: Path) -> str:
    """The JSON of a tokenizer.json file, or of a Hugging Face tokenizer folder (its tokenizer.json, else what
    `transformers` builds from its vocabulary files)."""
    where = f"data.tokenizer.path {path}"
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        else:
            return _converted_tokenizer(path, where)
    if not path.is_file():
        raise UsageError(f"{where}: no such file or folder; give a tokenizer.json or a Hugging Face tokenizer folder")
    try:
        content = path.read_text(encoding="utf-8")
        tokenizers().Tokenizer.from_str(content)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise UsageError(f"{where}: not a tokenizers JSON file ({' '.join(str(exc).split())[:120]}); give a tokenizer.json") from None
    return content


def _converted_tokenizer(folder: Path, where: str) -> str:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError(
            f'{where}: the folder has no tokenizer.json; reading its vocabulary needs transformers: pip install "transferctl[hf]"'
        ) from None
    if not any((folder / name).is_file() for name in VOCABULARY_FILES) and not any(folder.glob("*.model")):
        raise UsageError(f"{where}: the folder holds no tokenizer ({', '.join(VOCABULARY_FILES)} or a .model file); give a tokenizer.json")
    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True).backend_tokenizer.to_str()
    except Exception as exc:  # transformers raises many types for foreign folders
        raise UsageError(f"{where}: not a Hugging Face tokenizer folder ({' '.join(str(exc).split())[:120]})") from None


def tokenized_split(
    rows: TextRows,
    tokenization: Tokenization,
    targets: torch.Tensor,
    classes: tuple[str, ...],
    path: str | None = None,
    target_kind: str = "class",
) -> TextData:
    """A split's rows as TextData; the ids are kept in the cache, keyed by the file and the tokenization."""
    texts = hashlib.sha256("\0".join(rows.texts).encode()).hexdigest()[:16]  # the columns and rows read, not only the file
    encoded = cached_decoding(
        [rows.path],
        f"text:{tokenization.digest}:{texts}",
        lambda: dict(zip(("ids", "cut"), tokenization.encode(rows.texts), strict=True)),
    )
    return TextData(
        encoded["ids"],
        targets,
        classes,
        texts=tuple(rows.texts),
        tokenization=tokenization,
        cut=encoded["cut"],
        tokenizer_path=path,
        target_kind=target_kind,
    )


# --------------------------------------------------------------------------- data sets


def text_split(
    name: str,
    train: bool,
    files: tuple[Path, Path],
    text_columns: list[str],
    label_column: str | None,
    classes: tuple[str, ...] | None,
    tokenizer: dict,
    drop_empty: bool = False,
    label_base: int | None = None,
    fitted: dict | None = None,
    label_sets: bool = False,
) -> TextData:
    """One split of a text data set, tokenized with the tokenizer of the training split's texts (or, for a trained
    run, with the run's own: `fitted`). `label_sets`: each label holds several names separated by `|` (multi-label)."""
    options = TokenizerOptions.model_validate(tokenizer)
    train_rows = read_rows(name, files[0], text_columns, label_column, drop_empty, label_sets)
    rows = train_rows if train else read_rows(name, files[1], text_columns, label_column, drop_empty, label_sets)
    kind = "class"
    if rows.labels is None:
        targets, classes = torch.full((len(rows.texts),), -1, dtype=torch.long), ()
    elif label_sets:
        names = [label_set.names_in(label) for label in rows.labels]
        classes = classes or label_set.classes_of([label_set.names_in(label) for label in train_rows.labels or []])
        targets, kind = label_set.multi_hot(names, classes, [f"{rows.path} line {line}" for line in rows.lines]), "class_set"
    else:
        classes = classes or tuple(sorted(set(train_rows.labels or []), key=_label_order))
        targets = class_index(name, rows, classes, label_base)
    if fitted and "tokenizer" in fitted:
        return tokenized_split(rows, tokenization_of(fitted), targets, classes, target_kind=kind)
    return tokenized_split(rows, tokenization_for(name, options, train_rows.texts), targets, classes, options.path, target_kind=kind)


def _label_order(label: str) -> tuple[int, int | str]:
    """Integer labels in numeric order, then names in alphabetical order."""
    try:
        return (0, int(label))
    except ValueError:
        return (1, label)


@DATASETS.register(modality="text")
def ag_news(
    root: Path, download: bool, train: bool, fitted: dict | None = None, tokenizer: TokenizerOptions = DEFAULT_TOKENIZER
) -> TextData:
    """AG's News topics (World, Sports, Business, Sci/Tech): <root>/AGNews/{train,test}.csv (label 1-4, text) and classes.txt."""
    folder = root / "AGNews"
    for needed in ("train.csv", "test.csv", "classes.txt"):
        if not (folder / needed).is_file():
            raise missing_data("ag_news", root, f"AGNews/{needed}")
    classes = tuple(line.strip() for line in (folder / "classes.txt").read_text().splitlines() if line.strip())
    files = (folder / "train.csv", folder / "test.csv")
    return text_split("ag_news", train, files, ["text"], "label", classes, _as_dict(tokenizer), label_base=1, fitted=fitted)


@DATASETS.register(modality="text")
def text_csv(
    root: Path,
    download: bool,
    train: bool,
    fitted: dict | None = None,
    train_file: str = "train.csv",
    test_file: str = "test.csv",
    text_columns: Annotated[list[str], Field(min_length=1)] = ["text"],  # noqa: B006 (pydantic copies defaults)
    label_column: str | None = "label",
    classes: list[str] | None = None,
    drop_empty: bool = False,
    tokenizer: TokenizerOptions = DEFAULT_TOKENIZER,
    target_kind: str = "class",
) -> TextData:
    """Your own texts: CSV (with a header) or JSONL files under data.root; text_columns joined, labels as names or integers.
    For a multi-label task the label column holds each text's labels separated by `|` (`sports|politics`)."""
    files = tuple(data_file(root, f) for f in (train_file, test_file))
    for path in files:
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise UsageError(f"data set 'text_csv': {path} is neither .csv nor .jsonl; convert it, or rename it if it is one of them")
    label_base = 0 if classes else None
    return text_split(
        "text_csv",
        train,
        files,
        list(text_columns),
        label_column,
        tuple(classes) if classes else None,
        _as_dict(tokenizer),
        drop_empty,
        label_base,
        fitted,
        label_sets=target_kind == "class_set",
    )


def data_file(root: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else root / path


def _as_dict(tokenizer: TokenizerOptions | dict) -> dict:
    return tokenizer.model_dump() if isinstance(tokenizer, TokenizerOptions) else dict(tokenizer)
