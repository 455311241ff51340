"""Speech recognition: a transcript per recording, read from the encoder's features at every frame.

The head (`ctc`) gives each frame a score per unit of the alphabet plus a blank (id 0); the loss is CTC
(`torch.nn.functional.ctc_loss`) over each recording's real frames (its `lengths`, the steps its padding cannot
change) and its transcript; decoding is greedy: the best unit of every frame, repeats merged, blanks dropped. The
alphabet is fitted on the training transcripts (`vocabulary: words` or `characters`) and kept with the run.
Metrics are word and character error rates (edit distance over the split, as jiwer counts them); `val_wer` picks
`best.pt`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from transferctl import agreement
from transferctl.data.samples import Batch, Samples, iterate_batches
from transferctl.data.targets import TargetList
from transferctl.engine.evaluate import Evaluation
from transferctl.engine.train import Selection
from transferctl.errors import UsageError
from transferctl.modalities import modality_of
from transferctl.registry import HEADS, LOSSES, TASKS
from transferctl.tasks.base import Task

if TYPE_CHECKING:
    from transferctl.modalities.base import ReadBatch
    from transferctl.runs import Run

BLANK = 0  # CTC's blank: output 0; the alphabet's units are 1..
PADDING_LOG_PROB = -1e4  # what a frame past a recording's end gives every unit but the blank (log-probability 0)


# --------------------------------------------------------------------------- alphabet, decoding, error rates


@dataclass(frozen=True)
class Alphabet:
    """The units a transcript is spelt in (words, or characters with " " between words), ids 1.. (0 is the blank)."""

    units: tuple[str, ...]
    vocabulary: str = "characters"

    def split(self, text: str) -> list[str]:
        return text.split() if self.vocabulary == "words" else list(" ".join(text.split()))

    def join(self, units: Sequence[str]) -> str:
        return " ".join(units) if self.vocabulary == "words" else "".join(units)

    @functools.cached_property
    def ids(self) -> dict[str, int]:
        return {unit: i + 1 for i, unit in enumerate(self.units)}

    def encode(self, text: str) -> torch.Tensor:
        """The ids of a transcript's units (units the alphabet lacks are left out: `missing` names them)."""
        return torch.tensor([self.ids[u] for u in self.split(text) if u in self.ids], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return self.join([self.units[i - 1] for i in ids])

    def missing(self, text: str) -> list[str]:
        """The units of `text` the alphabet lacks."""
        known = set(self.units)
        return sorted({u for u in self.split(text) if u not in known})


def frames_needed(labels: Sequence[int]) -> int:
    """The fewest frames CTC can align `labels` to: one per label, and a blank between two equal neighbours."""
    return len(labels) + sum(a == b for a, b in itertools.pairwise(labels))


def greedy_ids(log_probs: torch.Tensor) -> list[list[int]]:
    """Each row's (N, frames, units) best path, repeats merged and blanks dropped (padding frames are blanks)."""
    best = log_probs.argmax(-1)
    keep = best != BLANK
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    return [row[mask].tolist() for row, mask in zip(best, keep, strict=True)]


def edit_distance(reference: Sequence[Any], hypothesis: Sequence[Any]) -> int:
    """Levenshtein distance: the fewest substitutions, deletions and insertions that turn one into the other."""
    previous = list(range(len(hypothesis) + 1))
    for i, want in enumerate(reference, start=1):
        current = [i]
        for j, got in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (want != got)))
        previous = current
    return previous[-1]


def error_rates(truth: Sequence[str], guess: Sequence[str]) -> dict[str, float]:
    """Word and character error rates over a split (edits over the references' words or characters, as jiwer's
    `wer` and `cer` count them: words split at whitespace, characters of the whitespace-normalized texts), and the
    share of transcripts read exactly."""
    words = [(t.split(), g.split()) for t, g in zip(truth, guess, strict=True)]
    chars = [(" ".join(t.split()), " ".join(g.split())) for t, g in zip(truth, guess, strict=True)]
    word_count, char_count = sum(len(t) for t, _ in words), sum(len(t) for t, _ in chars)
    return {
        "wer": sum(edit_distance(t, g) for t, g in words) / max(word_count, 1),
        "cer": sum(edit_distance(t, g) for t, g in chars) / max(char_count, 1),
        "utterance_accuracy": sum(t == g for t, g in words) / max(len(words), 1),
    }


# --------------------------------------------------------------------------- head, served outputs, loss


