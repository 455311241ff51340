"""Text: token ids (N, max_length), padded on the right with the tokenizer's pad id; models take the ids.

A split keeps its texts beside their ids, so a fine-tune or an evaluation can read them again with another
run's tokenizer (`as_trained`, `inherited`): the tokenizer is the text modality's fitted state, as an image
split's mean and std are the image modality's. Tokenizers are Hugging Face `tokenizers` objects, carried as
their JSON (`tokenizer.json`), which a run writes beside its checkpoints and an export beside its model.
Encoders find the padding by comparing the ids with `pad_id`; an export takes `input_ids` and `attention_mask`
(what `tokenizers` and `transformers` give a caller) and sets the ids that the mask leaves out to `pad_id`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from transferctl.data.samples import Samples
from transferctl.errors import UsageError
from transferctl.modalities.base import Decoded, Modality, ReadBatch, unlabelled
from transferctl.registry import MODALITIES

INSTALL_HINT = 'pip install "transferctl[text]"'
TOKENIZER_FILE = "tokenizer.json"
PAD_TOKENS, MASK_TOKENS, UNK_TOKENS = ("[PAD]", "<pad>"), ("[MASK]", "<mask>"), ("[UNK]", "<unk>")
BOUNDARY_TOKENS = ("[CLS]", "[SEP]", "<s>", "</s>")  # added around every text; augmentations keep them
WORD_START_MARKS = ("Ġ", "▁")  # byte-level BPE and SentencePiece: the token begins a word
CONTEXT_WORD = -2  # the `word_ids` of a token of the words around a sentence (document context): read, never tagged


@dataclass(frozen=True)
class SentenceInContext:
    """A sentence's words and words of its document around it, which a model reads but does not tag (FLERT's
    document context, Schweter & Akbik 2020): `before` and `after` add at most `room` tokens each, fewer where the
    sentence leaves less of max_length free, and their tokens' word id is CONTEXT_WORD."""

    words: tuple[str, ...]
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    room: int = 64


Text = str | tuple[str, ...] | SentenceInContext  # a text, a sentence's words (already split), or one in context


def tokenizers():
    """Hugging Face `tokenizers`, or a one-line error naming the extra that installs it."""
    try:
        import tokenizers as module
    except ImportError:
        raise UsageError(f"text data needs the tokenizers package: {INSTALL_HINT}") from None
    return module


