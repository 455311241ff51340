"""Audio: int16 waveforms (N, samples) at one sample rate; models take a normalized log-mel spectrogram of a clip.

A split keeps each recording from its start, zero-padded to the longest one it holds, so training can crop or
shift a clip anywhere in it. Model inputs are made in two steps, as for every modality: `decode` (int16 ->
floats in [-1, 1], what the waveform augmentations act on) and `normalize`, the front end: the first
`clip_samples` of each waveform (zero-padded when shorter), its log-mel spectrogram, standardized per mel bin
with the training split's statistics. Spectrogram augmentations (SpecAugment) act after it. The front end is a
module (`LogMel`), so an export holds it in front of the network and takes raw waveforms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from transferctl.data.samples import Samples
from transferctl.errors import ConfigError, UsageError
from transferctl.modalities.base import Modality, unlabelled
from transferctl.registry import MODALITIES

LOG_FLOOR = 1e-6  # added to mel energies before the log: silence (zero padding) stays finite
INSTALL_HINT = 'pip install "transferctl[audio]"'


def torchaudio():
    """torchaudio, or a one-line error naming the extra that installs it."""
    try:
        import torchaudio as module
    except ImportError:
        raise UsageError(f"audio data needs torchaudio: {INSTALL_HINT}") from None
    return module


@dataclass(frozen=True)
class FrontEnd:
    """What turns a waveform into model inputs: the clip, the STFT and the mel scale (all in samples)."""

    sample_rate: int
    clip_samples: int
    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int

    @property
    def frames(self) -> int:
        """Spectrogram frames of a clip: one per hop that starts inside it."""
        return self.clip_samples // self.hop_length

    @classmethod
    def of(cls, sample_rate: int, clip_seconds: float, n_mels: int, window_ms: float, hop_ms: float) -> FrontEnd:
        win_length = round(sample_rate * window_ms / 1000)
        hop_length = round(sample_rate * hop_ms / 1000)
        clip_samples = round(sample_rate * clip_seconds)
        if n_mels > (1 << (win_length - 1).bit_length()) // 2 + 1:  # the STFT's frequencies
            raise ConfigError(
                f"data.n_mels: {n_mels} mel bins are more than a {window_ms} ms window at {sample_rate} Hz has frequencies; "
                f"lower n_mels or lengthen window_ms"
            )
        if not 0 < hop_length <= win_length or clip_samples < win_length:
            raise ConfigError(
                f"data: a {window_ms} ms window with a {hop_ms} ms hop does not fit a {clip_seconds} s clip at {sample_rate} Hz; "
                f"use 0 < hop_ms <= window_ms and window_ms <= clip_seconds * 1000"
            )
        return cls(sample_rate, clip_samples, 1 << (win_length - 1).bit_length(), win_length, hop_length, n_mels)


@dataclass(frozen=True)
class AudioData(Samples):
    """An audio split: int16 `inputs` (N, samples), the front end that reads them and its per-mel-bin statistics
    (of the training split's log-mel energies), and how much of each recording its data set kept (`max_samples`,
    from its start; None: not said, the clip's length then)."""

    front_end: FrontEnd
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_samples: int | None = field(default=None, kw_only=True)
    modality = "audio"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The model's input: a one-channel log-mel image (1, n_mels, frames)."""
        return (1, self.front_end.n_mels, self.front_end.frames)


class LogMel(nn.Module):
    """Waveforms (N, samples) at the front end's rate -> standardized log-mel spectrograms (N, 1, n_mels, frames).
    Longer waveforms are cut to the clip, shorter ones zero-padded at the end."""

    def __init__(self, front_end: FrontEnd, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        f = self.front_end = front_end
        self.mel = torchaudio().transforms.MelSpectrogram(
            f.sample_rate, n_fft=f.n_fft, win_length=f.win_length, hop_length=f.hop_length, n_mels=f.n_mels, power=2.0
        )
        self.register_buffer("mean", torch.tensor(mean or [0.0] * f.n_mels).view(-1, 1))
        self.register_buffer("std", torch.tensor(std or [1.0] * f.n_mels).view(-1, 1))

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(N, n_mels, frames) log mel energies of each clip, before standardization."""
        clip = self.front_end.clip_samples
        waveforms = waveforms[:, :clip]
        if waveforms.shape[1] < clip:
            waveforms = nn.functional.pad(waveforms, (0, clip - waveforms.shape[1]))
        return (self._mel_power(waveforms.float()) + LOG_FLOOR).log()[..., : self.front_end.frames]

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


@lru_cache(maxsize=16)
def _front_end_module(front_end: FrontEnd, mean: tuple[float, ...], std: tuple[float, ...], device: str) -> LogMel:
    return LogMel(front_end, mean, std).to(device).eval()


def front_end_of(data: AudioData, device: torch.device) -> LogMel:
    """The split's front end (with its statistics) on `device`, built once."""
    return _front_end_module(data.front_end, data.mean, data.std, str(device))


def log_mel_statistics(waveforms: torch.Tensor, front_end: FrontEnd, batch_size: int = 512) -> dict[str, tuple[float, ...]]:
    """Per-mel-bin mean and std of the clips' log-mel energies (int16 waveforms, read as evaluation reads them)."""
    module = LogMel(front_end)
    total = torch.zeros(front_end.n_mels, dtype=torch.float64)
    squares = torch.zeros_like(total)
    with torch.no_grad():
        for start in range(0, len(waveforms), batch_size):
            energies = module.log_mel(decode(waveforms[start : start + batch_size])).double()
            total += energies.sum(dim=(0, 2))
            squares += energies.square().sum(dim=(0, 2))
    count = max(len(waveforms), 1) * front_end.frames
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-6).sqrt()
    return {"mean": tuple(mean.tolist()), "std": tuple(std.tolist())}


def decode(raw: torch.Tensor) -> torch.Tensor:
    """int16 samples -> float in [-1, 1]."""
    return raw.float().div_(32768)


class Waveforms(nn.Module):
    """What an audio export holds: the front end, then the network (or encoder). Input: float32 waveforms."""

    def __init__(self, front_end: LogMel, network: nn.Module):
        super().__init__()
        self.front_end, self.network = front_end, network

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return self.network(self.front_end(waveforms))


@MODALITIES.register("audio")
class AudioModality(Modality):
    """Audio: int16 waveforms, read through a log-mel front end; augmented as waveforms, then as spectrograms."""

    input_name = "waveforms"
    length_axes: ClassVar[Mapping[str, int]] = {"waveforms": 1}
    augmentations: ClassVar[Mapping[str, str]] = {"strong": "audio_simclr", "light": "audio_light", "none": "none"}
    unit_signal = False  # a reconstruction is scored on the standardized log-mel itself
    inherits_fitted_state = True  # a fine-tune reads its clips through its source run's front end

    def model_context(
        self, sample_shape: tuple[int, ...], fitted: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:  # names in MODELS' context (registry.py)
        return {"in_channels": sample_shape[0], "sequence_features": sample_shape[1]}

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        return decode(raw)

    def normalize(self, x: torch.Tensor, data: AudioData) -> torch.Tensor:
        # float32 always, also inside a bf16 step (the pseudo-labels' views): the mel projection is a matmul that
        # autocast would run in bf16, and evaluation and exports read float32 spectrograms
        with torch.autocast(x.device.type, enabled=False):
            return front_end_of(data, x.device)(x.float())

    def augment_context(self, data: AudioData) -> dict[str, Any]:
        return {"clip_samples": data.front_end.clip_samples}

    def fitted_state(self, data: AudioData) -> dict[str, Any]:
        kept = {"max_samples": data.max_samples} if data.max_samples is not None else {}
        return {"front_end": asdict(data.front_end), "mean": list(data.mean), "std": list(data.std), **kept}

    def read(self, inputs: Sequence[str | Path], fitted: Mapping[str, Any]) -> AudioData:
        """Recordings as the data sets read theirs: mono, resampled to the front end's rate, kept from their start up
        to `max_samples` (the clip, where the fitted state does not say: all the model reads), zero-padded."""
        from transferctl.data.audio import decode_audio  # the data sets' reading (a module that imports this one)

        front_end = FrontEnd(**fitted["front_end"])
        max_samples = int(fitted.get("max_samples", front_end.clip_samples))
        waveforms = decode_audio([Path(p) for p in inputs], front_end.sample_rate, max_samples)
        mean, std = tuple(fitted["mean"]), tuple(fitted["std"])
        return AudioData(waveforms, **unlabelled(len(waveforms), fitted), front_end=front_end, mean=mean, std=std, max_samples=max_samples)

    def input_shape(self, fitted: Mapping[str, Any]) -> tuple[int, ...] | None:
        front_end = FrontEnd(**fitted["front_end"])
        return (1, front_end.n_mels, front_end.frames)

    def completed_fitted(self, fitted: Mapping[str, Any], options: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        """Before format 3 an audio run recorded its front end (rate, clip, STFT, mel bins), not how much of each
        recording its data set kept: the data options' max_seconds."""
        front_end = fitted.get("front_end", {})
        if "max_seconds" in options and "sample_rate" in front_end:
            return {"max_samples": round(options["max_seconds"] * front_end["sample_rate"]), **fitted}
        return dict(fitted)

    def as_trained(self, data: AudioData, fitted: dict[str, Any]) -> AudioData:
        trained = FrontEnd(**fitted["front_end"])
        if trained.sample_rate != data.front_end.sample_rate:
            raise ConfigError(
                f"data.sample_rate: {data.front_end.sample_rate} Hz differs from the {trained.sample_rate} Hz the model was trained on; "
                f"set data.sample_rate={trained.sample_rate}"
            )
        return replace(data, front_end=trained, mean=tuple(fitted["mean"]), std=tuple(fitted["std"]))

    def inherited(self, data: AudioData, source: dict[str, Any]) -> tuple[AudioData, str | None]:
        """A fine-tune reads its data through the source run's front end: its options and statistics."""
        if "front_end" not in source:
            raise UsageError("finetune.source: that run was not trained on audio; fine-tune from a run whose data set is audio")
        inherited = self.as_trained(data, source)
        ignored = {k: v for k, v in asdict(data.front_end).items() if asdict(inherited.front_end)[k] != v}
        note = None
        if ignored:
            kept = ", ".join(f"{k}={asdict(inherited.front_end)[k]}" for k in ignored)
            note = f"data: clips are read through the source run's front end ({kept}); this run's own setting has no effect"
        return inherited, note

    def served(self, module: nn.Module, fitted: dict[str, Any]) -> nn.Module:
        front_end = LogMel(FrontEnd(**fitted["front_end"]), tuple(fitted["mean"]), tuple(fitted["std"]))
        return Waveforms(front_end, module).eval()

    def export_input(self, raw: torch.Tensor, data: AudioData) -> torch.Tensor:
        clip = data.front_end.clip_samples
        waveforms = decode(raw[:, :clip])
        return nn.functional.pad(waveforms, (0, clip - waveforms.shape[1]))

    def describe_input(self, data: AudioData) -> dict[str, Any]:
        f = data.front_end
        return {
            "name": self.input_name,
            "shape": ["batch", f.clip_samples],
            "dtype": "float32",
            "sample_rate": f.sample_rate,
            "clip_seconds": f.clip_samples / f.sample_rate,
            "clip_samples": f.clip_samples,
            "preprocessing": (
                f"mono float32 samples in [-1, 1] (16-bit PCM / 32768) at {f.sample_rate} Hz: resample other rates and average "
                f"the channels; pass exactly {f.clip_samples} samples: the first ones of a recording (the clip's start, as "
                f"evaluation reads it), zero-padded at the end when it is shorter"
            ),
            "front_end": {**asdict(f), "frames": f.frames, "log": f"log(mel power + {LOG_FLOOR:g}), standardized per mel bin"},
            "mean": list(data.mean),
            "std": list(data.std),
        }

    def to_signal(self, x: torch.Tensor, data: AudioData) -> torch.Tensor:
        return x

    def from_signal(self, x: torch.Tensor, data: AudioData) -> torch.Tensor:
        return x

    def displayable(self, x: torch.Tensor, data: AudioData) -> torch.Tensor:
        """Spectrograms as images: low frequencies at the bottom, +-3 standard deviations mapped to [0, 1]."""
        return ((x.float().cpu().flip(2) + 3) / 6).clamp(0, 1).permute(0, 2, 3, 1)