@HEADS.register("ctc", serves=("speech_recognition",), reads="token_features")
def ctc_head(feature_dim: int, num_outputs: int, dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1) -> nn.Module:
    """Dropout and a linear layer over the features at every frame: a score per unit and the blank (output 0)."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_outputs))


def frames_of(network: nn.Module | None, lengths: torch.Tensor) -> torch.Tensor:
    """The encoder's frames of recordings of `lengths` input steps: its `frame_lengths` where its frames are strided (a
    wav2vec 2.0's convolutions), else the input steps themselves (log-mel frames)."""
    encoder = getattr(network, "encoder", network)
    return encoder.frame_lengths(lengths) if hasattr(encoder, "frame_lengths") else lengths


class FrameLogProbs(nn.Module):
    """What a speech network serves: log-probabilities (N, frames, units + 1) at every frame; frames past a recording's
    length (padding) give the blank log-probability 0, so greedy decoding needs no lengths."""

    side_inputs = ("lengths",)

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, **side: torch.Tensor) -> torch.Tensor:
        if lengths is None:
            return self.network(x, **side).float().log_softmax(-1)
        log_probs = self.network(x, lengths=lengths, **side).float().log_softmax(-1)
        frames = frames_of(self.network, lengths)
        past = torch.arange(log_probs.shape[1], device=x.device).view(1, -1) >= frames.view(-1, 1)
        padding = torch.full_like(log_probs[0, 0], PADDING_LOG_PROB)
        padding[BLANK] = 0.0
        return torch.where(past.unsqueeze(-1), padding, log_probs)


class CTCLoss(nn.Module):
    """CTC over each recording's real frames (`lengths`) and its transcript's labels, averaged over the batch after
    dividing each recording's loss by its transcript's length (CTCLoss's "mean"). An impossible alignment (fewer
    frames than labels) gives no gradient instead of an infinite loss; training refuses such recordings up front."""

    def forward(self, logits: torch.Tensor, lengths: torch.Tensor, labels: Sequence[torch.Tensor]) -> torch.Tensor:
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (frames, N, units): float32, also in a bf16 step
        targets = torch.cat(list(labels)).to(logits.device)
        target_lengths = torch.tensor([len(t) for t in labels], dtype=torch.long, device=logits.device)
        return nn.functional.ctc_loss(log_probs, targets, lengths, target_lengths, blank=BLANK, zero_infinity=True)


@LOSSES.register("ctc", serves=("speech_recognition",))
def ctc() -> nn.Module:
    """Connectionist temporal classification over the frames' unit scores and the transcript (blank: output 0)."""
    return CTCLoss()


# --------------------------------------------------------------------------- the task


