"""Audio data sets: `fsdd` (the Free Spoken Digit Dataset) and `audio_folder`, the user's own recordings.

Files are read once (16-bit PCM `.wav` through the standard `wave` module, other formats through `soundfile`),
downmixed to mono, resampled to `sample_rate` (torchaudio), kept from their start up to `max_seconds`, and
stacked into one zero-padded int16 tensor, which the decoded cache keeps for the next run. The clip window
(`clip_seconds`; null: whole recordings) and the front end (`front_end`: log_mel or waveform, with the STFT and mel
options) are separate options; the split's log-mel statistics (of its clips) are computed once here, and the front
end (`modalities/audio.py`) reads every batch with them.
"""

from __future__ import annotations

import io
import re
import wave
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from transferctl.data.datasets import cached_decoding, missing_data, split_folder, user_label_sets
from transferctl.data.targets import Targets
from transferctl.errors import UsageError
from transferctl.modalities.audio import (
    AUDIO_SUFFIXES,
    AudioData,
    FrontEnd,
    clip_samples_of,
    log_mel_statistics,
    recording_side,
    torchaudio,
)
from transferctl.registry import DATASETS

Seconds = Annotated[float, Field(gt=0.0, le=60.0)]
Milliseconds = Annotated[float, Field(gt=0.0, le=1000.0)]
SampleRate = Annotated[int, Field(ge=1000, le=192_000)]
MelBins = Annotated[int, Field(ge=8, le=256)]
FrontEndKind = Literal["log_mel", "waveform", "raw_waveform"]  # what the model takes: log-mel spectrograms or the waveform itself


# --------------------------------------------------------------------------- reading files


def read_audio(name: str | None, path: Path, data: bytes | None = None) -> tuple[torch.Tensor, int]:
    """A file's samples as mono float32 in [-1, 1], and its sample rate; a file that is not audio, is cut short
    or holds no samples is a one-line error naming it (and data set `name`, where a data set reads it). `data`: the
    file's bytes where they are not at `path` (a tar member; `path` then names it)."""
    where, fix = (f"data set '{name}': ", "remove or replace it") if name is not None else ("", "give a .wav, .flac or .ogg recording")
    source = io.BytesIO(data) if data is not None else path
    try:
        samples, rate = _read_pcm_wav(source) if path.suffix.lower() == ".wav" else _read_soundfile(source)
    except (wave.Error, EOFError, RuntimeError, ValueError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"{where}cannot read {path} as audio ({reason}); {fix}") from None
    if samples.numel() == 0:
        raise UsageError(f"{where}{path} holds no samples; {'remove it' if name is not None else fix}")
    return samples, rate


def _read_pcm_wav(path: Path | io.BytesIO) -> tuple[torch.Tensor, int]:
    """PCM `.wav` (8, 16, 24 or 32 bit); other encodings go to soundfile."""
    try:
        with wave.open(path if isinstance(path, io.BytesIO) else str(path), "rb") as reader:
            channels, width, frames, rate = reader.getnchannels(), reader.getsampwidth(), reader.getnframes(), reader.getframerate()
            data = reader.readframes(frames)
    except wave.Error as exc:
        if "unknown format" in str(exc):  # IEEE float or compressed: not PCM
            if isinstance(path, io.BytesIO):
                path.seek(0)
            return _read_soundfile(path)
        raise
    if len(data) < frames * channels * width:
        raise EOFError(f"truncated: its header promises {frames} samples, it holds {len(data) // (channels * width)}")
    return _pcm_to_float(data, width, channels), rate


def _pcm_to_float(data: bytes, width: int, channels: int) -> torch.Tensor:
    if not data:
        return torch.zeros(0)  # torch.frombuffer refuses an empty buffer
    if width == 1:  # 8-bit wav is unsigned
        values = torch.frombuffer(bytearray(data), dtype=torch.uint8).float().sub_(128).div_(128)
    elif width == 3:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, 3).int()
        values = (raw[:, 0] | raw[:, 1] << 8 | raw[:, 2] << 16).float()
        values = torch.where(values >= 2**23, values - 2**24, values).div_(2**23)
    elif width in (2, 4):
        dtype = torch.int16 if width == 2 else torch.int32
        values = torch.frombuffer(bytearray(data), dtype=dtype).float().div_(2 ** (8 * width - 1))
    else:
        raise ValueError(f"{8 * width}-bit PCM is not read; convert it to 16-bit")
    return values.view(-1, channels).mean(dim=1)


