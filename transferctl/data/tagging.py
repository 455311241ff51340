"""Tagged sentences: a tag per word (named entities in BIO tags), from CoNLL column files or JSONL.

Data sets: `conll2003` (the shared layout: <root>/CoNLL2003/{train,dev,test}.txt), `conll_folder` (your own column
files: data.root holding train.txt, test.txt and an optional dev.txt) and `token_jsonl` (Hugging Face's layout:
`{"tokens": [...], "tags": [...]}` a line). A split is text data whose texts are the sentences' words (tokenized as
pre-split words, so each token knows its word: the `word_ids` side information) and whose targets are each
sentence's tag indices (`class_per_word`), so a run that reads the sentences with another tokenizer re-aligns
them without touching the tags. A dev file is the validation split.

`document_context: N` (CoNLL files) reads each sentence with up to N tokens of its document on each side, as FLERT
does (Schweter & Akbik 2020): the neighbouring sentences' words, never their tags, so a labelled budget counts the
tagged sentences alone. Their tokens' word id is CONTEXT_WORD: no loss, metric or prediction reads them.

Tags are read in IOB2 (`B-` begins every entity); `data.scheme: iob1` files (`I-` begins an entity, `B-` only
where two of one type touch) are converted to IOB2 as they are read. The tag list is "O", then B- and I- of every
entity type in the training file. A bad line is a one-line error naming the file and the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from transferctl.data.datasets import missing_data
from transferctl.data.targets import TargetList
from transferctl.data.text import TokenizerOptions, data_file, tokenization_for
from transferctl.errors import UsageError
from transferctl.modalities.text import TOKEN_SIDE, SentenceInContext, Text, TextData, Tokenization, tokenization_of
from transferctl.registry import DATASETS

OUTSIDE = "O"
BIO_TAG = re.compile(r"O|[BI]-\S+")  # a type is any run of non-space characters
Scheme = Literal["iob2", "iob1"]


class TaggingTokenizerOptions(TokenizerOptions):
    """`data.tokenizer` of a tagging data set: names are cased and sentences long, so case is kept and texts are read
    up to 128 tokens unless the options say otherwise."""

    lowercase: bool = False
    max_length: Annotated[int, Field(ge=4, le=8192)] = 128


TAGGING_TOKENIZER = TaggingTokenizerOptions()
DOCUMENT_START = "-DOCSTART-"
# `data.document_context`: how many tokens of a sentence's document the model reads on each side (FLERT uses 64)
DocumentContext = Annotated[int, Field(ge=0, le=512)]


@dataclass(frozen=True)
class TaggedSentences:
    """A file's sentences: their words, their tags as written, and the line of each word (JSONL: of its sentence)."""

    path: Path
    words: list[tuple[str, ...]]
    tags: list[tuple[str, ...]]
    lines: list[tuple[int, ...]]
    documents: list[int]  # each sentence's document (CoNLL: counted by -DOCSTART- lines; JSONL: each its own)


def read_conll(name: str, path: Path) -> TaggedSentences:
    """`token ... TAG` a line (the tag in the last column), a blank line between sentences, a `-DOCSTART-` line
    between documents (a file without one is one document)."""
    words, tags, lines, documents = [], [], [], []
    sentence: list[tuple[str, str, int]] = []
    document = 0

    def close() -> None:
        if sentence:
            words.append(tuple(w for w, _, _ in sentence))
            tags.append(tuple(t for _, t, _ in sentence))
            lines.append(tuple(n for _, _, n in sentence))
            documents.append(document)
            sentence.clear()

    for number, line in enumerate(_text_of(name, path).splitlines(), start=1):
        columns = line.split()
        if not columns:
            close()
            continue
        if columns[0] == DOCUMENT_START:
            close()
            document += 1
            continue
        if len(columns) < 2:
            raise UsageError(
                f"data set '{name}': {path} line {number} has one column ({columns[0]!r}); write `token TAG` a line, the tag last"
            )
        sentence.append((columns[0], columns[-1], number))
    close()
    return _nonempty(name, TaggedSentences(path, words, tags, lines, documents))