@TASKS.register("speech_recognition")
@dataclass
class SpeechRecognition(Task):
    """A transcript per recording: per-frame outputs over an alphabet plus a blank, trained with CTC and decoded
    greedily; word and character error rates."""

    vocabulary: Literal["words", "characters"] = "characters"
    alphabet: list[str] | None = None  # a closed alphabet: every training transcript must be spelt in these units

    head = "ctc"
    loss = "ctc"
    serves = "speech_recognition"
    target_kind = "transcript"
    selection = Selection("val_wer", higher_is_better=False)
    validation_metrics: ClassVar[Mapping[str, bool]] = {"val_wer": False, "val_cer": False}
    output = "log_probs"
    exported_as = "speech_recognizer"
    augmentation = "none"  # shifts and speed changes would move the frames the lengths count; the recipe sets its own
    variable_length = True
    minimum_agreement: ClassVar[Mapping[str, float]] = {"transcript_agreement": 0.99}
    compares_values = False  # a frame near a tie may take another unit: parity counts transcripts

    def __post_init__(self) -> None:
        self.units = Alphabet(tuple(self.alphabet or ()), self.vocabulary)

    def num_outputs(self, data: Samples) -> int:
        return len(self.units.units) + 1

    def breaking_effects(self) -> frozenset[str]:
        return frozenset({"shift", "speed"})

    def fit(self, train: Samples) -> dict[str, Any]:
        transcripts = list(train.targets)
        if self.alphabet is not None:
            for text in transcripts:
                if missing := self.units.missing(text):
                    raise UsageError(
                        f"{_source(text)}: its transcript has {', '.join(repr(u) for u in missing)}, which task.alphabet lacks; "
                        f"add them to task.alphabet or fix the transcript"
                    )
        else:
            self.units = Alphabet(tuple(sorted({u for text in transcripts for u in self.units.split(text)})), self.vocabulary)
        self._fitted_on = (transcripts, train.side["lengths"])  # checked against the encoder's frames in `initialize`
        return {"alphabet": list(self.units.units), "vocabulary": self.vocabulary}

    def initialize(self, network: nn.Module) -> None:
        """Every training transcript fits its recording's frames: the encoder's (`frames_of`: a wav2vec 2.0 gives one
        per 320 samples; a log-mel encoder one per input frame)."""
        transcripts, lengths = getattr(self, "_fitted_on", ((), None))
        if lengths is not None:
            self._check_alignable(transcripts, frames_of(network, lengths).tolist())

    def _check_alignable(self, transcripts: list[str], frames: list[int]) -> None:
        fix = "transcribe in words (task.vocabulary=words)" if self.vocabulary == "characters" else "fix its transcript"
        for text, have in zip(transcripts, frames, strict=True):
            labels = self.units.encode(text).tolist()
            if have < (need := frames_needed(labels)):
                raise UsageError(
                    f"{_source(text)}: its {have} frames cannot align the {len(labels)} {self.vocabulary} of its transcript "
                    f"(CTC needs {need}: one per label, and a blank between repeats); remove the recording or {fix}"
                )

    def load_fitted(self, state: dict[str, Any]) -> None:
        self.vocabulary = state.get("vocabulary", self.vocabulary)
        self.units = Alphabet(tuple(state.get("alphabet", ())), self.vocabulary)

    def collate(self, targets: TargetList) -> list[torch.Tensor]:
        return [self.units.encode(text) for text in targets]

    def prepare(self, batch: Batch) -> Batch:
        """The batch cut to its longest recording's real steps: later frames are padding in every recording."""
        (x,) = batch.inputs
        longest = max(int(batch.side["lengths"].max()), 1)
        return Batch((x[..., :longest],), batch.targets, batch.extras, batch.side)

    def training_loss(self, criterion: Any, outputs: torch.Tensor, batch: Batch, network: nn.Module | None = None) -> torch.Tensor:
        return criterion(outputs, frames_of(network, batch.side["lengths"]), self.collate(batch.targets))

    def served(self, network: nn.Module) -> nn.Module:
        return FrameLogProbs(network)

    def transcribe(self, model: nn.Module, data: Samples, batch_size: int) -> tuple[list[str], list[str]]:
        """(true, greedy) transcripts of every recording, read in length order (little padding per batch)."""
        modality = modality_of(data)
        by_length = data.side["lengths"].argsort(stable=True)
        truth, guess = [], []
        for inputs, targets, side in iterate_batches(data, batch_size, order=by_length, with_side=True):
            lengths = side["lengths"]
            x = modality.model_input(inputs, data)[..., : max(int(lengths.max()), 1)]
            guess += [self.units.decode(ids) for ids in greedy_ids(model(x, lengths=lengths))]
            truth += [str(t) for t in targets]
        return truth, guess

    def validate(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, float]:
        rates = error_rates(*self.transcribe(self.served(network), val, batch_size))
        return {"val_wer": rates["wer"], "val_cer": rates["cer"]}

    def evaluate(self, model: nn.Module, test: Samples, batch_size: int, run: Run) -> Evaluation:
        truth, guess = self.transcribe(model, test, batch_size)
        return Evaluation({**error_rates(truth, guess), "utterances": len(truth)})

    def compare(self, expected: torch.Tensor, actual: torch.Tensor) -> agreement.Counts:
        """The greedy transcript of every recording."""
        same = [a == b for a, b in zip(greedy_ids(expected), greedy_ids(actual), strict=True)]
        return {"transcript_agreement": (sum(same), len(same))}

    def decode(
        self, outputs: torch.Tensor, fitted: Mapping[str, Any], top_k: int = 1, batch: ReadBatch | None = None
    ) -> list[dict[str, Any]]:
        """Each recording's greedy transcript and its confidence: the mean probability of the frames that emit a unit
        (None for an empty transcript)."""
        records = []
        best = outputs.max(-1)
        for ids, row, values in zip(greedy_ids(outputs), best.indices, best.values, strict=True):
            emitting = row != BLANK
            confidence = round(float(values[emitting].exp().mean()), 4) if emitting.any() else None
            records.append({"transcript": self.units.decode(ids), "confidence": confidence})
        return records

    def card(self, data: Samples) -> dict[str, Any]:
        front_end = data.front_end
        return {
            "alphabet": list(self.units.units),
            "vocabulary": self.vocabulary,
            "blank_id": BLANK,
            # log-mel frames per second; an encoder of waveforms makes its own frames (wav2vec 2.0: 50 per second)
            "frame_rate": front_end.sample_rate / front_end.hop_length if front_end.kind == "log_mel" else None,
            "output_meaning": (
                f"(N, frames, {len(self.units.units) + 1}) log-probabilities per frame: output 0 is CTC's blank, output i the "
                f"alphabet's unit i - 1; frames past a recording's length give the blank log-probability 0. Greedy decoding: "
                f"the best output of each frame, repeats merged, blanks dropped; {self.vocabulary} joined "
                + ("by spaces" if self.vocabulary == "words" else "as they are (' ' is a unit)")
            ),
        }


def _source(text: str) -> str:
    return getattr(text, "source", f"transcript {text!r}")