def _read_soundfile(path: Path | io.BytesIO) -> tuple[torch.Tensor, int]:
    try:
        import soundfile
    except ImportError:
        raise UsageError('reading .flac and .ogg files needs soundfile: pip install "transferctl[audio]"') from None
    samples, rate = soundfile.read(path if isinstance(path, io.BytesIO) else str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(samples).mean(dim=1), rate


def decode_audio_files(name: str, paths: list[Path], sample_rate: int, max_samples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio files as one int16 tensor (N, longest kept length) and each one's kept length in samples (N,):
    `decode_audio`, kept decoded in the cache so the next run skips reading."""
    options = f"audio-lengths:{sample_rate}:{max_samples}"
    decoded = cached_decoding(paths, options, lambda: decode_audio(paths, sample_rate, max_samples, name))
    return decoded["waveforms"], decoded["lengths"]


def decode_audio(paths: list[Path], sample_rate: int, max_samples: int | None, name: str | None = None) -> dict[str, torch.Tensor]:
    """Audio files as one int16 tensor (N, longest kept length): each `read_clip`, zero-padded at the end
    (`padded_clips`), and their lengths. The audio data sets read their files with it (`name`: the data set, for messages)."""
    clips = [read_clip(path, sample_rate, max_samples, name) for path in paths]
    return {"waveforms": padded_clips(clips), "lengths": torch.tensor([len(c) for c in clips], dtype=torch.long)}


def read_clip(path: Path, sample_rate: int, max_samples: int | None, name: str | None = None, data: bytes | None = None) -> torch.Tensor:
    """One recording as the audio data sets keep theirs: int16, mono, at `sample_rate`, from its start up to
    `max_samples` (None: whole). `data`: its bytes where they are not at `path` (a tar member)."""
    samples, rate = read_audio(name, path, data)
    if rate != sample_rate:
        samples = torchaudio().functional.resample(samples, rate, sample_rate)
    return (samples[:max_samples].clamp(-1, 1) * 32767).round().to(torch.int16)


def padded_clips(clips: list[torch.Tensor]) -> torch.Tensor:
    """Clips of any lengths as one int16 tensor (N, the longest), zero-padded at the end."""
    out = torch.zeros(len(clips), max((len(c) for c in clips), default=1), dtype=torch.int16)
    for row, clip in zip(out, clips, strict=True):
        row[: len(clip)] = clip
    return out


def audio_split(
    waveforms: torch.Tensor,
    lengths: torch.Tensor,
    targets: Targets,
    classes: tuple[str, ...],
    front_end: FrontEnd,
    clip_samples: int | None,
    max_samples: int | None = None,
    target_kind: str = "class",
) -> AudioData:
    """A split of recordings (int16, zero-padded) of `lengths` samples; read whole (no clip), each one's lengths are
    its side information, and the log-mel statistics count its real frames alone."""
    side = recording_side(lengths, front_end, clip_samples)
    statistics = log_mel_statistics(waveforms, front_end, clip_samples, lengths=side.get("lengths"))
    return AudioData(
        waveforms,
        targets,
        classes,
        front_end,
        **statistics,
        clip_samples=clip_samples,
        max_samples=max_samples,
        side=side,
        target_kind=target_kind,
    )


# --------------------------------------------------------------------------- data sets

FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)$")
FSDD_TEST_TAKES = 5  # the data set's own split: takes 0-4 of every digit and speaker are the test set


def fsdd_split(name: str, root: Path, train: bool, split: str, test_speakers: tuple[str, ...]) -> list[tuple[Path, re.Match]]:
    """FSDD's recordings in the training or test split, each with its name's digit, speaker and take (a match of
    FSDD_NAME): `official` tests on takes 0-4, `speakers` on `test_speakers`. A missing folder, a misnamed file or
    an unknown test speaker is a one-line error naming data set `name`."""
    folder = root / "FSDD" / "recordings"
    recordings = sorted(folder.glob("*.wav")) if folder.is_dir() else []
    if not recordings:
        raise missing_data(name, root, "FSDD/recordings/*.wav")
    named = [(path, FSDD_NAME.match(path.stem)) for path in recordings]
    if bad := next((path for path, match in named if match is None), None):
        raise UsageError(f"data set '{name}': {bad.name} is not named {{digit}}_{{speaker}}_{{take}}.wav; remove or rename it")
    speakers = {match[2] for _, match in named}
    if split == "speakers" and (unknown := sorted(set(test_speakers) - speakers)):
        raise UsageError(f"data.test_speakers: {', '.join(unknown)} not among the speakers ({', '.join(sorted(speakers))}); name them")
    in_test = (lambda m: int(m[3]) < FSDD_TEST_TAKES) if split == "official" else (lambda m: m[2] in test_speakers)
    return [(path, match) for path, match in named if in_test(match) != train]


@DATASETS.register(modality="audio")
def fsdd(
    root: Path,
    download: bool,
    train: bool,
    split: Literal["official", "speakers"] = "official",
    test_speakers: tuple[str, ...] = ("george", "lucas"),
    sample_rate: SampleRate = 8000,
    clip_seconds: Seconds | None = 1.0,
    max_seconds: Seconds = 2.5,
    n_mels: MelBins = 40,
    window_ms: Milliseconds = 32.0,
    hop_ms: Milliseconds = 10.0,
    front_end: FrontEndKind = "log_mel",
) -> AudioData:
    """Free Spoken Digit Dataset: 3,000 recordings of the digits 0-9 by 6 speakers at 8 kHz; `split: official` tests on
    takes 0-4 (300 clips), `split: speakers` on every clip of `test_speakers`."""
    reader = FrontEnd.of(sample_rate, n_mels, window_ms, hop_ms, front_end)
    clip_samples = clip_samples_of(clip_seconds, reader)
    chosen = [(path, int(match[1])) for path, match in fsdd_split("fsdd", root, train, split, test_speakers)]
    max_samples = round(max_seconds * sample_rate)
    waveforms, lengths = decode_audio_files("fsdd", [p for p, _ in chosen], sample_rate, max_samples)
    targets = torch.tensor([digit for _, digit in chosen], dtype=torch.long)
    return audio_split(waveforms, lengths, targets, tuple(str(d) for d in range(10)), reader, clip_samples, max_samples)


@DATASETS.register(modality="audio")
def audio_folder(
    root: Path,
    download: bool,
    train: bool,
    train_dir: str = "train",
    test_dir: str = "test",
    sample_rate: SampleRate = 16000,
    clip_seconds: Seconds | None = 1.0,
    max_seconds: Seconds = 4.0,
    n_mels: MelBins = 64,
    window_ms: Milliseconds = 25.0,
    hop_ms: Milliseconds = 10.0,
    front_end: FrontEndKind = "log_mel",
    labels_file: str | None = None,
    target_kind: str = "class",
) -> AudioData:
    """Your own recordings: <root>/<train_dir>/<class>/*.wav (also .flac, .ogg) and the same under <test_dir>;
    resampled to sample_rate, downmixed to mono. With `labels_file` (multi-label): <root>/<train_dir>/<labels_file>, a
    CSV `file,labels` naming each recording under the split folder and its labels separated by `|`; the same under
    <test_dir>."""
    reader = FrontEnd.of(sample_rate, n_mels, window_ms, hop_ms, front_end)
    clip_samples = clip_samples_of(clip_seconds, reader)
    folder = split_folder("audio_folder", root, train, train_dir, test_dir)
    max_samples = round(max_seconds * sample_rate)
    if labels_file is not None or target_kind == "class_set":
        paths, label_sets, classes = user_label_sets("audio_folder", root, folder, train_dir, labels_file)
        waveforms, lengths = decode_audio_files("audio_folder", paths, sample_rate, max_samples)
        return audio_split(waveforms, lengths, label_sets, classes, reader, clip_samples, max_samples, target_kind="class_set")
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    files = [(path, index) for index, cls in enumerate(classes) for path in sorted((folder / cls).iterdir()) if _is_audio(path)]
    if not files:
        raise UsageError(f"data set 'audio_folder': {folder} has no class folders with recordings; put them in {folder}/<class>/*.wav")
    empty = sorted(set(classes) - {classes[i] for _, i in files})
    if empty:
        raise UsageError(f"data set 'audio_folder': class folder {folder / empty[0]} has no recordings; add some or remove it")
    waveforms, lengths = decode_audio_files("audio_folder", [p for p, _ in files], sample_rate, max_samples)
    targets = torch.tensor([i for _, i in files], dtype=torch.long)
    return audio_split(waveforms, lengths, targets, classes, reader, clip_samples, max_samples)


def _is_audio(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith(".")
