"""Masked autoencoding for conv encoders, as MAE (He et al., 2022) and SparK (Tian et al., 2023) pretrain: hide a
random share of image patches, reconstruct the hidden pixels, and count the loss on the hidden patches only,
optionally on per-patch normalized pixels. The mask is applied to the input (hidden patches hold the data set's
mean), not again at every stage as SparK's sparse convolutions do. No labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, PositiveInt

from transferctl.data.samples import Samples
from transferctl.errors import ConfigError
from transferctl.methods.reconstruction import Corruption, PatchMask, ReconstructionMethod
from transferctl.registry import METHODS

if TYPE_CHECKING:
    from transferctl.config import Config
    from transferctl.distributed import World


@METHODS.register("mae")
@dataclass
class MaskedAutoencoder(ReconstructionMethod):
    """Masked autoencoding (MAE, SparK) for conv encoders: hidden patches reconstructed, the loss on them alone."""

    mask_ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.75  # the share of patches hidden
    patch_size: PositiveInt = 4  # the patches' side, in pixels; it must divide the image
    norm_pix_loss: bool = False  # targets: each patch's pixels normalized by its own mean and standard deviation

    def check(self, cfg: Config, ranks: World) -> None:
        super().check(cfg, ranks)
        if self.norm_pix_loss and cfg.loss.name == "bce":
            raise ConfigError(
                "method.norm_pix_loss: per-patch normalized targets are not in [0, 1], which loss 'bce' needs; use loss.name=mse"
            )

    def make_corruption(self, data: Samples) -> Corruption:
        return PatchMask(self.mask_ratio, self.patch_size, weigh_hidden=True)

    def patch_in_use(self) -> int | None:
        return self.patch_size

    def norm_pix_patch(self) -> int | None:
        return self.patch_size if self.norm_pix_loss else None
