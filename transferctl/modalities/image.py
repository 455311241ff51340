"""Images: uint8 pixels (N, C, H, W) of one square size; models take (pixels / 255 - mean) / std per channel.

Image files reach their square through `ImageDecoding` (size, channels, resize policy, interpolation), which a split
carries and its fitted state records, so a trained model's inputs are decoded as its training split was (`read`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from transferctl.data.samples import Samples
from transferctl.errors import UsageError
from transferctl.modalities.base import Modality, unlabelled
from transferctl.registry import MODALITIES

Resize = Literal["crop", "stretch", "letterbox"]
Interpolation = Literal["bilinear", "bicubic", "nearest"]
DECODING_KEYS = ("image_size", "channels", "resize", "interpolation")  # what the fitted state records of it


@dataclass(frozen=True)
class ImageDecoding:
    """How an image file becomes a split's uint8 pixels (`data/stream.py`'s `ImageDecoder` does it): converted to
    `channels` (1: grey, PIL's "L"; 3: RGB), then brought to an `image_size` square by `resize` with `interpolation`:
    `crop` resizes the shorter side and keeps the centre square (the identity on an image of that size already:
    what the MNIST family, CIFAR-10 and generated scenes record), `stretch` resizes both sides (the aspect ratio
    lost), `letterbox` resizes the longer side and zero-pads the rest about the centre."""

    image_size: int
    channels: int
    resize: Resize = "crop"
    interpolation: Interpolation = "bilinear"

    @classmethod
    def of(cls, fitted: Mapping[str, Any]) -> ImageDecoding:
        """The decoding a fitted state records (format 3 on; an older one, completed: `completed_fitted`)."""
        if "image_size" not in fitted:
            raise UsageError(
                "the run's fitted state does not record the image size its inputs were decoded at (a checkpoint from before "
                "format 3); read the run with its data set (evaluate or export it), or retrain it"
            )
        channels = fitted.get("channels", len(fitted.get("mean", ())) or 3)
        return cls(int(fitted["image_size"]), int(channels), fitted.get("resize", "crop"), fitted.get("interpolation", "bilinear"))

    def describe(self) -> str:
        how = {
            "crop": f"resize the shorter side to {self.image_size} and keep the centre {self.image_size}x{self.image_size}",
            "stretch": f"resize the pixels (a uint8 tensor, antialiased) to {self.image_size}x{self.image_size}, aspect ratio lost",
            "letterbox": f"resize the longer side to {self.image_size} and zero-pad the rest evenly to {self.image_size}x{self.image_size}",
        }[self.resize]
        colour = "grey (PIL mode L)" if self.channels == 1 else "RGB"
        return f"convert to {colour}; {how} ({self.interpolation}); uint8 pixels, channels first"


@dataclass(frozen=True)
class ImageData(Samples):
    """An image split: uint8 `inputs` (N, C, H, W), its per-channel mean and std (of pixels in [0, 1]), whether a
    horizontal flip keeps an image's meaning (not for digits), and how its files were decoded (None: `crop` at its
    own size, the identity on the images a data set holds as they are)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    decoding: ImageDecoding | None = field(default=None, kw_only=True)
    modality = "image"

    @property
    def channels(self) -> int:
        return self.inputs.shape[1]

    @property
    def image_size(self) -> int:
        return self.inputs.shape[-1]

    @property
    def decoded_as(self) -> ImageDecoding:
        return self.decoding or ImageDecoding(self.image_size, self.channels)


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
    ) -> dict[str, Any]:  # names in MODELS' context (registry.py)
        return {"in_channels": sample_shape[0], "image_size": sample_shape[-1]}

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        return to_unit(raw)

    def normalize(self, x: torch.Tensor, data: ImageData) -> torch.Tensor:
        return normalize(x, data.mean, data.std)

    def augment_context(self, data: ImageData) -> dict[str, Any]:
        return {"hflip_default": data.hflip}

    def fitted_state(self, data: ImageData) -> dict[str, Any]:
        d = data.decoded_as
        return {"mean": list(data.mean), "std": list(data.std), **{k: getattr(d, k) for k in DECODING_KEYS}}

    def read(self, inputs: Sequence[str | Path], fitted: Mapping[str, Any]) -> ImageData:
        from transferctl.data.datasets import decode_image_files  # the data sets' decoding (a module that imports this one)

        d = ImageDecoding.of(fitted)
        images = decode_image_files(None, [Path(p) for p in inputs], d.image_size, d.channels, d.resize, d.interpolation, cache=False)
        mean, std = tuple(fitted["mean"]), tuple(fitted["std"])
        return ImageData(inputs=images, **unlabelled(len(images), fitted), mean=mean, std=std, hflip=False, decoding=d)

    def input_shape(self, fitted: Mapping[str, Any]) -> tuple[int, ...] | None:
        if "image_size" not in fitted:
            return None
        d = ImageDecoding.of(fitted)
        return (d.channels, d.image_size, d.image_size)

    def completed_fitted(self, fitted: Mapping[str, Any], options: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        """Before format 3 an image run recorded its mean and std only: its channels are theirs; its size is the data
        options' image_size where the data set has one (else unknown: the data set holds images of one size as they are,
        which its test split shows); its resize policy and interpolation are the data set's (`resize=` in its
        registration; `crop` and bilinear by default)."""
        defaults: dict[str, Any] = {"channels": options.get("channels", len(fitted.get("mean", ())) or 3)}
        if "image_size" in options:
            defaults["image_size"] = options["image_size"]
        defaults["resize"], defaults["interpolation"] = meta.get("resize", "crop"), meta.get("interpolation", "bilinear")
        return {**defaults, **fitted}

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
            **{k: getattr(data.decoded_as, k) for k in DECODING_KEYS},
            "decoding": f"an image file as the training split decoded it: {data.decoded_as.describe()}",
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
