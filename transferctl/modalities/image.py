"""Images: uint8 pixels (N, C, H, W) of one square size; models take (pixels / 255 - mean) / std per channel."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from transferctl.data.samples import Samples
from transferctl.modalities.base import Modality
from transferctl.registry import AUGMENTATIONS, MODALITIES, MODELS

MODELS.add_context("in_channels", "image_size")  # what `model_context` gives an image model
AUGMENTATIONS.add_context("hflip_default")  # what `augment_context` gives an image augmentation


@dataclass(frozen=True)
class ImageData(Samples):
    """An image split: uint8 `inputs` (N, C, H, W), its per-channel mean and std (of pixels in [0, 1]), and
    whether a horizontal flip keeps an image's meaning (not for digits)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    modality = "image"

    @property
    def channels(self) -> int:
        return self.inputs.shape[1]

    @property
    def image_size(self) -> int:
        return self.inputs.shape[-1]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]."""
    return images.float().div_(255)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@MODALITIES.register("image")
class ImageModality(Modality):
    """Images: uint8 (N, C, H, W) pixels, normalized per channel; augmented as pixels in [0, 1]."""

    input_name = "images"
    channels_last = True
    unit_signal = True
    augmentations: ClassVar[Mapping[str, str]] = {"strong": "simclr", "light": "light", "none": "none"}

    def model_context(
        self, sample_shape: tuple[int, ...], fitted: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:  # names added to MODELS' context above
        return {"in_channels": sample_shape[0], "image_size": sample_shape[-1]}

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        return to_unit(raw)

    def normalize(self, x: torch.Tensor, data: ImageData) -> torch.Tensor:
        return normalize(x, data.mean, data.std)

    def augment_context(self, data: ImageData) -> dict[str, Any]:
        return {"hflip_default": data.hflip}

    def fitted_state(self, data: ImageData) -> dict[str, Any]:
        return {"mean": list(data.mean), "std": list(data.std)}

    def as_trained(self, data: ImageData, fitted: dict[str, Any]) -> ImageData:
        return replace(data, mean=tuple(fitted["mean"]), std=tuple(fitted["std"]))

    def describe_input(self, data: ImageData) -> dict[str, Any]:
        return {
            "name": self.input_name,
            "shape": ["batch", data.channels, data.image_size, data.image_size],
            "dtype": "float32",
            "preprocessing": "x = (pixels / 255 - mean) / std, per channel, NCHW",
            "mean": list(data.mean),
            "std": list(data.std),
        }

    def to_signal(self, x: torch.Tensor, data: ImageData) -> torch.Tensor:
        m = torch.tensor(data.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(data.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x * s + m).clamp(0, 1)

    def from_signal(self, x: torch.Tensor, data: ImageData) -> torch.Tensor:
        return normalize(x, data.mean, data.std)

    def displayable(self, x: torch.Tensor, data: ImageData) -> torch.Tensor:
        m, s = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
        return (x.float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1)
