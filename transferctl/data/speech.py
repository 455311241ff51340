"""Speech data sets: recordings of any length with a transcript each (`target_kind: transcript`).

`fsdd_sequences` makes utterances of several digits from FSDD's real recordings, as `mnist_scenes` makes scenes of
real digits: one speaker's takes, each trimmed of its silence, joined by seeded pauses. `speech_folder` reads your
own recordings and their transcripts, laid out as Hugging Face's audiofolder lays them out. Both keep whole
recordings (no clip window): a split's side information holds each one's length (`recording_side`).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, PositiveInt

from transferctl.data.audio import (
    FrontEndKind,
    MelBins,
    Milliseconds,
    SampleRate,
    Seconds,
    audio_split,
    decode_audio_files,
    fsdd_split,
    padded_clips,
)
from transferctl.data.datasets import split_folder
from transferctl.data.targets import TargetList
from transferctl.errors import ConfigError, UsageError
from transferctl.modalities.audio import AudioData, FrontEnd
from transferctl.registry import DATASETS

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRIM_FRAME_MS, TRIM_HOP_MS = 20.0, 5.0  # the frames whose level `trim_silence` compares with the clip's peak


class Transcript(str):
    """A transcript, and where it comes from (`source`: the recording's file, or how an utterance was made), which
    a message about it names."""

    source: str

    def __new__(cls, text: str, source: str) -> Transcript:
        made = super().__new__(cls, text)
        made.source = source
        return made

    def __reduce__(self):  # pickles with its source
        return (Transcript, (str(self), self.source))


def trim_silence(samples: torch.Tensor, sample_rate: int, top_db: float) -> torch.Tensor:
    """A recording without the silence at its ends: the frames (20 ms, every 5 ms) whose RMS level lies more than
    `top_db` below its loudest frame's, at both ends (librosa.effects.trim's rule)."""
    x = samples.float()
    frame, hop = round(sample_rate * TRIM_FRAME_MS / 1000), round(sample_rate * TRIM_HOP_MS / 1000)
    if len(x) < frame:
        return samples
    rms = x.unfold(0, frame, hop).square().mean(dim=1).sqrt()
    loud = (20 * torch.log10(rms.clamp_min(1e-10) / rms.max().clamp_min(1e-10)) > -top_db).nonzero().flatten()
    if len(loud) == 0:
        return samples
    return samples[int(loud[0]) * hop : int(loud[-1]) * hop + frame]


def compose_utterances(
    clips: list[torch.Tensor],
    names: list[str],
    pools: dict[str, dict[int, list[int]]],
    count: int,
    digits: tuple[int, int],
    pause_samples: tuple[int, int],
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """`count` utterances: a speaker, then `digits[0]`..`digits[1]` digits (uniform), each a random take of that digit
    by that speaker (`pools[speaker][digit]`: indices into `clips`, drawn with replacement), with a pause (uniform in
    `pause_samples`) before, between and after them. Returns the waveforms, transcripts and each one's makings (the
    `names` of its takes)."""

    def uniform(low: int, high: int) -> int:  # inclusive
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    speakers = sorted(pools)
    waveforms, transcripts, sources = [], [], []
    for index in range(count):
        speaker = speakers[uniform(0, len(speakers) - 1)]
        spoken = sorted(pools[speaker])
        said = [spoken[uniform(0, len(spoken) - 1)] for _ in range(uniform(*digits))]
        takes = [pools[speaker][d][uniform(0, len(pools[speaker][d]) - 1)] for d in said]
        pieces = [torch.zeros(uniform(*pause_samples), dtype=torch.int16)]
        for take in takes:
            pieces += [clips[take], torch.zeros(uniform(*pause_samples), dtype=torch.int16)]
        waveforms.append(torch.cat(pieces))
        transcripts.append(" ".join(DIGIT_WORDS[d] for d in said))
        sources.append(f"utterance {index} ({' '.join(names[t] for t in takes)})")
    return waveforms, transcripts, sources


def transcribed_split(
    waveforms: list[torch.Tensor], transcripts: list[str], sources: list[str], front_end: FrontEnd, max_samples: int | None
) -> AudioData:
    lengths = torch.tensor([len(w) for w in waveforms], dtype=torch.long)
    targets = TargetList([Transcript(t, s) for t, s in zip(transcripts, sources, strict=True)])
    return audio_split(padded_clips(waveforms), lengths, targets, (), front_end, None, max_samples, target_kind="transcript")


@DATASETS.register(modality="audio", task_defaults={"vocabulary": "words"})
def fsdd_sequences(
    root: Path,
    download: bool,
    train: bool,
    split: Literal["official", "speakers"] = "official",
    test_speakers: tuple[str, ...] = ("george", "lucas"),
    train_utterances: PositiveInt = 2000,
    test_utterances: PositiveInt = 500,
    min_digits: Annotated[int, Field(ge=1, le=20)] = 2,
    max_digits: Annotated[int, Field(ge=1, le=20)] = 6,
    pause_ms: tuple[Annotated[float, Field(ge=0.0, le=2000.0)], Annotated[float, Field(ge=0.0, le=2000.0)]] = (50.0, 300.0),
    trim_db: Annotated[float, Field(gt=0.0, le=100.0)] = 40.0,
    utterance_seed: Annotated[int, Field(ge=0)] = 0,
    sample_rate: SampleRate = 8000,
    n_mels: MelBins = 40,
    window_ms: Milliseconds = 32.0,
    hop_ms: Milliseconds = 10.0,
    front_end: FrontEndKind = "log_mel",
) -> AudioData:
    """Spoken digit strings ("three one four") made of FSDD's real recordings: each utterance one speaker's takes of
    `min_digits`..`max_digits` digits, trimmed of silence (`trim_db` below the take's peak) and joined by seeded pauses
    (`pause_ms`, also before the first and after the last). `split: official`: training utterances draw takes 5-49,
    test utterances takes 0-4; `split: speakers`: test utterances are `test_speakers`', training the others'.
    `utterance_seed` seeds the composition (`data.seed` the labelled subset)."""
    if min_digits > max_digits or pause_ms[0] > pause_ms[1]:
        raise ConfigError("data: min_digits <= max_digits and pause_ms as [shortest, longest]; swap them")
    reader = FrontEnd.of(sample_rate, n_mels, window_ms, hop_ms, front_end)
    chosen = fsdd_split("fsdd_sequences", root, train, split, tuple(test_speakers))
    if not chosen:
        raise UsageError(f"data set 'fsdd_sequences': no recording falls in the {'training' if train else 'test'} split; check data.split")
    waveforms, lengths = decode_audio_files("fsdd_sequences", [p for p, _ in chosen], sample_rate, None)
    clips = [trim_silence(w[:n], sample_rate, trim_db) for w, n in zip(waveforms, lengths.tolist(), strict=True)]
    pools: dict[str, dict[int, list[int]]] = {}
    for index, (_, match) in enumerate(chosen):
        pools.setdefault(match[2], {}).setdefault(int(match[1]), []).append(index)
    pauses = (round(pause_ms[0] * sample_rate / 1000), round(pause_ms[1] * sample_rate / 1000))
    generator = torch.Generator().manual_seed(2 * utterance_seed + (0 if train else 1))
    count = train_utterances if train else test_utterances
    made = compose_utterances(clips, [path.stem for path, _ in chosen], pools, count, (min_digits, max_digits), pauses, generator)
    return transcribed_split(*made, reader, None)


SPACES = re.compile(r"\s+")


def read_metadata(name: str, folder: Path, file_column: str, text_column: str) -> list[tuple[Path, str]]:
    """(recording, transcript) rows of `folder/metadata.csv`; a missing column or file, or an empty transcript, is a
    one-line error naming the file and line."""
    metadata = folder / "metadata.csv"
    if not metadata.is_file():
        raise UsageError(f"data set '{name}': no {metadata}; put one there with a {file_column} and a {text_column} column")
    try:
        with metadata.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            columns = list(rows[0]) if rows else []
    except UnicodeDecodeError:
        raise UsageError(f"data set '{name}': {metadata} is not UTF-8 text; save it as UTF-8") from None
    except csv.Error as exc:
        raise UsageError(f"data set '{name}': {metadata} is not a CSV file ({exc}); fix it") from None
    if not rows:
        raise UsageError(f"data set '{name}': {metadata} has no rows; list the recordings in it")
    for column, option in ((file_column, "file_column"), (text_column, "text_column")):
        if column not in columns:
            raise UsageError(
                f"data set '{name}': {metadata} has no column '{column}' (it has {', '.join(columns)}); rename it or set data.{option}"
            )
    found = []
    for line, row in enumerate(rows, start=2):
        path = folder / (row[file_column] or "")
        if not row[file_column] or not path.is_file():
            raise UsageError(
                f"data set '{name}': {metadata} line {line} names {row[file_column]!r}, which is not a file in {folder}; fix the row"
            )
        text = SPACES.sub(" ", row[text_column] or "").strip()
        if not text:
            raise UsageError(
                f"data set '{name}': {metadata} line {line} gives {row[file_column]} an empty transcript; transcribe it or remove the row"
            )
        found.append((path, text))
    return found


@DATASETS.register(modality="audio")
def speech_folder(
    root: Path,
    download: bool,
    train: bool,
    train_dir: str = "train",
    test_dir: str = "test",
    file_column: str = "file_name",
    text_column: str = "text",
    sample_rate: SampleRate = 16000,
    max_seconds: Seconds = 30.0,
    n_mels: MelBins = 64,
    window_ms: Milliseconds = 25.0,
    hop_ms: Milliseconds = 10.0,
    front_end: FrontEndKind = "log_mel",
) -> AudioData:
    """Your own transcribed recordings: <root>/<train_dir>/metadata.csv (a `file_column` naming each recording, relative
    to the folder, and its `text_column` transcript) beside the recordings (.wav, .flac, .ogg), the same under
    <test_dir>; resampled once to sample_rate, downmixed to mono, kept whole up to max_seconds."""
    reader = FrontEnd.of(sample_rate, n_mels, window_ms, hop_ms, front_end)
    folder = split_folder("speech_folder", root, train, train_dir, test_dir)
    rows = read_metadata("speech_folder", folder, file_column, text_column)
    max_samples = round(max_seconds * sample_rate)
    waveforms, lengths = decode_audio_files("speech_folder", [p for p, _ in rows], sample_rate, max_samples)
    clips = [w[:n] for w, n in zip(waveforms, lengths.tolist(), strict=True)]
    return transcribed_split(clips, [t for _, t in rows], [str(p) for p, _ in rows], reader, max_samples)
