"""Image augmentations applied to whole batches on the training device, each image with its own parameters.

One affine grid + `grid_sample` does random resized crop, rotation, translation and flip for the
whole batch; colour jitter, grayscale and Gaussian blur are batched tensor ops. Randomness comes
from the generator the engine passes in, so a seeded run is reproducible. Input and output are
float images in [0, 1] (the image modality's `decode`); normalization comes after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from transferctl.data.targets import IGNORE_INDEX as IGNORE_INDEX  # re-exported: where masks were first defined
from transferctl.data.targets import Geometry, TargetKind, Targets
from transferctl.registry import AUGMENTATIONS

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Strength = Annotated[float, Field(ge=0.0, le=1.0)]
Range = tuple[Annotated[float, Field(gt=0.0)], Annotated[float, Field(gt=0.0)]]


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _chance(n: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


@dataclass
class BatchAugment:
    """A random, per-image augmentation of a (N, C, H, W) float batch."""

    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    translate: float = 0.0  # fraction of the image size
    hflip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    padding: str = "zeros"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self == IDENTITY:
            return x
        x = self.geometry(x, generator)
        x = self.colour(x, generator)
        if self.blur_p > 0:
            x = self.blur(x, generator)
        return x

    def with_targets(self, x: torch.Tensor, targets: Targets, kind: TargetKind, generator: torch.Generator) -> tuple[torch.Tensor, Targets]:
        """The images augmented as `__call__` does, and their targets moved by the same geometry as their kind says
        (`TargetKind.follow`: masks by nearest neighbour); colour and blur touch the images only."""
        if self == IDENTITY:
            return x, targets
        geometry = Geometry(self.affine(x.shape[0], generator, x.device), (x.shape[-2], x.shape[-1]))
        x = self.colour(geometry.resample(x, "bilinear", self.padding), generator)
        if self.blur_p > 0:
            x = self.blur(x, generator)
        return x, kind.follow(targets, geometry)

    def with_masks(self, x: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`with_targets` for per-pixel class masks (N, H, W)."""
        from transferctl.data.targets import target_kind_named

        return self.with_targets(x, masks, target_kind_named("class_per_pixel"), generator)

    def effects(self) -> frozenset[str]:
        """What it can do to an image: "crop", "rotation", "translate", "hflip" (geometric), "colour", "blur"."""
        active = {
            "crop": self.crop_scale != (1.0, 1.0) or self.crop_ratio != (1.0, 1.0),
            "rotation": self.rotation > 0,
            "translate": self.translate > 0,
            "hflip": self.hflip,
            "colour": (self.jitter_p > 0 and any((self.brightness, self.contrast, self.saturation, self.hue))) or self.grayscale_p > 0,
            "blur": self.blur_p > 0,
        }
        return frozenset(name for name, on in active.items() if on)

    def per_sample(self, sample_shape: tuple[int, ...]):
        """The loader pipeline's form of this augmentation: a transform of one decoded sample."""
        return self.torchvision_transform(sample_shape[-1], sample_shape[0])

    def torchvision_transform(self, image_size: int, channels: int):
        """The same augmentation as per-image torchvision transforms (float CxHxW in [0, 1]), for the loader pipeline."""
        from torchvision.transforms import v2

        steps: list = []
        if self.crop_scale != (1.0, 1.0) or self.crop_ratio != (1.0, 1.0):
            steps.append(v2.RandomResizedCrop(image_size, scale=self.crop_scale, ratio=self.crop_ratio, antialias=True))
        if self.rotation or self.translate:
            steps.append(v2.RandomAffine(degrees=self.rotation, translate=(self.translate, self.translate)))
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        colour = channels == 3
        jitter = {
            "brightness": self.brightness,
            "contrast": self.contrast,
            "saturation": self.saturation if colour else 0.0,
            "hue": self.hue if colour else 0.0,
        }
        if self.jitter_p > 0 and any(jitter.values()):
            steps.append(v2.RandomApply([v2.ColorJitter(**{k: v for k, v in jitter.items() if v})], p=self.jitter_p))
        if colour and self.grayscale_p > 0:
            steps.append(v2.RandomGrayscale(p=self.grayscale_p))
        if self.blur_p > 0:
            radius = min(math.ceil(3 * self.blur_sigma[1]), (image_size - 1) // 2)
            steps.append(v2.RandomApply([v2.GaussianBlur(2 * radius + 1, sigma=self.blur_sigma)], p=self.blur_p))
        return v2.Compose(steps) if steps else v2.Identity()

    def geometry(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        geometry = Geometry(self.affine(x.shape[0], generator, x.device), (x.shape[-2], x.shape[-1]))
        return geometry.resample(x, "bilinear", self.padding)

    def affine(self, n: int, generator: torch.Generator, dev: torch.device) -> torch.Tensor:
        """Each image's random crop, rotation, shift and flip as an affine matrix (N, 2, 3) for `affine_grid`."""
        area = _uniform(n, *self.crop_scale, generator, dev)
        log_ratio = _uniform(n, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), generator, dev)
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)  # crop size as a fraction of the image
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = _uniform(n, -1.0, 1.0, generator, dev) * (1 - w)  # crop centre in [-1, 1] coordinates
        cy = _uniform(n, -1.0, 1.0, generator, dev) * (1 - h)
        angle = _uniform(n, -self.rotation, self.rotation, generator, dev) * (math.pi / 180)
        tx = _uniform(n, -self.translate, self.translate, generator, dev) * 2
        ty = _uniform(n, -self.translate, self.translate, generator, dev) * 2
        flip = torch.where(_chance(n, 0.5 if self.hflip else 0.0, generator, dev), -1.0, 1.0)
        cos, sin = angle.cos(), angle.sin()
        return torch.stack(
            [
                torch.stack([w * flip * cos, -h * sin, cx + tx], dim=1),
                torch.stack([w * flip * sin, h * cos, cy + ty], dim=1),
            ],
            dim=1,
        )

    def colour(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        colour = x.shape[1] == 3
        jitter = _chance(n, self.jitter_p, generator, dev)

        def factor(strength: float) -> torch.Tensor:
            f = _uniform(n, 1 - strength, 1 + strength, generator, dev)
            return torch.where(jitter, f, torch.ones_like(f)).view(n, 1, 1, 1)

        b, c, s = factor(self.brightness), factor(self.contrast), factor(self.saturation)
        hue = torch.where(jitter, _uniform(n, -self.hue, self.hue, generator, dev), torch.zeros(n, device=dev))
        gray_out = _chance(n, self.grayscale_p, generator, dev).view(n, 1, 1, 1)
        if self.brightness > 0:
            x = (x * b).clamp(0, 1)
        if self.contrast > 0:
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * c + mean).clamp(0, 1)
        if colour and self.saturation > 0:
            gray = _gray(x)
            x = ((x - gray) * s + gray).clamp(0, 1)
        if colour and self.hue > 0:
            x = _rotate_hue(x, hue * 2 * math.pi).clamp(0, 1)
        if colour and self.grayscale_p > 0:
            x = torch.where(gray_out, _gray(x).expand_as(x), x)
        return x

    def blur(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, ch, height, width = x.shape
        dev = x.device
        radius = min(math.ceil(3 * self.blur_sigma[1]), (min(height, width) - 1) // 2)
        sigma = _uniform(n, *self.blur_sigma, generator, dev)
        offsets = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
        kernel = torch.exp(-(offsets**2) / (2 * sigma.view(n, 1).to(x.dtype) ** 2))
        delta = (offsets == 0).to(x.dtype).expand(n, -1)
        kernel = torch.where(_chance(n, self.blur_p, generator, dev).view(n, 1), kernel, delta)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(ch, dim=0)
        flat = x.reshape(1, n * ch, height, width)
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * ch, 1, 1, -1), groups=n * ch)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * ch, 1, -1, 1), groups=n * ch)
        return flat.view(n, ch, height, width)


