"""Audio augmentations applied to whole batches on the training device, each clip with its own parameters.

Two stages around the front end: on waveforms (N, samples) as floats in [-1, 1]: speed perturbation, a random
crop or shift of the clip window, gain and additive noise at a random SNR; then on the standardized log-mel
spectrograms (N, 1, n_mels, frames): SpecAugment's time and frequency masks (filled with 0, the mean). A model that
takes waveforms (`front_end: waveform`) gets the first stage alone: SpecAugment leaves waveforms as they are.
Randomness comes from the generator the pipeline passes in, so a seeded run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from pydantic import Field

from transferctl.data.augment import Probability
from transferctl.registry import AUGMENTATIONS

Decibels = Annotated[float, Field(ge=0.0, le=40.0)]
SpeedRange = tuple[Annotated[float, Field(ge=0.5, le=2.0)], Annotated[float, Field(ge=0.5, le=2.0)]]
SnrRange = tuple[Annotated[float, Field(ge=-10.0, le=100.0)], Annotated[float, Field(ge=-10.0, le=100.0)]]
MaskCount = Annotated[int, Field(ge=0, le=10)]
MaskWidth = Annotated[int, Field(ge=0, le=1000)]


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _integers(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One uniform integer in [low, high] (inclusive) for each row."""
    u = torch.rand(low.shape, generator=generator, device=low.device)
    return low + (u * (high - low + 1).float()).floor().long().clamp_max(high - low)


def content_length(x: torch.Tensor) -> torch.Tensor:
    """Samples up to each clip's last non-zero one: where its zero padding starts (0 for a silent clip)."""
    position = torch.arange(1, x.shape[1] + 1, dtype=torch.int32, device=x.device)
    return torch.where(x != 0, position, 0).amax(dim=1).long()


