"""Audio augmentations applied to whole batches on the training device, each clip with its own parameters.

Two stages around the front end: on waveforms (N, samples) as floats in [-1, 1]: speed perturbation, a random
crop or shift of the clip, gain and additive noise at a random SNR; then on the standardized log-mel
spectrograms (N, 1, n_mels, frames): SpecAugment's time and frequency masks (filled with 0, the mean).
Randomness comes from the generator the pipeline passes in, so a seeded run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
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
    """Samples up to each clip's last non-zero one: where its zero padding starts."""
    nonzero = x != 0
    last = x.shape[1] - nonzero.flip(1).int().argmax(dim=1)
    return torch.where(nonzero.any(dim=1), last, torch.zeros_like(last))


@dataclass
class AudioAugment:
    """A random, per-clip augmentation of a batch of waveforms and then of their spectrograms."""

    clip_samples: int
    time_shift: bool = False  # the clip window at a random place: a crop of a longer recording, a shift of a shorter one
    speed: tuple[float, float] = (1.0, 1.0)  # playback rate: > 1 is faster (and higher)
    gain_db: float = 0.0  # uniform in [-gain_db, gain_db]
    noise_p: float = 0.0
    snr_db: tuple[float, float] = (10.0, 30.0)
    time_masks: int = 0
    time_mask_frames: int = 0  # each mask's width: uniform in [0, time_mask_frames]
    freq_masks: int = 0
    freq_mask_bins: int = 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Waveforms (N, samples) -> augmented clips (N, clip_samples)."""
        n, dev = x.shape[0], x.device
        if self.speed != (1.0, 1.0):
            x = _change_speed(x, _uniform(n, *self.speed, generator, dev))
        x = self._crop(x, generator)
        if self.gain_db > 0:
            x = x * 10 ** (_uniform(n, -self.gain_db, self.gain_db, generator, dev) / 20).view(n, 1)
        if self.noise_p > 0:
            x = self._add_noise(x, generator)
        return x

    def on_model_inputs(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """SpecAugment on standardized log-mel spectrograms (N, 1, n_mels, frames)."""
        n, _, bins, frames = x.shape
        for count, width, size, dim in (
            (self.time_masks, self.time_mask_frames, frames, 3),
            (self.freq_masks, self.freq_mask_bins, bins, 2),
        ):
            for _ in range(count if width else 0):
                widths = _integers(
                    torch.zeros(n, dtype=torch.long, device=x.device), torch.full((n,), min(width, size), device=x.device), generator
                )
                starts = _integers(torch.zeros_like(widths), size - widths, generator)
                position = torch.arange(size, device=x.device).view(1, -1)
                hidden = (position >= starts.view(-1, 1)) & (position < (starts + widths).view(-1, 1))
                shape = (n, 1, 1, size) if dim == 3 else (n, 1, size, 1)
                x = x.masked_fill(hidden.view(shape), 0.0)
        return x

    def _crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, stored = x.shape
        clip = self.clip_samples
        if self.time_shift:
            spare = content_length(x) - clip  # > 0: a longer recording to crop; < 0: room to shift a shorter one
            starts = _integers(spare.clamp(max=0), spare.clamp(min=0), generator)
        else:
            starts = torch.zeros(n, dtype=torch.long, device=x.device)
        index = starts.view(-1, 1) + torch.arange(clip, device=x.device).view(1, -1)
        inside = (index >= 0) & (index < stored)
        return x.gather(1, index.clamp(0, stored - 1)) * inside

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


def _change_speed(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Each waveform played `rate` times as fast (linear interpolation; zeros past its end), at the same length."""
    n, samples = x.shape
    position = torch.arange(samples, device=x.device, dtype=x.dtype).view(1, -1) * rate.view(-1, 1).to(x.dtype)
    grid_x = (2 * position + 1) / samples - 1  # align_corners=False coordinates of each output sample's source
    grid = torch.stack([grid_x, torch.zeros_like(grid_x)], dim=-1).view(n, 1, samples, 2)
    return F.grid_sample(x.view(n, 1, 1, samples), grid, mode="bilinear", padding_mode="zeros", align_corners=False).view(n, samples)


@AUGMENTATIONS.register(modality="audio")
def audio_simclr(
    clip_samples: int,
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
    clip_samples: int,
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
