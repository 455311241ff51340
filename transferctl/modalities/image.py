"""Images: uint8 pixels (N, C, H, W) of one square size; models take (pixels / 255 - mean) / std per channel.

Image files reach their square through `ImageDecoding` (size, channels, resize policy, interpolation), which a split
carries and its fitted state records, so a trained model's inputs are decoded as its training split was (`read`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS

from transferctl.data.samples import Samples
from transferctl.data.targets import Placement
from transferctl.errors import UsageError
from transferctl.modalities.base import Decoded, Modality, ReadBatch, unlabelled
from transferctl.registry import MODALITIES

Resize = Literal["crop", "stretch", "letterbox"]
Interpolation = Literal["bilinear", "bicubic", "nearest"]
DECODING_KEYS = ("image_size", "channels", "resize", "interpolation", "crop_fraction")  # what the fitted state records of it


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
    crop_fraction: float = 1.0  # `crop`: the shorter side resized to image_size / crop_fraction (timm's crop_pct)

    @classmethod
    def of(cls, fitted: Mapping[str, Any]) -> ImageDecoding:
        """The decoding a fitted state records (format 3 on; an older one, completed: `completed_fitted`)."""
        if "image_size" not in fitted:
            raise UsageError(
                "the run's fitted state does not record the image size its inputs were decoded at (a checkpoint from before "
                "format 3); read the run with its data set (evaluate or export it), or retrain it"
            )
        channels = fitted.get("channels", len(fitted.get("mean", ())) or 3)
        resize, interpolation = fitted.get("resize", "crop"), fitted.get("interpolation", "bilinear")
        return cls(int(fitted["image_size"]), int(channels), resize, interpolation, float(fitted.get("crop_fraction", 1.0)))

    def describe(self) -> str:
        how = {
            "crop": f"resize the shorter side to {self.scaled_size} and keep the centre {self.image_size}x{self.image_size}",
            "stretch": f"resize the pixels (a uint8 tensor, antialiased) to {self.image_size}x{self.image_size}, aspect ratio lost",
            "letterbox": f"resize the longer side to {self.image_size} and zero-pad the rest evenly to {self.image_size}x{self.image_size}",
        }[self.resize]
        colour = "grey (PIL mode L)" if self.channels == 1 else "RGB"
        return f"convert to {colour}; {how} ({self.interpolation}); uint8 pixels, channels first"

    @property
    def scaled_size(self) -> int:
        """What `crop` resizes the shorter side to (`image_transform`'s)."""
        from transferctl.data.stream import scaled_size  # a module that imports this one

        return scaled_size(self.image_size, self.crop_fraction)

    def placement(self, width: int, height: int) -> Placement:
        """Where an image of `width` x `height` lies in the square it is decoded to, as `image_transform` puts it there."""
        size = self.image_size
        if self.resize == "stretch":
            return Placement(width, height, width / size, height / size)
        if self.resize == "letterbox":
            scale = size / max(width, height)
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
            return Placement(width, height, width / new_w, height / new_h, (size - new_w) // 2, (size - new_h) // 2)
        # crop: torchvision's Resize(scaled) brings the shorter side to scaled and the longer to int(scaled * long / short),
        # then CenterCrop keeps the square of size at round((side - size) / 2)
        scaled = self.scaled_size
        if width <= height:
            new_w, new_h = scaled, int(scaled * height / width)
        else:
            new_w, new_h = int(scaled * width / height), scaled
        left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
        return Placement(width, height, width / new_w, height / new_h, -left, -top)


class ImageReader:
    """One image file (a path, or a tar member's bytes) as the training split decoded its files, and its own size."""

    def __init__(self, decoding: ImageDecoding):
        from transferctl.data.stream import ImageDecoder  # the data sets' decoding (a module that imports this one)

        d = decoding
        self.decoder = ImageDecoder(d.image_size, d.channels, d.resize, d.interpolation, d.crop_fraction)

    def __call__(self, source: Path | bytes, name: str) -> Decoded:
        from PIL import Image

        from transferctl.data.stream import UNREADABLE

        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image.load()
                return self.decoder.decode(image), {"size": image.size}
        except UNREADABLE as exc:  # PIL's UnidentifiedImageError is an OSError
            raise UsageError(f"cannot read {name} as an image ({type(exc).__name__}); give an image file (PNG, JPEG, ...)") from None


class Pixels(nn.Module):
    """What an image export holds: raw pixels (float32 in [0, 255], NCHW) normalized as training read them, then the
    module; a caller needs no mean and std."""

    def __init__(self, module: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.network = module
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network((pixels / 255 - self.mean) / self.std)


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
    file_types = tuple(IMG_EXTENSIONS)
    channels_last = True
    unit_signal = True
    augmentations: ClassVar[Mapping[str, str]] = {"strong": "simclr", "light": "light", "upright": "upright", "none": "none"}

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

    def reader(self, fitted: Mapping[str, Any]) -> ImageReader:
        return ImageReader(ImageDecoding.of(fitted))

    def batch_of(self, decoded: Sequence[Decoded], fitted: Mapping[str, Any]) -> ReadBatch:
        d = ImageDecoding.of(fitted)
        empty = torch.empty((0, d.channels, d.image_size, d.image_size), dtype=torch.uint8)
        images = torch.stack([pixels for pixels, _ in decoded]) if decoded else empty
        mean, std = tuple(fitted["mean"]), tuple(fitted["std"])
        data = ImageData(inputs=images, **unlabelled(len(images), fitted), mean=mean, std=std, hflip=False, decoding=d)
        return ReadBatch(data, [{} for _ in decoded], [d.placement(*about["size"]) for _, about in decoded])

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

    def with_statistics(self, data: ImageData, statistics: Mapping[str, Any]) -> ImageData:
        """A three-channel mean on grey images normalizes each as three equal channels (the broadcast makes them)."""
        return replace(data, mean=tuple(statistics["mean"]), std=tuple(statistics["std"]))

    def as_trained(self, data: ImageData, fitted: dict[str, Any]) -> ImageData:
        return replace(data, mean=tuple(fitted["mean"]), std=tuple(fitted["std"]))

    def served(self, module: nn.Module, fitted: dict[str, Any]) -> nn.Module:
        return Pixels(module, tuple(fitted["mean"]), tuple(fitted["std"])).eval()

    def export_input(self, raw: torch.Tensor, data: ImageData) -> torch.Tensor:
        return raw.float()

    def card_input(self, raw: torch.Tensor, data: ImageData, card: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """Exports before 0.10 take normalized images (their card's input has no `normalization`)."""
        inside = card.get("input", {}).get("normalization") == "in_model"
        return (self.export_input(raw, data) if inside else self.model_input(raw, data),)

    def fitted_from_card(self, card: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        if "fitted_state" in card:
            return dict(card["fitted_state"])
        described = card["input"]  # an earlier release's card: its input's shape, statistics and decoding
        channels, size = described["shape"][1], described["shape"][-1]
        decoding = {"image_size": size, "channels": channels, "resize": "crop", "interpolation": "bilinear"}
        decoding |= {k: described[k] for k in DECODING_KEYS if k in described}
        labels = {"classes": card.get("classes") or [], "target_names": card.get("targets") or []}
        return {**labels, "mean": described["mean"], "std": described["std"], **decoding}

    def describe_input(self, data: ImageData) -> dict[str, Any]:
        return {
            "name": self.input_name,
            "shape": ["batch", data.channels, data.image_size, data.image_size],
            "dtype": "float32",
            "normalization": "in_model",
            "preprocessing": "none beyond decoding: pixels as float32 in [0, 255], NCHW; the model divides them by 255 and "
            "normalizes them with mean and std per channel itself",
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