@dataclass
class AudioAugment:
    """A random, per-clip augmentation of a batch of waveforms and then of their spectrograms."""

    clip_samples: int | None  # the clip window; None: the whole stored recording (inputs of any length)
    time_shift: bool = False  # the clip window at a random place: a crop of a longer recording, a shift of a shorter one
    speed: tuple[float, float] = (1.0, 1.0)  # playback rate: > 1 is faster (and higher)
    gain_db: float = 0.0  # uniform in [-gain_db, gain_db]
    noise_p: float = 0.0
    snr_db: tuple[float, float] = (10.0, 30.0)
    time_masks: int = 0
    time_mask_frames: int = 0  # each mask's width: uniform in [0, time_mask_frames]
    freq_masks: int = 0
    freq_mask_bins: int = 0
    _lengths: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Waveforms (N, samples) -> augmented clips (N, clip_samples; without a clip, N, samples)."""
        n, dev = x.shape[0], x.device
        rate = _uniform(n, *self.speed, generator, dev) if self.speed != (1.0, 1.0) else None
        x = self._play_window(x, rate, generator)
        if self.gain_db > 0:
            x = x * 10 ** (_uniform(n, -self.gain_db, self.gain_db, generator, dev) / 20).view(n, 1)
        if self.noise_p > 0:
            x = self._add_noise(x, generator)
        return x

    def on_model_inputs(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """SpecAugment on standardized log-mel spectrograms (N, 1, n_mels, frames); waveforms (N, samples), the
        inputs of a model that takes them, as they are (no draws)."""
        if x.dim() != 4:
            return x
        n, _, bins, frames = x.shape
        hidden_frames = self._masks(n, frames, self.time_masks, self.time_mask_frames, generator, x.device)
        hidden_bins = self._masks(n, bins, self.freq_masks, self.freq_mask_bins, generator, x.device)
        return x.masked_fill(hidden_bins.view(n, 1, bins, 1) | hidden_frames.view(n, 1, 1, frames), 0.0)

    @staticmethod
    def _masks(n: int, size: int, count: int, width: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """(n, size): True where one of each row's `count` masks, each of a width uniform in [0, width], lies."""
        hidden = torch.zeros(n, size, dtype=torch.bool, device=device)
        position = torch.arange(size, device=device).view(1, -1)
        none, widest = torch.zeros(n, dtype=torch.long, device=device), torch.full((n,), min(width, size), device=device)
        for _ in range(count if width else 0):
            widths = _integers(none, widest, generator)
            starts = _integers(none, size - widths, generator)
            hidden |= (position >= starts.view(-1, 1)) & (position < (starts + widths).view(-1, 1))
        return hidden

    def _play_window(self, x: torch.Tensor, rate: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """The clip window of each recording played `rate` times as fast (None: as recorded), at a random place in
        it with `time_shift`. Speed and window in one pass: only the window's samples are interpolated."""
        n, stored = x.shape
        clip = self.clip_samples if self.clip_samples is not None else stored
        if self.time_shift:
            played = self._content_length(x)
            if rate is not None:
                played = (played / rate).ceil().long()  # the played recording's length, in samples
            spare = played - clip  # > 0: a longer recording to crop; < 0: room to shift a shorter one
            starts = _integers(spare.clamp(max=0), spare.clamp(min=0), generator)
        else:
            starts = torch.zeros(n, dtype=torch.long, device=x.device)
        index = starts.view(-1, 1) + torch.arange(clip, device=x.device).view(1, -1)  # samples of the played recording
        if rate is not None:
            return _interpolate(x, index * rate.view(-1, 1))
        return x.gather(1, index.clamp(0, stored - 1)) * ((index >= 0) & (index < stored))

    def _content_length(self, x: torch.Tensor) -> torch.Tensor:
        """Every view of a batch reads the same waveforms: their lengths are found once, for the first."""
        if self._lengths is None or self._lengths[0] is not x:
            self._lengths = (x, content_length(x))
        return self._lengths[1]

    def _add_noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        snr = _uniform(n, *self.snr_db, generator, dev).view(n, 1)
        power = x.square().mean(dim=1, keepdim=True).clamp_min(1e-10)
        noise = torch.randn(x.shape, generator=generator, device=dev) * (power / 10 ** (snr / 10)).sqrt()
        chosen = (torch.rand(n, generator=generator, device=dev) < self.noise_p).view(n, 1)
        return torch.where(chosen, x + noise, x)

    def effects(self) -> frozenset[str]:
        """What it can do to a clip: "shift", "speed", "gain", "noise", "time_mask", "freq_mask"."""
        active = {
            "shift": self.time_shift,
            "speed": self.speed != (1.0, 1.0),
            "gain": self.gain_db > 0,
            "noise": self.noise_p > 0,
            "time_mask": self.time_masks > 0 and self.time_mask_frames > 0,
            "freq_mask": self.freq_masks > 0 and self.freq_mask_bins > 0,
        }
        return frozenset(name for name, on in active.items() if on)


def _interpolate(x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Each row of `x` (N, samples) read at fractional sample positions (N, M), linearly; zeros outside it."""
    last = x.shape[1] - 1
    left = position.floor().clamp_(0, last)
    right_weight = (position - left).to(x.dtype)
    left = left.long()
    right = (left + 1).clamp_(max=last)
    read = torch.lerp(x.gather(1, left), x.gather(1, right), right_weight)
    return read.masked_fill_((position < 0) | (position > last), 0.0)


@AUGMENTATIONS.register(modality="audio")
def audio_simclr(
    clip_samples: int | None,
    time_shift: bool = True,
    speed: SpeedRange = (0.8, 1.25),  # wide: a voice's pitch and formants move, which speakers differ in
    gain_db: Decibels = 6.0,
    noise_p: Probability = 0.5,
    snr_db: SnrRange = (5.0, 30.0),
    time_masks: MaskCount = 2,
    time_mask_frames: MaskWidth = 10,
    freq_masks: MaskCount = 2,
    freq_mask_bins: MaskWidth = 6,
) -> AudioAugment:
    """Contrastive views of audio: speed, a random crop or shift, gain, noise at a random SNR, SpecAugment masks."""
    return AudioAugment(clip_samples, time_shift, speed, gain_db, noise_p, snr_db, time_masks, time_mask_frames, freq_masks, freq_mask_bins)


@AUGMENTATIONS.register(modality="audio")
def audio_light(
    clip_samples: int | None,
    time_shift: bool = True,
    speed: SpeedRange = (0.95, 1.05),
    gain_db: Decibels = 3.0,
    noise_p: Probability = 0.0,
    snr_db: SnrRange = (20.0, 40.0),
    time_masks: MaskCount = 1,
    time_mask_frames: MaskWidth = 8,
    freq_masks: MaskCount = 1,
    freq_mask_bins: MaskWidth = 4,
) -> AudioAugment:
    """Mild augmentation for supervised training and fine-tuning on audio: shift, small speed and gain changes, light masks."""
    return AudioAugment(clip_samples, time_shift, speed, gain_db, noise_p, snr_db, time_masks, time_mask_frames, freq_masks, freq_mask_bins)
