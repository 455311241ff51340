"""An autoencoder (Hinton and Salakhutdinov, 2006): the encoder's feature maps, decoded back to the input image;
denoising (Vincent et al., 2008) when the input is corrupted first, by noise or hidden patches, and the clean
image is the target. No labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from transferctl.data.samples import Samples
from transferctl.methods.reconstruction import Corruption, GaussianNoise, PatchMask, ReconstructionMethod, no_corruption
from transferctl.registry import METHODS


@METHODS.register("autoencoder")
@dataclass
class Autoencoder(ReconstructionMethod):
    """An autoencoder: the encoder's feature maps decoded back to the image; denoising with `corruption`."""

    corruption: Literal["none", "noise", "mask"] = "none"  # what the input suffers before it is encoded
    noise_std: Annotated[float, Field(gt=0.0, le=1.0)] = 0.3  # noise: its standard deviation, in pixels of [0, 1]
    mask_ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5  # mask: the share of patches hidden
    patch_size: PositiveInt = 4  # mask: the patches' side, in pixels

    def patch_in_use(self) -> int | None:
        return self.patch_size if self.corruption == "mask" else None

    def make_corruption(self, data: Samples) -> Corruption:
        if self.corruption == "noise":
            return GaussianNoise(self.noise_std, data)
        if self.corruption == "mask":
            return PatchMask(self.mask_ratio, self.patch_size, weigh_hidden=False)  # the whole clean image is the target
        return no_corruption
