"""Batched augmentation: per-image randomness, seeding, identity, ranges."""

from __future__ import annotations

import torch

from transferctl.data.augment import BatchAugment, light, simclr
from transferctl.modalities.image import normalize


def batch(n=8, channels=1, size=28) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_dtypes_and_range():
    for channels in (1, 3):
        x = batch(channels=channels)
        out = simclr(hflip_default=True, blur_p=0.5)(x, gen())
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1


def test_each_image_gets_its_own_parameters():
    x = batch(1).expand(4, 1, 28, 28).contiguous()  # four copies of one image
    out = simclr(hflip_default=False)(x, gen())
    assert not torch.allclose(out[0], out[1])


def test_same_seed_same_batch_different_seed_different_batch():
    augment, x = simclr(hflip_default=True, blur_p=0.5), batch(channels=3, size=32)
    assert torch.equal(augment(x, gen(5)), augment(x, gen(5)))
    assert not torch.equal(augment(x, gen(5)), augment(x, gen(6)))


def test_identity_parameters_give_back_the_input():
    x = batch(channels=3)
    assert torch.equal(BatchAugment()(x, gen()), x)
    geometry_only = BatchAugment(rotation=0.0, crop_scale=(1.0, 1.0), jitter_p=1.0)  # runs grid_sample
    assert torch.allclose(geometry_only.geometry(x, gen()), x, atol=1e-5)


def test_flip_mirrors_about_half_the_images_and_only_when_asked():
    x = batch(64)  # random pixels: no image is its own mirror image
    out = BatchAugment(hflip=True).geometry(x, gen())
    kept = torch.tensor([torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x, strict=True)])
    mirrored = torch.tensor([torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x, strict=True)])
    assert (kept ^ mirrored).all()  # each image comes back as it was or mirrored, nothing else
    assert 16 <= int(mirrored.sum()) <= 48  # a coin per image (seeded: 28 of 64), not all or none
    assert torch.allclose(BatchAugment(hflip=False).geometry(x, gen()), x, atol=1e-5)  # off: none is mirrored


def test_blur_smooths_and_keeps_the_mean():
    x = batch(4)
    blurred = BatchAugment(blur_p=1.0, blur_sigma=(1.5, 1.5)).blur(x, gen())
    assert blurred.std() < x.std()
    assert torch.allclose(blurred.mean(), x.mean(), atol=0.02)


def test_colour_ops_leave_grey_images_alone():
    """Saturation, hue and grayscale act on colour images only: on grey ones they change no pixel."""
    colour_only = BatchAugment(saturation=0.5, hue=0.2, jitter_p=1.0, grayscale_p=1.0)
    grey = batch(channels=1)
    assert torch.equal(colour_only.colour(grey, gen()), grey)
    as_colour = grey.expand(-1, 3, -1, -1).contiguous() * torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1, 1)
    assert not torch.allclose(colour_only.colour(as_colour, gen()), as_colour, atol=1e-3)  # they do act on colour
    out = simclr(hflip_default=False, grayscale_p=1.0, saturation=0.5, hue=0.2)(grey, gen())
    assert out.shape == grey.shape


def test_grayscale_makes_channels_equal():
    out = BatchAugment(grayscale_p=1.0).colour(batch(channels=3), gen())
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_light_respects_the_data_sets_flip_default():
    assert light(hflip_default=True).hflip and not light(hflip_default=False).hflip
    assert not light(hflip_default=True, hflip=False).hflip


def test_normalize():
    x = torch.full((2, 1, 4, 4), 0.5)
    assert torch.allclose(normalize(x, (0.25,), (0.5,)), torch.full_like(x, 0.5))