@dataclass(frozen=True)
class Tokenization:
    """What turns texts into ids: a tokenizer (its JSON), the length every text is padded or cut to, and which end
    a long text loses."""

    tokenizer_json: str
    max_length: int
    truncation: Literal["right", "left"] = "right"

    @cached_property
    def tokenizer(self):
        return _tokenizer_from_json(self.tokenizer_json)

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.tokenizer_json}\n{self.max_length}:{self.truncation}".encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def special_id(self, names: tuple[str, ...], role: str) -> int:
        for name in names:
            index = self.tokenizer.token_to_id(name)
            if index is not None:
                return index
        raise UsageError(f"data.tokenizer: the tokenizer has no {role} token ({' or '.join(names)}); add one to it or train one here")

    @cached_property
    def pad_id(self) -> int:
        return self.special_id(PAD_TOKENS, "padding")

    @cached_property
    def mask_id(self) -> int | None:
        """The mask token's id; None for a tokenizer without one (mlm and masking augmentations then refuse)."""
        try:
            return self.special_id(MASK_TOKENS, "mask")
        except UsageError:
            return None

    @cached_property
    def boundary_ids(self) -> tuple[int, ...]:
        ids = (self.tokenizer.token_to_id(name) for name in BOUNDARY_TOKENS)
        return tuple(i for i in ids if i is not None)

    @cached_property
    def continues_word(self) -> torch.Tensor | None:
        """Per vocabulary id, whether its token continues the word before it, as the vocabulary marks it: WordPiece's
        continuing-subword prefix (`##`), or byte-level and SentencePiece vocabularies whose word-initial tokens carry
        `Ġ` / `▁`. None for a vocabulary that does not mark it (a BPE trained without a continuing prefix)."""
        model, vocabulary = json.loads(self.tokenizer_json)["model"], self.tokenizer.get_vocab(with_added_tokens=True)
        flags = torch.zeros(self.vocab_size, dtype=torch.bool)
        if prefix := model.get("continuing_subword_prefix"):
            continues = lambda token: token.startswith(prefix)
        elif any(token.startswith(WORD_START_MARKS) for token in vocabulary):
            continues = lambda token: not token.startswith(WORD_START_MARKS)
        else:
            return None
        for token, index in vocabulary.items():
            if index < len(flags):
                flags[index] = continues(token)
        return flags

    def encode(self, texts: Sequence[Text], with_encodings: bool = False) -> tuple:
        """(int32 ids (N, max_length) padded on the right, whether each text was cut to max_length), and with
        `with_encodings` the tokenizer's encodings too (their word ids, offsets and masks). A text is a string, its
        words (a tuple of strings: a sentence already split, whose tokens' word ids count those words), or a sentence
        in context (`SentenceInContext`)."""
        encoder = _encoder(self.tokenizer_json, self.max_length, self.truncation, self.pad_id)
        kinds = {
            "whole": lambda group: encoder.encode_batch(group),
            "words": lambda group: encoder.encode_batch([list(words) for words in group], is_pretokenized=True),
            "in context": lambda group: self._encode_in_context(encoder, group),
        }
        kind_of = lambda text: "whole" if isinstance(text, str) else "in context" if isinstance(text, SentenceInContext) else "words"
        encodings: list[Any] = [None] * len(texts)
        for kind, encode in kinds.items():  # each kind encoded as itself, put back in order
            indices = [i for i, text in enumerate(texts) if kind_of(text) == kind]
            if indices:
                for index, encoding in zip(indices, encode([texts[i] for i in indices]), strict=True):
                    encodings[index] = encoding
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int32).view(len(texts), self.max_length)
        cut = torch.tensor([bool(e.overflowing) for e in encodings], dtype=torch.bool)
        return (ids, cut, encodings) if with_encodings else (ids, cut)

    def _encode_in_context(self, encoder: Any, texts: Sequence[SentenceInContext]) -> list[InContextEncoding]:
        """Sentences with as many of their context's words as fit in `room` tokens a side and in max_length (the
        words nearest the sentence first); a sentence that max_length cuts reads no context. `encoder`: `encode`'s."""
        alone = encoder.encode_batch([list(text.words) for text in texts], is_pretokenized=True)
        free = [self.max_length - sum(e.attention_mask) for e in alone]
        left = [min(text.room, room // 2) for text, room in zip(texts, free, strict=True)]
        before, used = _words_within(self.tokenizer_json, [text.before[::-1] for text in texts], left)
        before = [words[::-1] for words in before]
        right = [min(text.room, room - taken) for text, room, taken in zip(texts, free, used, strict=True)]  # what `before` left
        after, _ = _words_within(self.tokenizer_json, [text.after for text in texts], right)
        joined = encoder.encode_batch([[*b, *t.words, *a] for t, b, a in zip(texts, before, after, strict=True)], is_pretokenized=True)
        out = []
        for sentence, encoding, text, b in zip(alone, joined, texts, before, strict=True):
            # words are tokenized one by one, so the counts add up and `joined` fits; were a tokenizer to join tokens
            # across words, the sentence would be read alone rather than cut
            if sentence.overflowing or encoding.overflowing:
                out.append(InContextEncoding(sentence.ids, sentence.attention_mask, sentence.word_ids, bool(sentence.overflowing)))
                continue
            words = [None if w is None else w - len(b) if 0 <= w - len(b) < len(text.words) else CONTEXT_WORD for w in encoding.word_ids]
            out.append(InContextEncoding(encoding.ids, encoding.attention_mask, words, False))
        return out


@dataclass(frozen=True)
class InContextEncoding:
    """What a sentence in context encodes to, as the tokenizer's encodings give it: word ids count the sentence's
    words (CONTEXT_WORD at its context's tokens); `overflowing` says whether max_length cut the sentence."""

    ids: list[int]
    attention_mask: list[int]
    word_ids: list[int | None]
    overflowing: bool


def _words_within(
    tokenizer_json: str, word_lists: Sequence[Sequence[str]], rooms: Sequence[int]
) -> tuple[list[tuple[str, ...]], list[int]]:
    """Of each list of words, the first ones whose tokens (no special tokens) fit in its room, and their tokens."""
    heads = [list(words[: max(room, 0)]) for words, room in zip(word_lists, rooms, strict=True)]
    read = [i for i, head in enumerate(heads) if head]
    encodings = _plain_tokenizer(tokenizer_json).encode_batch([heads[i] for i in read], is_pretokenized=True, add_special_tokens=False)
    out: list[tuple[str, ...]] = [()] * len(heads)
    tokens = [0] * len(heads)
    for i, encoding in zip(read, encodings, strict=True):
        counts = [0] * len(heads[i])
        for word in encoding.word_ids:
            if word is not None:
                counts[word] += 1
        taken, used = 0, 0
        while taken < len(counts) and used + counts[taken] <= rooms[i]:
            used, taken = used + counts[taken], taken + 1
        out[i], tokens[i] = tuple(heads[i][:taken]), used
    return out, tokens


def same_tokenizer(first: str, second: str) -> bool:
    """Whether two tokenizer JSONs encode alike, whatever padding and truncation each was saved with."""
    canonical = lambda text: json.dumps({**json.loads(text), "padding": None, "truncation": None}, sort_keys=True)
    return first == second or canonical(first) == canonical(second)


@lru_cache(maxsize=8)
def _shared_tokenizer(tokenizer_json: str):
    return tokenizers().Tokenizer.from_str(tokenizer_json)


@lru_cache(maxsize=4)
def _encoder(tokenizer_json: str, max_length: int, truncation: str, pad_id: int):
    """A tokenizer set to cut and pad as a Tokenization encodes: parsed once, not once a batch (predict encodes
    texts a batch at a time)."""
    tokenizer = _tokenizer_from_json(tokenizer_json, fresh=True)
    tokenizer.enable_truncation(max_length, direction=truncation)
    tokenizer.enable_padding(direction="right", pad_id=pad_id, length=max_length)
    return tokenizer


@lru_cache(maxsize=4)
def _plain_tokenizer(tokenizer_json: str):
    """A tokenizer that neither cuts nor pads: what counts the tokens of a sentence's context words."""
    tokenizer = _tokenizer_from_json(tokenizer_json, fresh=True)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _tokenizer_from_json(tokenizer_json: str, fresh: bool = False):
    """The tokenizer of a JSON (shared; `fresh`: a private copy whose padding and truncation may be set)."""
    return tokenizers().Tokenizer.from_str(tokenizer_json) if fresh else _shared_tokenizer(tokenizer_json)


@dataclass(frozen=True)
class TextData(Samples):
    """A text split: int32 ids (N, max_length), the texts they were read from (strings, or sentences' words), the
    tokenization that read them, and which texts it cut short (N,)."""

    texts: tuple[Text, ...]
    tokenization: Tokenization
    cut: torch.Tensor
    tokenizer_path: str | None = None  # where the tokenizer was read from (data.tokenizer.path), if not trained here
    modality = "text"

    def subset(self, indices: torch.Tensor) -> TextData:
        kept = indices.tolist()
        return replace(super().subset(indices), texts=tuple(self.texts[i] for i in kept), cut=self.cut[indices.to(self.cut.device)])


# Side information that depends on how texts were tokenized, and how to compute it again from the encodings:
# `word_ids`, each token's word (-1 for special tokens and padding), is what aligns per-word targets with tokens,
# so targets stay per word and never need re-aligning when another tokenizer reads the texts.
TOKEN_SIDE = {
    "word_ids": lambda encodings: torch.tensor([[-1 if w is None else w for w in e.word_ids] for e in encodings], dtype=torch.long),
    "lengths": lambda encodings: torch.tensor([sum(e.attention_mask) for e in encodings], dtype=torch.long),
}


def text_lengths(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Each right-padded text's tokens, padding left out (N,)."""
    return (ids != pad_id).sum(1)


def longest_text(ids: torch.Tensor, pad_id: int) -> int:
    """The length of a right-padded batch's longest text (at least 1)."""
    return max(int(text_lengths(ids, pad_id).max()), 1) if len(ids) else ids.shape[1]


def cut_to_longest(ids: torch.Tensor, side: Mapping[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A right-padded batch and its per-token side information (N, tokens) cut to its longest text: padding columns
    that no text reaches change no real token's output (the encoders mask padding), and cost as much as real ones."""
    length = longest_text(ids, pad_id)
    return ids[:, :length], {name: values[:, :length] if values.ndim == 2 else values for name, values in side.items()}


def tokenized(data: TextData, tokenization: Tokenization) -> TextData:
    """`data`'s texts read with another tokenization (a run's), and the side information that depends on the tokens
    computed again from the new encodings (per-word targets stay as they are: `word_ids` align them)."""
    if tokenization == data.tokenization:
        return data
    unknown = sorted(set(data.side) - set(TOKEN_SIDE))
    if unknown:
        raise UsageError(
            f"data: the texts carry side information {', '.join(unknown)} that transferctl cannot compute again for another "
            f"tokenizer; read them with the run's own tokenizer (data.tokenizer.path)"
        )
    ids, cut, encodings = tokenization.encode(list(data.texts), with_encodings=True)
    side = {name: TOKEN_SIDE[name](encodings).to(values.device) for name, values in data.side.items()}
    return replace(data, inputs=ids.to(data.inputs.device), tokenization=tokenization, cut=cut, side=side)


def tokenization_of(fitted: Mapping[str, Any]) -> Tokenization:
    """The tokenization a run's fitted state names."""
    return Tokenization(fitted["tokenizer"], fitted["max_length"], fitted.get("truncation", "right"))


class TextReader:
    """A text (or a sentence's words) is read as it is; texts are encoded a batch at a time (`TextModality.batch_of`)."""

    def __call__(self, text: str | tuple[str, ...], name: str) -> Decoded:
        if isinstance(text, tuple | list) and all(isinstance(word, str) for word in text):
            return tuple(text), {}  # a sentence given as its words
        if not isinstance(text, str):
            raise UsageError(f"a text model reads texts, and {text!r} is a {type(text).__name__}; pass the text itself")
        return text, {}


class TokenInputs(nn.Module):
    """What a text export holds: (input_ids, attention_mask) -> the network, with the ids that the mask leaves out
    set to the pad id (the encoders find padding by it)."""

    def __init__(self, network: nn.Module, pad_id: int):
        super().__init__()
        self.network, self.pad_id = network, pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.network(input_ids.masked_fill(attention_mask == 0, self.pad_id))


@MODALITIES.register("text")
class TextModality(Modality):
    """Text: token ids of one length, right-padded; augmented as ids (deletion, crops, masking)."""

    input_name = "input_ids"
    input_names = ("input_ids", "attention_mask")
    length_axes: ClassVar[Mapping[str, int]] = {"input_ids": 1, "attention_mask": 1}
    augmentations: ClassVar[Mapping[str, str]] = {"strong": "text_simclr", "light": "text_light", "none": "none"}
    inherits_fitted_state = True  # a fine-tune reads its texts with its source run's tokenizer
    shows_inputs = False
    file_types = (".csv", ".jsonl", ".txt")  # files that hold texts: a column of each row, or one text a line
    reads_texts = True
    decodes_in_workers = False
    samples_vary_in_length = True
    default_model = "transformer"

    def model_context(self, sample_shape: tuple[int, ...], fitted: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if fitted is None:
            raise ValueError("a text model's context needs the tokenizer (the split's fitted state)")
        tokenization = tokenization_of(fitted)
        return {
            "vocab_size": tokenization.vocab_size,
            "pad_id": tokenization.pad_id,
            "max_length": sample_shape[0],
            "vocabulary": tokenization.tokenizer.get_vocab(),  # token -> id: what word vectors are matched by
        }

    def head_context(self, fitted: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if not fitted:
            return {}
        tokenization = tokenization_of(fitted)
        return {"vocab_size": tokenization.vocab_size, "pad_id": tokenization.pad_id}

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.long()

    def normalize(self, x: torch.Tensor, data: TextData) -> torch.Tensor:
        return x

    def with_lengths(self, data: TextData) -> TextData:
        """Each text's tokens, padding left out (`TOKEN_SIDE`'s `lengths`, so another tokenizer's reading counts again)."""
        return replace(data, side={**data.side, "lengths": text_lengths(data.inputs, data.tokenization.pad_id).long()})

    def cut_padding(
        self, x: torch.Tensor, side: Mapping[str, torch.Tensor], data: TextData
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return cut_to_longest(x, side, data.tokenization.pad_id)

    def augment_context(self, data: TextData) -> dict[str, Any]:
        t = data.tokenization
        return {"special_ids": {"pad": t.pad_id, "mask": t.mask_id, "keep": t.boundary_ids, "vocab_size": t.vocab_size}}

    def example_input(self, data: TextData, count: int) -> torch.Tensor:
        """Texts of max_length non-pad tokens."""
        token = 1 if data.tokenization.pad_id == 0 else 0
        return torch.full((count, *data.sample_shape), token, dtype=torch.long)

    def fitted_state(self, data: TextData) -> dict[str, Any]:
        t = data.tokenization
        return {"tokenizer": t.tokenizer_json, "max_length": t.max_length, "truncation": t.truncation, "padding": "right"}

    def reader(self, fitted: Mapping[str, Any]) -> TextReader:
        return TextReader()

    def batch_of(self, decoded: Sequence[Decoded], fitted: Mapping[str, Any]) -> ReadBatch:
        """Texts encoded as the data sets encode theirs (`Tokenization.encode`: the run's tokenizer, cut to max_length
        at its truncation side, padded on the right); each record says whether its text was cut."""
        texts = [text for text, _ in decoded]
        tokenization = tokenization_of(fitted)
        if texts:
            ids, cut = tokenization.encode(texts)
        else:
            ids, cut = torch.zeros(0, tokenization.max_length, dtype=torch.int32), torch.zeros(0, dtype=torch.bool)
        data = TextData(ids, **unlabelled(len(texts), fitted), texts=tuple(texts), tokenization=tokenization, cut=cut)
        return ReadBatch(data, [{"cut": was_cut} for was_cut in cut.tolist()])

    def card_fitted(self, fitted: Mapping[str, Any]) -> dict[str, Any]:
        return {**fitted, "tokenizer": TOKENIZER_FILE} if "tokenizer" in fitted else dict(fitted)

    def fitted_from_card(self, card: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """The tokenizer is the file beside the card (which cuts and pads as the model was trained); a card of a release
        before 0.10 describes the rest in its input."""
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise UsageError(f"--from {folder}: the export has no {TOKENIZER_FILE}, which its texts are encoded with; export the run again")
        tokenizer = _tokenizer_from_json(path.read_text(), fresh=True)
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if "fitted_state" in card:
            return {**card["fitted_state"], "tokenizer": tokenizer.to_str()}
        described = card["input"]
        labels = {"classes": card.get("classes") or [], "target_names": card.get("targets") or []}
        reading = {"max_length": described["max_length"], "truncation": described.get("truncation_side", "right"), "padding": "right"}
        return {**labels, "tokenizer": tokenizer.to_str(), **reading}

    def input_shape(self, fitted: Mapping[str, Any]) -> tuple[int, ...] | None:
        return (int(fitted["max_length"]),)

    def completed_fitted(self, fitted: Mapping[str, Any], options: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        """Older text runs recorded their tokenizer and max_length (the later ones their truncation side: else the
        right); all padded on the right."""
        return {"truncation": "right", "padding": "right", **fitted}

    def as_trained(self, data: TextData, fitted: dict[str, Any]) -> TextData:
        return tokenized(data, tokenization_of(fitted))

    def inherited(self, data: TextData, source: dict[str, Any]) -> tuple[TextData, str | None]:
        if "tokenizer" not in source:
            raise UsageError("finetune.source: that run was not trained on text; fine-tune from a run whose data set is text")
        trained = tokenization_of(source)
        if data.tokenizer_path and same_tokenizer(data.tokenization.tokenizer_json, trained.tokenizer_json) is False:
            raise UsageError(
                f"data.tokenizer.path {data.tokenizer_path}: not the tokenizer the source run was trained with; drop it "
                f"(the run's {TOKENIZER_FILE} is used) or give that file"
            )
        if data.tokenization.tokenizer_json != trained.tokenizer_json and data.tokenization.max_length == trained.max_length:
            note = "data.tokenizer: texts are read with the source run's tokenizer; this run's tokenizer options have no effect"
        elif data.tokenization != trained:
            note = (
                f"data.tokenizer: texts are read with the source run's tokenizer (max_length={trained.max_length}); "
                f"this run's tokenizer options have no effect"
            )
        else:
            note = None
        return tokenized(data, trained), note

    def notes(self, data: TextData) -> list[str]:
        cut, t = int(data.cut.sum()), data.tokenization
        if not cut:
            return []
        return [f"data: {cut} of {len(data)} training texts are longer than max_length {t.max_length} and were cut at the {t.truncation}"]

    def resumed_data_options(self, options: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
        tokenizer = dict(options.get("tokenizer") or {})
        own = run_dir / "tokenizer.json"
        if not tokenizer.get("path") or not own.is_file():  # a tokenizer the run trained is trained again, alike
            return {}
        return {"tokenizer": {**tokenizer, "path": str(own)}}

    def companion_files(self, fitted: Mapping[str, Any]) -> dict[str, bytes]:
        """tokenizer.json, set to cut and pad every text as the model was trained (a caller's encode_batch then
        gives the export's inputs as they are)."""
        if "tokenizer" not in fitted:
            return {}
        t = tokenization_of(fitted)
        tokenizer = _tokenizer_from_json(t.tokenizer_json, fresh=True)
        tokenizer.enable_truncation(t.max_length, direction=t.truncation)
        tokenizer.enable_padding(direction="right", pad_id=t.pad_id, pad_token=tokenizer.id_to_token(t.pad_id), length=t.max_length)
        return {TOKENIZER_FILE: tokenizer.to_str().encode()}

    def served(self, module: nn.Module, fitted: dict[str, Any]) -> nn.Module:
        return TokenInputs(module, tokenization_of(fitted).pad_id).eval()

    def export_input(self, raw: torch.Tensor, data: TextData) -> tuple[torch.Tensor, ...]:
        ids = raw.long()
        return ids, (ids != data.tokenization.pad_id).long()

    def describe_input(self, data: TextData) -> dict[str, Any]:
        t = data.tokenization
        return {
            "name": self.input_name,
            "names": list(self.input_names),
            "shape": ["batch", t.max_length],
            "dtype": "int64",
            "max_length": t.max_length,
            "padding_side": "right",
            "truncation_side": t.truncation,
            "pad_id": t.pad_id,
            "tokenizer": TOKENIZER_FILE,
            "preprocessing": (
                f"encode each text with {TOKENIZER_FILE} (the `tokenizers` package: Tokenizer.from_file(...).encode_batch), "
                f"which cuts it to {t.max_length} tokens from the {t.truncation} end and pads it on the right with id "
                f"{t.pad_id}; input_ids are the encodings' ids, attention_mask their attention_mask (1 on the tokens, "
                f"0 on the padding). Padding must be on the right"
            ),
        }
