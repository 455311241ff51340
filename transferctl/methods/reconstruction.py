"""What the reconstruction methods (`autoencoder`, `mae`) share: a decoder head over the encoder's feature maps,
the corruptions (noise, hidden patches) and their random draws, the objective, the evaluation (k-NN of the encoder
and the reconstruction error) and reconstructions.png. Targets are the
modality's signal (`Modality.to_signal`): pixels of images, standardized log-mel spectrograms of audio."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn

from transferctl import plots
from transferctl.data.samples import Batch, Samples, iterate_batches
from transferctl.data.stream import is_streamed
from transferctl.distributed import world
from transferctl.engine.evaluate import Evaluation
from transferctl.engine.train import Selection
from transferctl.errors import ConfigError
from transferctl.methods.base import Export, Method, OwnGenerator, Parts, knn_metrics
from transferctl.modalities import dataset_modality, modality_named, modality_of
from transferctl.modalities.base import Modality
from transferctl.registry import HEADS, LOSSES

if TYPE_CHECKING:
    from transferctl.build import Trained, Training
    from transferctl.config import Config
    from transferctl.distributed import World
    from transferctl.runs import Run

# (model inputs, generator, rank, world) -> (corrupted inputs, weight: 1 where the loss counts, or None for all)
Corruption = Callable[[torch.Tensor, torch.Generator, int, int], tuple[torch.Tensor, torch.Tensor | None]]
EVALUATION_SEED = 0  # validation, evaluation and reconstructions.png corrupt with a fixed seed, so they compare
VALIDATION = Selection("val_loss", higher_is_better=False)  # best.pt: the lowest reconstruction loss


# --------------------------------------------------------------------------- the decoder head


class Decoder(nn.Module):
    """Back from the deepest feature map to the input: at each shallower stage, upsample to that stage's size
    and convolve (batch norm, ReLU), then a 1x1 convolution to the input's channels at its size. It reads only
    the deepest map, a bottleneck: the shallow maps, which nearly copy the input, give it only their sizes."""

    def __init__(
        self,
        stage_channels: tuple[int, ...],
        sample_shape: tuple[int, ...],
        width: int | None = None,
        pooled: bool = False,
        stage_shapes: tuple[tuple[int, ...], ...] = (),
    ):
        super().__init__()
        deep_to_shallow = [stage_channels[-1]] + [min(c, width or c) for c in reversed(stage_channels[:-1])]
        # pooled: decode from the pooled features alone (what k-NN, probes and fine-tunes read), spread back over
        # the deepest map's positions by a linear layer
        self.expand = nn.Linear(stage_channels[-1], stage_channels[-1] * math.prod(stage_shapes[-1][1:])) if pooled else None
        self.deepest = tuple(stage_shapes[-1]) if pooled else None
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
            for cin, cout in itertools.pairwise(deep_to_shallow)
        )
        self.out = nn.Conv2d(deep_to_shallow[-1], sample_shape[0], 1)
        self.size = tuple(sample_shape[-2:])

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        x = maps[-1]
        if self.expand is not None:
            x = F.relu(self.expand(x.mean(dim=(2, 3)))).view(len(x), *self.deepest)
        for block, shallower in zip(self.blocks, reversed(maps[:-1]), strict=True):
            x = block(F.interpolate(x, size=shallower.shape[-2:], mode="bilinear", align_corners=False))
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.out(x)


@HEADS.register("decoder", serves=("reconstruction",), reads="feature_maps")
def decoder(
    stage_channels: tuple[int, ...],
    sample_shape: tuple[int, ...],
    stage_shapes: tuple[tuple[int, ...], ...] = (),
    width: PositiveInt | None = None,
    pooled: bool = False,
) -> nn.Module:
    """A light convolutional decoder from the encoder's deepest feature map back to the input image; `width` caps
    its channels (default: the encoder's stage widths, deep to shallow); `pooled` decodes from the pooled features."""
    return Decoder(stage_channels, sample_shape, width, pooled, stage_shapes)


# --------------------------------------------------------------------------- pixels and patches


def to_signal(x: torch.Tensor, data: Samples) -> torch.Tensor:
    """Model inputs as the signal a reconstruction is scored on: pixels in [0, 1] (images), the standardized
    log-mel spectrogram itself (audio)."""
    return modality_of(data).to_signal(x, data)


def hidden_patches(count: int, height: int, width: int, patch: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(count, 1, height, width) booleans: True on the hidden patches, the same number in every image (as MAE:
    all but int(patches * (1 - ratio)) of them), chosen at random."""
    rows, cols = height // patch, width // patch
    patches = rows * cols
    hidden = patches - int(patches * (1 - ratio))
    order = torch.rand(count, patches, generator=generator).argsort(dim=1).argsort(dim=1)  # each patch's rank
    grid = (order < hidden).view(count, 1, rows, cols)
    return grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def _patch_stats(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and standard deviation over its pixels and channels, spread back over the patch."""
    n, c, h, w = x.shape
    patches = x.reshape(n, c, h // patch, patch, w // patch, patch)
    mean = patches.mean(dim=(1, 3, 5), keepdim=True)
    std = (patches.var(dim=(1, 3, 5), keepdim=True) + 1e-6).sqrt()  # MAE's norm_pix_loss
    spread = lambda s: s.expand_as(patches).reshape(n, c, h, w)
    return spread(mean), spread(std)


def _mine(count: int, rank: int, ranks: int) -> slice:
    """This rank's share of a global batch whose randomness every rank draws whole, as one process would."""
    return slice(rank * count, (rank + 1) * count)


def no_corruption(x: torch.Tensor, generator: torch.Generator, rank: int, ranks: int) -> tuple[torch.Tensor, None]:
    return x, None


@dataclass(frozen=True)
class GaussianNoise:
    """Adds noise of `std` to every element of the signal (pixels of [0, 1], clipped to them; a standardized
    spectrogram); the loss counts every element."""

    std: float
    data: Samples

    def __call__(self, x: torch.Tensor, generator: torch.Generator, rank: int, ranks: int) -> tuple[torch.Tensor, None]:
        noise = torch.randn((len(x) * ranks, *x.shape[1:]), generator=generator)[_mine(len(x), rank, ranks)]
        modality = modality_of(self.data)
        noisy = to_signal(x, self.data) + self.std * noise.to(x.device, x.dtype)
        return modality.from_signal(noisy.clamp(0, 1) if modality.unit_signal else noisy, self.data), None


@dataclass(frozen=True)
class PatchMask:
    """Hides a share of square patches (filled with the data set's mean: 0 in model inputs). `weigh_hidden`: the
    loss counts the hidden patches only (masked modelling), else every pixel (a denoising autoencoder)."""

    ratio: float
    patch: int
    weigh_hidden: bool

    def __call__(self, x: torch.Tensor, generator: torch.Generator, rank: int, ranks: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, _, height, width = x.shape
        hidden = hidden_patches(n * ranks, height, width, self.patch, self.ratio, generator)[_mine(n, rank, ranks)].to(x.device)
        return x.masked_fill(hidden, 0.0), hidden if self.weigh_hidden else None


# --------------------------------------------------------------------------- the objective


@dataclass
class ReconstructionObjective(OwnGenerator):
    """Each clean input reconstructed from its corrupted form: the loss of the decoder's output against the clean
    input (its pixels for a loss that wants them, per-patch normalized with `norm_pix_patch`), over the elements
    the corruption says count. Its random draws come from its own generator, which goes with the checkpoint."""

    forward: nn.Module
    criterion: nn.Module
    corrupt: Corruption
    stats: Samples  # the split whose mean and std turn model inputs back into pixels
    seed: int
    norm_pix_patch: int | None = None
    rank: int = 0
    ranks: int = 1
    description: str = "pretraining"
    selection: Selection = VALIDATION
    validation_metrics: ClassVar[Mapping[str, bool]] = {"val_loss": False, "val_reconstruction_mse": False}
    generator_salt: ClassVar[int] = 104_729

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        (x,) = batch.inputs
        corrupted, weight = self.corrupt(x, self.generator, self.rank, self.ranks)
        return self.criterion(self.forward(corrupted), self.target(x), weight)

    def target(self, clean: torch.Tensor) -> torch.Tensor:
        target = to_signal(clean, self.stats) if getattr(self.criterion, "unit_targets", False) else clean
        if self.norm_pix_patch:
            mean, std = _patch_stats(target, self.norm_pix_patch)
            target = (target - mean) / std
        return target

    def as_pixels(self, output: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """The decoder's output as pixels in [0, 1] (per-patch normalized outputs take the clean patches' statistics back)."""
        output = output.float()
        if self.norm_pix_patch:
            reference = to_signal(clean, self.stats) if getattr(self.criterion, "unit_targets", False) else clean
            mean, std = _patch_stats(reference.float(), self.norm_pix_patch)
            output = output * std + mean
        if getattr(self.criterion, "unit_targets", False):
            return torch.sigmoid(output) if not self.norm_pix_patch else output.clamp(0, 1)
        return to_signal(output, self.stats)

    @torch.no_grad()
    def measure(self, network: nn.Module, data: Samples, batch_size: int) -> dict[str, float]:
        """The loss and the squared error in pixels (over the counted elements) on `data`, with a fixed corruption seed."""
        network.eval()
        generator, modality = torch.Generator().manual_seed(EVALUATION_SEED), modality_of(data)
        total = {"loss": 0.0, "reconstruction_mse": 0.0}
        for inputs, _ in iterate_batches(data, batch_size):
            clean = modality.model_input(inputs, data)
            corrupted, weight = self.corrupt(clean, generator, 0, 1)
            output = network(corrupted)
            error = F.mse_loss(self.as_pixels(output, clean), to_signal(clean.float(), self.stats), reduction="none")
            counted = weight.float().expand_as(error) if weight is not None else torch.ones_like(error)
            total["loss"] += self.criterion(output, self.target(clean), weight).item() * len(clean)
            total["reconstruction_mse"] += ((error * counted).sum() / counted.sum().clamp_min(1)).item() * len(clean)
        return {key: value / max(len(data), 1) for key, value in total.items()}

    def validate(self, val: Samples, batch_size: int, network: nn.Module) -> dict[str, float]:
        measured = self.measure(network, val, batch_size)
        return {"val_loss": measured["loss"], "val_reconstruction_mse": measured["reconstruction_mse"]}


# --------------------------------------------------------------------------- the methods' common part


class ReconstructionMethod(Method):
    """A pretraining method that reconstructs its inputs through a decoder head; no labels. Its runs are scored by
    k-NN on the encoder's features and by the reconstruction error, and exported as the encoder alone."""

    head = "decoder"
    loss = "mse"
    serves = "reconstruction"
    augmentation = "light"
    uses_labels = False
    evaluation_splits = ("train", "test")  # k-NN: the labelled training split is the bank

    def make_corruption(self, data: Samples) -> Corruption:
        raise NotImplementedError

    def patch_in_use(self) -> int | None:
        """The side of the patches its corruption hides (it must divide the image), or None."""
        return None

    def norm_pix_patch(self) -> int | None:
        return None

    def check(self, cfg: Config, ranks: World) -> None:
        modality = dataset_modality(cfg.data.name)
        if type(modality_named(modality)).to_signal is Modality.to_signal:
            raise ConfigError(f"method: '{cfg.method.name}' reconstructs a modality's signal, and the {modality} modality gives none")
        if getattr(LOSSES.build(cfg.loss.name, cfg.loss.options), "unit_targets", False) and not modality_named(modality).unit_signal:
            raise ConfigError(f"loss.name: '{cfg.loss.name}' needs targets in [0, 1], and {modality} inputs are not; use loss.name=mse")

    def reconstruction(self, forward: nn.Module, criterion: nn.Module, cfg: Config, stats: Samples) -> ReconstructionObjective:
        """The objective of this method's reconstructions, for training or for scoring a trained network."""
        patch = self.patch_in_use()
        if patch and any(side % patch for side in stats.sample_shape[-2:]):
            size = "x".join(map(str, stats.sample_shape[-2:]))
            raise ConfigError(f"method.patch_size: {patch} does not divide the {size} inputs of data set '{cfg.data.name}'; pick a divisor")
        ranks = world()
        return ReconstructionObjective(
            forward, criterion, self.make_corruption(stats), stats, cfg.train.seed, self.norm_pix_patch(), rank=ranks.rank, ranks=ranks.size
        )

    def objective(self, parts: Parts) -> ReconstructionObjective:
        return self.reconstruction(parts.forward, parts.criterion, parts.cfg, parts.train)

    def _scorer(self, network: nn.Module, cfg: Config, stats: Samples) -> ReconstructionObjective:
        return self.reconstruction(network, LOSSES.build(cfg.loss.name, cfg.loss.options), cfg, stats)

    def evaluate(self, trained: Trained, run: Run) -> Evaluation:
        cfg, test = trained.cfg, trained.split(train=False)
        measured = self._scorer(trained.network, cfg, test).measure(trained.network, test, cfg.data.eval_batch_size)
        return Evaluation({**knn_metrics(trained), "reconstruction_mse": measured["reconstruction_mse"]})

    def export(self) -> Export:
        return Export(encoder_only=True, output="embeddings", kind="encoder")

    @torch.no_grad()
    def write_plots(self, run: Run, training: Training, first_inputs: tuple[torch.Tensor, ...] | None) -> None:
        """reconstructions.png: 8 held-out images, the same corrupted (fixed seed), and the trained model's reconstructions."""
        shown = training.val if len(training.val) else training.train.to(training.device)
        shown = shown.subset(torch.arange(min(8, len(shown)), device=shown.inputs.device))
        objective = self._scorer(training.network, training.cfg, training.train)
        raw = shown.inputs[torch.arange(len(shown))] if is_streamed(shown) else shown.inputs  # a streamed split: read them
        clean = training.modality.model_input(raw.to(training.device), shown)
        corrupted, _ = objective.corrupt(clean, torch.Generator().manual_seed(EVALUATION_SEED), 0, 1)
        training.network.eval()
        reconstructed = training.modality.from_signal(objective.as_pixels(training.network(corrupted), clean), shown)
        rows = [training.modality.displayable(x, shown) for x in (clean, corrupted, reconstructed)]
        plots.write_image_rows(
            run, "reconstructions.png", rows, "reconstructions, held-out images", ["input", "corrupted", "reconstructed"]
        )