IDENTITY = BatchAugment()


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate each image's chroma by `angle` radians in YIQ space (a cheap, smooth hue shift)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device, dtype=x.dtype)
    to_rgb = torch.linalg.inv(to_yiq)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1), torch.stack([zero, sin, cos], -1)], -2)
    matrix = to_rgb @ rot @ to_yiq  # (N, 3, 3)
    return torch.einsum("nij,njhw->nihw", matrix, x)


@AUGMENTATIONS.register(modality="image")
def simclr(
    hflip_default: bool,
    crop_scale: Range = (0.3, 1.0),
    crop_ratio: Range = (0.75, 1.3333),
    rotation: Annotated[float, Field(ge=0, le=180)] = 10.0,
    translate: Strength = 0.0,
    hflip: bool | None = None,
    brightness: Strength = 0.4,
    contrast: Strength = 0.4,
    saturation: Strength = 0.4,
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.1,
    jitter_p: Probability = 0.8,
    grayscale_p: Probability = 0.2,
    blur_p: Probability = 0.0,
    padding: Literal["zeros", "border", "reflection"] = "zeros",
) -> BatchAugment:
    """SimCLR views: random resized crop, small rotation, flip (where the data allows), colour jitter, grayscale, blur.
    Saturation, hue and grayscale apply to colour images only; `hflip: null` follows the data set."""
    return BatchAugment(
        crop_scale,
        crop_ratio,
        rotation,
        translate,
        hflip_default if hflip is None else hflip,
        brightness,
        contrast,
        saturation,
        hue,
        jitter_p,
        grayscale_p,
        blur_p,
        padding=padding,
    )


@AUGMENTATIONS.register(modality="image")
def light(
    hflip_default: bool,
    crop_scale: Range = (0.8, 1.0),
    rotation: Annotated[float, Field(ge=0, le=180)] = 10.0,
    translate: Strength = 0.05,
    hflip: bool | None = None,
    padding: Literal["zeros", "border", "reflection"] = "zeros",
) -> BatchAugment:
    """Mild geometric augmentation for supervised training and fine-tuning: crop, rotation, shift, flip."""
    return BatchAugment(
        crop_scale=crop_scale,
        rotation=rotation,
        translate=translate,
        hflip=hflip_default if hflip is None else hflip,
        padding=padding,
    )


@AUGMENTATIONS.register(modality="image")
def upright(
    hflip_default: bool,
    crop_scale: Range = (0.5, 1.0),
    crop_ratio: Range = (0.75, 1.3333),
    translate: Strength = 0.1,
    hflip: bool | None = None,
    padding: Literal["zeros", "border", "reflection"] = "zeros",
) -> BatchAugment:
    """Geometric augmentation without rotation, for targets a rotation would falsify (boxes: a rotated box's envelope
    is larger than its object): crop and rescale, shift, flip; the boxes move with the image."""
    return BatchAugment(
        crop_scale=crop_scale, crop_ratio=crop_ratio, translate=translate, hflip=hflip_default if hflip is None else hflip, padding=padding
    )


@AUGMENTATIONS.register()  # no modality: fits every one
def none() -> BatchAugment:
    """No augmentation."""
    return BatchAugment()