def read_token_jsonl(name: str, path: Path, tokens_field: str, tags_field: str) -> TaggedSentences:
    """`{"tokens": [...], "tags": [...]}` a line: a sentence's words and their tags (strings), of one length."""
    words, tags, lines = [], [], []
    for number, line in enumerate(_text_of(name, path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"data set '{name}': {path} line {number} is not JSON ({exc.msg}); write one JSON object a line") from None
        if not isinstance(record, dict) or tokens_field not in record or tags_field not in record:
            raise UsageError(
                f"data set '{name}': {path} line {number} has no '{tokens_field}' and '{tags_field}' lists; "
                f'write {{"{tokens_field}": [...], "{tags_field}": [...]}} a line (data.tokens_field / data.tags_field name others)'
            )
        tokens, labels = record[tokens_field], record[tags_field]
        if not _strings(tokens) or not _strings(labels):
            raise UsageError(f"data set '{name}': {path} line {number}: '{tokens_field}' and '{tags_field}' must be lists of strings")
        if len(tokens) != len(labels):
            raise UsageError(
                f"data set '{name}': {path} line {number} has {len(tokens)} tokens and {len(labels)} tags; give every token one tag"
            )
        if tokens:
            words.append(tuple(tokens))
            tags.append(tuple(labels))
            lines.append((number,) * len(tokens))
    return _nonempty(name, TaggedSentences(path, words, tags, lines, list(range(len(words)))))


def _text_of(name: str, path: Path) -> str:
    if not path.is_file():
        raise UsageError(f"data set '{name}': no file {path}; point data.root (or data.train / data.test) at the tagged files")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UsageError(f"data set '{name}': {path} line {line} is not UTF-8 (byte {exc.start}); save the file as UTF-8") from None


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _nonempty(name: str, sentences: TaggedSentences) -> TaggedSentences:
    if not sentences.words:
        raise UsageError(f"data set '{name}': {sentences.path} holds no tagged sentences; give a file with at least one")
    return sentences


# --------------------------------------------------------------------------- tags


def entity_type(tag: str) -> str | None:
    """The entity type of a BIO tag ("B-PER" -> "PER"); None for "O"."""
    return None if tag == OUTSIDE else tag[2:]


def in_iob2(name: str, sentences: TaggedSentences, scheme: Scheme) -> list[tuple[str, ...]]:
    """Every sentence's tags in IOB2, each checked: "O", or B- or I- and a type; under iob2 an I- tag continues an
    entity of its type; iob1 tags are converted (an I- that begins an entity becomes B-)."""
    converted = []
    for tags, lines in zip(sentences.tags, sentences.lines, strict=True):
        previous, out = OUTSIDE, []
        for tag, line in zip(tags, lines, strict=True):
            if not BIO_TAG.fullmatch(tag):
                raise UsageError(
                    f"data set '{name}': {sentences.path} line {line} has tag {tag!r}, which is not BIO; use O, B-TYPE or I-TYPE"
                )
            begins = tag.startswith("I-") and entity_type(previous) != entity_type(tag)
            if begins and scheme == "iob2":
                raise UsageError(
                    f"data set '{name}': {sentences.path} line {line}: {tag!r} begins an entity, which IOB2 does not allow "
                    f"(B- begins every entity); fix the tag, or set data.scheme=iob1 if the file is IOB1"
                )
            tag = "B-" + tag[2:] if begins else tag
            out.append(tag)
            previous = tag
        converted.append(tuple(out))
    return converted


def tag_list(tags: list[tuple[str, ...]]) -> tuple[str, ...]:
    """ "O", then B- and I- of each entity type the sentences have, types in alphabetical order."""
    types = sorted({entity_type(t) for sentence in tags for t in sentence} - {None})
    return (OUTSIDE, *(f"{prefix}-{kind}" for kind in types for prefix in ("B", "I")))


def tag_indices(name: str, sentences: TaggedSentences, tags: list[tuple[str, ...]], classes: tuple[str, ...]) -> TargetList:
    """Each sentence's tags as int64 indices into `classes`; a tag training never saw is a one-line error."""
    lookup = {tag: i for i, tag in enumerate(classes)}
    indices = []
    for sentence, lines in zip(tags, sentences.lines, strict=True):
        for tag, line in zip(sentence, lines, strict=True):
            if tag not in lookup:
                known = ", ".join(sorted({entity_type(c) for c in classes} - {None})) or "none"
                raise UsageError(
                    f"data set '{name}': {sentences.path} line {line} has tag {tag!r}, whose type the training file never has "
                    f"(types: {known}); fix the tag, or add sentences of that type to the training file"
                )
        indices.append(torch.tensor([lookup[tag] for tag in sentence], dtype=torch.long))
    return TargetList(indices)


# --------------------------------------------------------------------------- splits


def tagged_split(
    name: str,
    read: dict[str, object],
    train: bool,
    validation: bool,
    scheme: Scheme,
    tokenizer: TokenizerOptions | dict,
    fitted: dict | None,
    document_context: int = 0,
) -> TextData:
    """One split of a tagging data set: `read` maps "train", "dev" and "test" to a function reading that file's
    sentences. The tag list and the tokenizer come from the training file (or, for a trained run, from the run);
    `document_context` > 0 reads each sentence with up to that many tokens of its document on each side."""
    options = TaggingTokenizerOptions.model_validate(tokenizer) if isinstance(tokenizer, dict) else tokenizer
    training = read["train"]()
    train_tags = in_iob2(name, training, scheme)
    classes = tuple(fitted["classes"]) if fitted and fitted.get("classes") else tag_list(train_tags)
    which = "dev" if validation else "train" if train else "test"
    sentences = training if which == "train" else read[which]()
    tags = train_tags if which == "train" else in_iob2(name, sentences, scheme)
    if fitted and "tokenizer" in fitted:
        tokenization = tokenization_of(fitted)
    else:
        tokenization = reading_words(tokenization_for(name, options, [" ".join(words) for words in training.words]))
    texts = in_context(sentences, document_context)
    return sentences_as_data(texts, tag_indices(name, sentences, tags, classes), classes, tokenization, options.path)


def in_context(sentences: TaggedSentences, room: int) -> list[Text]:
    """Each sentence's words, and with `room` > 0 the words of its document around it (at most `room` each side,
    nearest first: the tokenizer keeps those that fit): the model reads them, the labels stay the sentence's."""
    if room <= 0:
        return list(sentences.words)
    words, documents, out = sentences.words, sentences.documents, []
    for i, sentence in enumerate(words):
        before: list[str] = []
        for j in range(i - 1, -1, -1):
            if documents[j] != documents[i] or len(before) >= room:
                break
            before[:0] = words[j]
        after: list[str] = []
        for j in range(i + 1, len(words)):
            if documents[j] != documents[i] or len(after) >= room:
                break
            after.extend(words[j])
        out.append(SentenceInContext(sentence, tuple(before[-room:]), tuple(after[:room]), room))
    return out


def reading_words(tokenization: Tokenization) -> Tokenization:
    """The tokenization tagged sentences are read with: a byte-level BPE tokenizer that adds no space before a word
    (GPT-2's, RoBERTa's as saved) would read words given apart as one run of characters, so its byte-level parts add
    one, as transformers' `add_prefix_space=True` (run_ner.py's for RoBERTa) does; every other tokenizer as it is."""

    def with_space(part: Any) -> Any:
        if isinstance(part, dict):
            fixed = {k: with_space(v) for k, v in part.items()}
            if part.get("type") in ("ByteLevel", "RobertaProcessing") and part.get("add_prefix_space") is False:
                fixed["add_prefix_space"] = True
            return fixed
        return [with_space(v) for v in part] if isinstance(part, list) else part

    spec = json.loads(tokenization.tokenizer_json)
    fixed = {**spec, "pre_tokenizer": with_space(spec.get("pre_tokenizer")), "post_processor": with_space(spec.get("post_processor"))}
    if fixed == spec:
        return tokenization
    return replace(tokenization, tokenizer_json=json.dumps(fixed, ensure_ascii=False))


def sentences_as_data(
    words: Sequence[Text], targets: TargetList, classes: tuple[str, ...], tokenization: Tokenization, path: str | None = None
) -> TextData:
    """Sentences (their words, or their words in context) as text data: ids of the words read as pre-split words,
    which texts were cut, and each token's word (`word_ids`; CONTEXT_WORD at the tokens of a sentence's context)."""
    ids, cut, encodings = tokenization.encode(list(words), with_encodings=True)
    side = {"word_ids": TOKEN_SIDE["word_ids"](encodings)}
    return TextData(
        ids,
        targets,
        classes,
        target_kind="class_per_word",
        side=side,
        texts=tuple(words),
        tokenization=tokenization,
        cut=cut,
        tokenizer_path=path,
    )


# --------------------------------------------------------------------------- data sets


def _has_dev(root: Path, options: dict) -> bool:
    return (root / "dev.txt").is_file()


@DATASETS.register(modality="text", validation=True)
def conll2003(
    root: Path,
    download: bool,
    train: bool,
    fitted: dict | None = None,
    validation: bool = False,
    tokenizer: TaggingTokenizerOptions = TAGGING_TOKENIZER,
    document_context: DocumentContext = 0,
) -> TextData:
    """CoNLL-2003 English named entities (PER, ORG, LOC, MISC): <root>/CoNLL2003/{train,dev,test}.txt; dev validates.
    `document_context`: tokens of each sentence's document read on each side (untagged), 0 for none."""
    folder = root / "CoNLL2003"
    for needed in ("train.txt", "dev.txt", "test.txt"):
        if not (folder / needed).is_file():
            raise missing_data("conll2003", root, f"CoNLL2003/{needed}")
    read = {split: (lambda split=split: read_conll("conll2003", folder / f"{split}.txt")) for split in ("train", "dev", "test")}
    # The shared files are IOB2 but for a few hundred I- tags that begin an entity (267 in train): read as conlleval
    # reads them, as beginnings, which the iob1 conversion does (it leaves every IOB2 tag as it is).
    return tagged_split("conll2003", read, train, validation, "iob1", tokenizer, fitted, document_context)


@DATASETS.register(modality="text", validation=_has_dev)
def conll_folder(
    root: Path,
    download: bool,
    train: bool,
    fitted: dict | None = None,
    validation: bool = False,
    scheme: Scheme = "iob2",
    tokenizer: TaggingTokenizerOptions = TAGGING_TOKENIZER,
    document_context: DocumentContext = 0,
) -> TextData:
    """Your own CoNLL column files: data.root holding train.txt, test.txt and an optional dev.txt (the validation split);
    `document_context` as conll2003's (-DOCSTART- lines part documents)."""
    read = {split: (lambda split=split: read_conll("conll_folder", root / f"{split}.txt")) for split in ("train", "dev", "test")}
    return tagged_split("conll_folder", read, train, validation, scheme, tokenizer, fitted, document_context)


@DATASETS.register(modality="text")
def token_jsonl(
    root: Path,
    download: bool,
    train: bool,
    fitted: dict | None = None,
    train_file: str = "train.jsonl",
    test_file: str = "test.jsonl",
    tokens_field: str = "tokens",
    tags_field: str = "tags",
    scheme: Scheme = "iob2",
    tokenizer: TaggingTokenizerOptions = TAGGING_TOKENIZER,
) -> TextData:
    """Your own tagged sentences as JSONL (Hugging Face's layout): {"tokens": [...], "tags": [...]} a line."""
    files = {"train": data_file(root, train_file), "test": data_file(root, test_file)}
    read = {split: (lambda split=split: read_token_jsonl("token_jsonl", files[split], tokens_field, tags_field)) for split in files}
    return tagged_split("token_jsonl", read, train, False, scheme, tokenizer, fitted)
