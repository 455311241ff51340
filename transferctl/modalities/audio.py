"""Audio: int16 waveforms (N, samples) at one sample rate; models take them through a front end: a standardized
log-mel spectrogram (the default) or the standardized waveform itself (models that take raw audio, `front_end`).

A split keeps each recording from its start, zero-padded to the longest one it holds, so training can crop or
shift a clip anywhere in it. Two things read it, kept apart: the clip window (`AudioData.clip_samples`: how many
samples a training or evaluation clip has, a data option of each run; None: whole recordings, for a task of inputs
of any length) and the front end (`FrontEnd`: rate, STFT, mel bins and what the model takes, with the training
split's statistics: what a fine-tune inherits from its source run). Model inputs are made in two steps, as for
every modality: `decode` (int16 -> floats in [-1, 1], what the waveform augmentations act on) and `normalize`:
the clip (the first `clip_samples` of each waveform, zero-padded when shorter; the augmentation has already cut a
training clip), then the front end, which reads a waveform of any length: `LogMel` (its log-mel spectrogram, one
frame per hop, standardized per mel bin with the training split's statistics; SpecAugment acts after it) or
`StandardWaveform` (each clip standardized over its own samples, as wav2vec2's feature extractor does). The front
end is a module, so an export holds it (behind the clip, where the run has one) in front of the network and takes
raw waveforms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from transferctl.data.audio_augment import content_length
from transferctl.data.samples import Samples
from transferctl.errors import ConfigError, UsageError
from transferctl.modalities.base import Decoded, Modality, ReadBatch, unlabelled
from transferctl.registry import MODALITIES, Entry

LOG_FLOOR = 1e-6  # added to mel energies before the log: silence (zero padding) stays finite
INSTALL_HINT = 'pip install "transferctl[audio]"'
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")  # what the audio data sets and predict read (.flac and .ogg with soundfile)


def torchaudio():
    """torchaudio, or a one-line error naming the extra that installs it."""
    try:
        import torchaudio as module
    except ImportError:
        raise UsageError(f"audio data needs torchaudio: {INSTALL_HINT}") from None
    return module


# what a model takes: the data option `front_end`, a model's meta `front_end`; raw_waveform: the samples as they are (a
# speech checkpoint whose feature extractor does not normalize, `do_normalize: false`)
FRONT_ENDS = ("log_mel", "waveform", "raw_waveform")
WAVEFORM_EPSILON = 1e-7  # added to a clip's variance before the square root, as wav2vec2's feature extractor does


def front_ends_of(model: Entry) -> tuple[str, ...]:
    """The front ends a registered model takes (its `front_end` registration: one name or several, the first its
    default; log_mel where it says none)."""
    takes = model.meta.get("front_end", FRONT_ENDS[0])
    return (takes,) if isinstance(takes, str) else tuple(takes)


@dataclass(frozen=True)
class FrontEnd:
    """What turns a waveform of any length into model inputs: the sample rate, the STFT and the mel scale (in
    samples), and `kind`: "log_mel" (spectrograms), "waveform" (the standardized samples themselves) or "raw_waveform"
    (the samples in [-1, 1] as they are)."""

    sample_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int
    kind: str = "log_mel"

    def frames(self, samples: int) -> int:
        """Spectrogram frames of a waveform of `samples`: one per hop that starts inside it."""
        return samples // self.hop_length

    def steps(self, samples: torch.Tensor) -> torch.Tensor:
        """The model-input steps of recordings of `samples` (int64, N) that no padding after them can change: the
        log-mel frames whose centred STFT window (frame t's spans t * hop +- n_fft / 2) ends inside the recording
        (frames further on read past its end, as zeros in a padded batch and reflected alone); for waveforms, the
        samples themselves. What a padded batch's encoders and losses read of each recording."""
        if self.reads_waveform:
            return samples
        inside = torch.div(samples - self.n_fft // 2, self.hop_length, rounding_mode="floor") + 1
        return torch.minimum(inside.clamp(min=0), torch.div(samples, self.hop_length, rounding_mode="floor"))

    def input_shape(self, samples: int) -> tuple[int, ...]:
        """The model's input for a waveform of `samples`: a one-channel log-mel image (1, n_mels, frames), or the
        waveform (samples,)."""
        return (samples,) if self.reads_waveform else (1, self.n_mels, self.frames(samples))

    @property
    def reads_waveform(self) -> bool:
        """Whether the model takes the samples themselves (standardized or not), not spectrograms."""
        return self.kind != "log_mel"

    @classmethod
    def of(cls, sample_rate: int, n_mels: int, window_ms: float, hop_ms: float, kind: str = "log_mel") -> FrontEnd:
        win_length = round(sample_rate * window_ms / 1000)
        hop_length = round(sample_rate * hop_ms / 1000)
        if n_mels > (1 << (win_length - 1).bit_length()) // 2 + 1:  # the STFT's frequencies
            raise ConfigError(
                f"data.n_mels: {n_mels} mel bins are more than a {window_ms} ms window at {sample_rate} Hz has frequencies; "
                f"lower n_mels or lengthen window_ms"
            )
        if not 0 < hop_length <= win_length:
            raise ConfigError(f"data: a {window_ms} ms window with a {hop_ms} ms hop at {sample_rate} Hz; use 0 < hop_ms <= window_ms")
        return cls(sample_rate, 1 << (win_length - 1).bit_length(), win_length, hop_length, n_mels, kind)

    @classmethod
    def recorded(cls, fitted: Mapping[str, Any]) -> tuple[FrontEnd, int | None]:
        """The front end and clip (None: any length) a fitted state records: `clip_samples` beside `front_end`, or,
        as runs recorded it before the two were apart (transferctl 0.8), inside it."""
        record = dict(fitted["front_end"])
        clip = record.pop("clip_samples", None)
        return cls(**record), fitted.get("clip_samples", clip)


def clip_samples_of(clip_seconds: float | None, front_end: FrontEnd) -> int | None:
    """A clip window in samples (None: whole recordings), checked against the front end's STFT window."""
    if clip_seconds is None:
        return None
    clip = round(front_end.sample_rate * clip_seconds)
    if front_end.kind == "log_mel" and clip < front_end.win_length:
        window_ms = front_end.win_length * 1000 / front_end.sample_rate
        raise ConfigError(
            f"data.clip_seconds: a {clip_seconds} s clip is shorter than the {window_ms:g} ms window at {front_end.sample_rate} Hz; "
            f"lengthen clip_seconds or shorten window_ms"
        )
    return clip


@dataclass(frozen=True)
class AudioData(Samples):
    """An audio split: int16 `inputs` (N, samples), the front end that reads them and its per-mel-bin statistics
    (of the training split's log-mel energies; none for waveforms), the clip window (`clip_samples`; None: whole
    recordings, as stored) and how much of each recording its data set kept (`max_samples`, from its start; None:
    not said, the clip's length then)."""

    front_end: FrontEnd
    mean: tuple[float, ...]
    std: tuple[float, ...]
    clip_samples: int | None = field(kw_only=True)
    max_samples: int | None = field(default=None, kw_only=True)
    modality = "audio"

    @property
    def samples(self) -> int:
        """Samples of a model's waveform: the clip's, or the stored recordings' where there is no clip."""
        return self.clip_samples if self.clip_samples is not None else self.inputs.shape[1]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The model's input: a one-channel log-mel image (1, n_mels, frames), or the waveform (samples,)."""
        return self.front_end.input_shape(self.samples)


def recording_side(samples: torch.Tensor | None, front_end: FrontEnd, clip_samples: int | None) -> dict[str, torch.Tensor]:
    """The side information of recordings read whole (no clip window): each one's `samples` and the model-input
    steps its padding cannot change (`lengths`, what the encoders mask by). Clips have none: every step is real."""
    if clip_samples is not None or samples is None:
        return {}
    return {"samples": samples, "lengths": front_end.steps(samples)}


def to_clip(waveforms: torch.Tensor, clip_samples: int | None) -> torch.Tensor:
    """The clip window of each waveform (N, samples): its first `clip_samples`, zero-padded at the end when shorter
    (None: as it is)."""
    if clip_samples is None:
        return waveforms
    waveforms = waveforms[:, :clip_samples]
    if waveforms.shape[1] < clip_samples:
        waveforms = nn.functional.pad(waveforms, (0, clip_samples - waveforms.shape[1]))
    return waveforms


class LogMel(nn.Module):
    """Waveforms (N, samples) at the front end's rate -> standardized log-mel spectrograms (N, 1, n_mels, frames),
    one frame per hop that starts inside the waveform, whatever its length (at least the window's)."""

    def __init__(self, front_end: FrontEnd, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        f = self.front_end = front_end
        self.mel = torchaudio().transforms.MelSpectrogram(
            f.sample_rate, n_fft=f.n_fft, win_length=f.win_length, hop_length=f.hop_length, n_mels=f.n_mels, power=2.0
        )
        self.register_buffer("mean", torch.tensor(mean or [0.0] * f.n_mels).view(-1, 1))
        self.register_buffer("std", torch.tensor(std or [1.0] * f.n_mels).view(-1, 1))

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(N, n_mels, frames) log mel energies of each waveform, before standardization. The centred STFT gives
        one frame more than `frames` (n_fft is even: FrontEnd.of asks for at least 8 mel bins): the last is left out."""
        return (self._mel_power(waveforms.float()) + LOG_FLOOR).log()[..., :-1]

    def _mel_power(self, waveforms: torch.Tensor) -> torch.Tensor:
        """What `self.mel(waveforms)` computes, with its window and filter bank, in a frames-first layout: the
        power |X|^2 from the real and imaginary parts, not through abs() and pow(), which costs more than the
        STFT itself on a CPU."""
        f, spectrogram = self.front_end, self.mel.spectrogram
        stft = torch.stft(
            waveforms,
            f.n_fft,
            hop_length=f.hop_length,
            win_length=f.win_length,
            window=spectrogram.window,
            center=spectrogram.center,
            pad_mode=spectrogram.pad_mode,
            onesided=spectrogram.onesided,
            return_complex=True,
        )
        parts = torch.view_as_real(stft.transpose(1, 2))  # (N, frames, frequencies, 2), contiguous
        power = torch.addcmul(parts[..., 0].square(), parts[..., 1], parts[..., 1])
        return (power @ self.mel.mel_scale.fb).transpose(1, 2)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return ((self.log_mel(waveforms) - self.mean) / self.std).unsqueeze(1)


class StandardWaveform(nn.Module):
    """Waveforms (N, samples) -> each standardized over its own content (its samples up to the last non-zero one):
    zero mean, unit variance, its zero padding kept 0, as wav2vec2's feature extractor normalizes an utterance over
    its length (`do_normalize`). No statistics of a split: a clip's are its own, whatever its length or loudness."""

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        x = waveforms.float()
        inside = torch.arange(x.shape[1], device=x.device).view(1, -1) < content_length(x).view(-1, 1)
        count = inside.sum(dim=1, keepdim=True).clamp_min(1)
        mean = x.sum(dim=1, keepdim=True) / count  # the padding is zeros: the sum is the content's
        variance = ((x - mean) * inside).square().sum(dim=1, keepdim=True) / count
        return (x - mean) / (variance + WAVEFORM_EPSILON).sqrt() * inside


class RawWaveform(nn.Module):
    """Waveforms (N, samples) as float32 samples, unchanged: for a model trained on them so (`do_normalize: false`)."""

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return waveforms.float()


def front_end_module(front_end: FrontEnd, mean: tuple[float, ...] = (), std: tuple[float, ...] = ()) -> nn.Module:
    """The module that reads waveforms as the model takes them (with the training split's statistics)."""
    if front_end.kind == "raw_waveform":
        return RawWaveform()
    return StandardWaveform() if front_end.kind == "waveform" else LogMel(front_end, mean or None, std or None)


@lru_cache(maxsize=16)
def _front_end_module(front_end: FrontEnd, mean: tuple[float, ...], std: tuple[float, ...], device: str) -> nn.Module:
    return front_end_module(front_end, mean, std).to(device).eval()


def front_end_of(data: AudioData, device: torch.device) -> nn.Module:
    """The split's front end (with its statistics) on `device`, built once."""
    return _front_end_module(data.front_end, data.mean, data.std, str(device))


def log_mel_statistics(
    waveforms: torch.Tensor,
    front_end: FrontEnd,
    clip_samples: int | None,
    batch_size: int = 512,
    lengths: torch.Tensor | None = None,
) -> dict[str, tuple[float, ...]]:
    """Per-mel-bin mean and std of the clips' log-mel energies (int16 waveforms, read as evaluation reads them:
    each cut or padded to the clip; with `lengths`, the model-input steps of whole recordings, their real frames
    alone, not the padding); none for a front end that takes waveforms, which standardizes each clip alone."""
    if front_end.reads_waveform:
        return {"mean": (), "std": ()}
    module = LogMel(front_end)
    total = torch.zeros(front_end.n_mels, dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    with torch.no_grad():
        for start in range(0, len(waveforms), batch_size):
            energies = module.log_mel(to_clip(decode(waveforms[start : start + batch_size]), clip_samples)).double()
            if lengths is None:
                count += energies.shape[0] * energies.shape[2]
            else:
                real = torch.arange(energies.shape[2]) < lengths[start : start + batch_size].view(-1, 1)
                energies = energies * real.unsqueeze(1)
                count += int(real.sum())
            total += energies.sum(dim=(0, 2))
            squares += energies.square().sum(dim=(0, 2))
    count = max(count, 1)
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-6).sqrt()
    return {"mean": tuple(mean.tolist()), "std": tuple(std.tolist())}


def decode(raw: torch.Tensor) -> torch.Tensor:
    """int16 samples -> float in [-1, 1]."""
    return raw.float().div_(32768)


class AudioReader:
    """One recording (a path, or a tar member's bytes) as the data sets read theirs (`read_clip`)."""

    def __init__(self, sample_rate: int, max_samples: int | None):
        self.sample_rate, self.max_samples = sample_rate, max_samples

    def __call__(self, source: Path | bytes, name: str) -> Decoded:
        from transferctl.data.audio import read_clip  # the data sets' reading (a module that imports this one)

        path, data = (Path(name), source) if isinstance(source, bytes) else (Path(source), None)
        return read_clip(path, self.sample_rate, self.max_samples, data=data), {}


class Waveforms(nn.Module):
    """What an audio export holds: the clip window (cut or zero-padded to exactly `clip_samples`; None: a waveform
    of any length, as it comes), the front end, then the network (or encoder). Input: float32 waveforms and, for
    a padded batch of recordings of any length, each one's length in samples (the network then reads each
    recording's steps alone: `FrontEnd.steps`)."""

    def __init__(self, front_end: nn.Module, network: nn.Module, clip_samples: int | None = None, whole: FrontEnd | None = None):
        super().__init__()
        self.front_end, self.network, self.clip_samples = front_end, network, clip_samples
        self.whole = whole  # recordings of any length, read whole through this front end: their steps follow their lengths

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.front_end(to_clip(waveforms, self.clip_samples))
        if self.whole is None:  # clips: every frame is real
            return self.network(x)
        if lengths is None:  # each waveform whole, as trained on recordings of any length
            lengths = torch.full((len(waveforms),), waveforms.shape[1], dtype=torch.long, device=waveforms.device)
        return self.network(x, lengths=self.whole.steps(lengths))


@MODALITIES.register("audio")
class AudioModality(Modality):
    """Audio: int16 waveforms, cut to the clip and read through a front end (log-mel, or the standardized waveform);
    augmented as waveforms, then (SpecAugment) as spectrograms."""

    input_name = "waveforms"
    file_types = AUDIO_SUFFIXES
    length_axes: ClassVar[Mapping[str, int]] = {"waveforms": 1}
    augmentations: ClassVar[Mapping[str, str]] = {"strong": "audio_simclr", "light": "audio_light", "none": "none"}
    unit_signal = False  # a reconstruction is scored on the standardized log-mel itself
    inherits_fitted_state = True  # a fine-tune reads its clips through its source run's front end
    samples_vary_in_length = True  # whole recordings (clips are all one length: `with_lengths` refuses those)

    def resolve_data(self, options: Mapping[str, Any], model: Entry, task: type | None) -> dict[str, Any]:
        """`front_end` follows the model (its registration's `front_end`: what it takes, one name or several, the
        first its default; log_mel where it says none); a task of inputs of any length reads whole recordings
        (`clip_seconds: null`)."""
        takes = front_ends_of(model)
        chosen: dict[str, Any] = {}
        if "front_end" not in options:
            chosen["front_end"] = takes[0]
        elif options["front_end"] in FRONT_ENDS and options["front_end"] not in takes:
            raise ConfigError(
                f"data.front_end: model '{model.name}' takes {' or '.join(takes)} inputs, not {options['front_end']}; "
                f"set data.front_end={takes[0]} (or drop it)"
            )
        if task is not None and task.variable_length:
            if options.get("clip_seconds") is not None:
                raise ConfigError(
                    f"data.clip_seconds: the task reads recordings of any length, and {options['clip_seconds']} s clips would cut "
                    f"them; set data.clip_seconds=null"
                )
            chosen["clip_seconds"] = None
        return chosen

    def model_context(
        self, sample_shape: tuple[int, ...], fitted: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:  # names in MODELS' context (registry.py)
        if len(sample_shape) == 1:  # waveforms: nothing a model sizes itself by
            return {}
        return {"in_channels": sample_shape[0], "sequence_features": sample_shape[1]}

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        return decode(raw)

    def normalize(self, x: torch.Tensor, data: AudioData) -> torch.Tensor:
        # float32 always, also inside a bf16 step (the pseudo-labels' views): the mel projection is a matmul that
        # autocast would run in bf16, and evaluation and exports read float32 spectrograms
        with torch.autocast(x.device.type, enabled=False):
            return front_end_of(data, x.device)(to_clip(x.float(), data.clip_samples))

    def augment_context(self, data: AudioData) -> dict[str, Any]:
        return {"clip_samples": data.clip_samples}

    def fitted_state(self, data: AudioData) -> dict[str, Any]:
        kept = {"max_samples": data.max_samples} if data.max_samples is not None else {}
        return {
            "front_end": asdict(data.front_end),
            "clip_samples": data.clip_samples,
            "mean": list(data.mean),
            "std": list(data.std),
            **kept,
        }

    def reader(self, fitted: Mapping[str, Any]) -> AudioReader:
        """Recordings as the data sets read theirs: mono, resampled to the front end's rate, kept from their start up
        to `max_samples` (the clip, where the fitted state does not say: all the model reads)."""
        front_end, clip = FrontEnd.recorded(fitted)
        kept = fitted.get("max_samples", clip)  # None (whole recordings, kept whole): nothing cut
        return AudioReader(front_end.sample_rate, int(kept) if kept is not None else None)

    def batch_of(self, decoded: Sequence[Decoded], fitted: Mapping[str, Any]) -> ReadBatch:
        """Zero-padded at the end to the longest (a clip model then reads its clip of each)."""
        from transferctl.data.audio import padded_clips  # the data sets' reading (a module that imports this one)

        front_end, clip = FrontEnd.recorded(fitted)
        waveforms = padded_clips([samples for samples, _ in decoded])
        kept = fitted.get("max_samples", clip)
        mean, std = tuple(fitted["mean"]), tuple(fitted["std"])
        max_samples = int(kept) if kept is not None else None
        labels = unlabelled(len(waveforms), fitted)
        samples = torch.tensor([len(samples) for samples, _ in decoded], dtype=torch.long)
        side = recording_side(samples, front_end, clip)
        data = AudioData(
            waveforms, **labels, front_end=front_end, mean=mean, std=std, clip_samples=clip, max_samples=max_samples, side=side
        )
        return ReadBatch(data, [about for _, about in decoded])

    def fitted_from_card(self, card: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        if "fitted_state" in card:
            return dict(card["fitted_state"])
        described = card["input"]  # an earlier release's card: its front end, clip and statistics
        front_end = {k: v for k, v in described["front_end"].items() if k in FrontEnd.__dataclass_fields__}
        labels = {"classes": card.get("classes") or [], "target_names": card.get("targets") or []}
        statistics = {"mean": described["mean"], "std": described["std"]}
        return {**labels, "front_end": front_end, "clip_samples": described.get("clip_samples"), **statistics}

    def input_shape(self, fitted: Mapping[str, Any]) -> tuple[int, ...] | None:
        front_end, clip = FrontEnd.recorded(fitted)
        samples = clip if clip is not None else fitted.get("max_samples")
        return front_end.input_shape(samples) if samples is not None else None

    def completed_fitted(self, fitted: Mapping[str, Any], options: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        """Before format 3 an audio run recorded its front end (rate, clip, STFT, mel bins), not how much of each
        recording its data set kept: the data options' max_seconds."""
        front_end = fitted.get("front_end", {})
        if "max_seconds" in options and "sample_rate" in front_end:
            return {"max_samples": round(options["max_seconds"] * front_end["sample_rate"]), **fitted}
        return dict(fitted)

    def as_trained(self, data: AudioData, fitted: dict[str, Any]) -> AudioData:
        trained, clip = FrontEnd.recorded(fitted)
        return replace(self._through(data, trained, fitted), clip_samples=clip)

    def _through(self, data: AudioData, front_end: FrontEnd, fitted: Mapping[str, Any]) -> AudioData:
        """`data` read through a trained front end and its statistics, at the same sample rate."""
        if front_end.sample_rate != data.front_end.sample_rate:
            raise ConfigError(
                f"data.sample_rate: {data.front_end.sample_rate} Hz differs from the {front_end.sample_rate} Hz the model was trained on; "
                f"set data.sample_rate={front_end.sample_rate}"
            )
        side = {**data.side, **recording_side(data.side.get("samples"), front_end, data.clip_samples)}
        return replace(data, front_end=front_end, mean=tuple(fitted["mean"]), std=tuple(fitted["std"]), side=side)

    def inherited(self, data: AudioData, source: dict[str, Any]) -> tuple[AudioData, str | None]:
        """A fine-tune reads its data through the source run's front end (its options and statistics), in clips of
        its own length: the clip window is the fine-tune's data option, not part of the front end."""
        if "front_end" not in source:
            raise UsageError("finetune.source: that run was not trained on audio; fine-tune from a run whose data set is audio")
        front_end, source_clip = FrontEnd.recorded(source)
        inherited = self._through(data, front_end, source)
        ignored = {k: v for k, v in asdict(data.front_end).items() if asdict(front_end)[k] != v}
        notes = []
        if ignored:
            kept = ", ".join(f"{k}={asdict(front_end)[k]}" for k in ignored)
            notes.append(f"data: clips are read through the source run's front end ({kept}); this run's own setting has no effect")
        if data.clip_samples != source_clip:
            own, source_read = (_clip_words(clip, front_end.sample_rate) for clip in (data.clip_samples, source_clip))
            notes.append(f"data.clip_seconds: this run reads {own}, its source run read {source_read}")
        return inherited, "; ".join(notes) or None

    def served(self, module: nn.Module, fitted: dict[str, Any]) -> nn.Module:
        front_end, clip = FrontEnd.recorded(fitted)
        reader = front_end_module(front_end, tuple(fitted["mean"]), tuple(fitted["std"]))
        return Waveforms(reader, module, clip, whole=front_end if clip is None else None).eval()

    def export_input_names(self, data: Samples | None = None) -> tuple[str, ...]:
        """Waveforms; for recordings of any length (no clip window), each one's length in samples beside them."""
        whole = data is not None and data.clip_samples is None
        return (self.input_name, "lengths") if whole else (self.input_name,)

    def fed_side_inputs(self) -> frozenset[str]:
        return frozenset({"lengths"})

    def export_input(self, raw: torch.Tensor, data: AudioData) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        waveforms = to_clip(decode(raw), data.clip_samples)
        if data.clip_samples is None:
            return waveforms, data.side["samples"][: len(raw)].to(raw.device)
        return waveforms

    def describe_input(self, data: AudioData) -> dict[str, Any]:
        f, clip = data.front_end, data.clip_samples
        if clip is None:
            length = f"a recording of any length (at least {f.win_length} samples)" if f.kind == "log_mel" else "a recording of any length"
            shape: list[Any] = ["batch", "samples"]
            clip_entries: dict[str, Any] = {
                "clip_seconds": None,
                "clip_samples": None,
                "lengths": "a second input, int64 (batch,): each waveform's length in samples, for a zero-padded batch",
            }
        else:
            length = (
                f"exactly {clip} samples: the first ones of a recording (the clip's start, as evaluation reads it), zero-padded "
                f"at the end when it is shorter"
            )
            shape = ["batch", clip]
            clip_entries = {"clip_seconds": clip / f.sample_rate, "clip_samples": clip}
        if f.kind == "waveform":
            front_end: dict[str, Any] = {
                "kind": f.kind,
                "sample_rate": f.sample_rate,
                "standardize": "each waveform over its samples up to its last non-zero one: zero mean, unit variance "
                f"(variance + {WAVEFORM_EPSILON:g}), zero padding kept 0",
            }
        elif f.kind == "raw_waveform":
            front_end = {"kind": f.kind, "sample_rate": f.sample_rate, "standardize": "none: the samples as they are"}
        else:
            frames = f.frames(clip) if clip is not None else "samples // hop_length"
            front_end = {**asdict(f), "frames": frames, "log": f"log(mel power + {LOG_FLOOR:g}), standardized per mel bin"}
        return {
            "name": self.input_name,
            "shape": shape,
            "dtype": "float32",
            "sample_rate": f.sample_rate,
            **clip_entries,
            "preprocessing": (
                f"mono float32 samples in [-1, 1] (16-bit PCM / 32768) at {f.sample_rate} Hz: resample other rates and average "
                f"the channels; pass {length}"
            ),
            "front_end": front_end,
            "mean": list(data.mean),
            "std": list(data.std),
        }

    def to_signal(self, x: torch.Tensor, data: AudioData) -> torch.Tensor:
        return x

    def from_signal(self, x: torch.Tensor, data: AudioData) -> torch.Tensor:
        return x

    def displayable(self, x: torch.Tensor, data: AudioData) -> torch.Tensor:
        """Spectrograms as images: low frequencies at the bottom, +-3 standard deviations mapped to [0, 1];
        standardized waveforms as their envelope (the range of each column's samples, +-3 up and down)."""
        if x.dim() == 2:
            return waveform_picture(x.float().cpu())
        return ((x.float().cpu().flip(2) + 3) / 6).clamp(0, 1).permute(0, 2, 3, 1)


def _clip_words(clip_samples: int | None, sample_rate: int) -> str:
    return "whole recordings" if clip_samples is None else f"{clip_samples / sample_rate:g} s clips"


def waveform_picture(x: torch.Tensor, height: int = 48, width: int = 192) -> torch.Tensor:
    """Waveforms (N, samples) as (N, height, width, 1) pictures of their envelope: in each of `width` columns, the
    rows between its samples' least and greatest value (+-3 at the edges) lit."""
    n, samples = x.shape
    columns = min(width, samples)
    spans = x[:, : samples - samples % columns].reshape(n, columns, -1).clamp(-3, 3)
    low, high = spans.amin(dim=2), spans.amax(dim=2)
    level = torch.linspace(3, -3, height).view(1, height, 1)
    lit = (level >= low.unsqueeze(1) - 6 / height) & (level <= high.unsqueeze(1) + 6 / height)
    return lit.float().unsqueeze(-1)
