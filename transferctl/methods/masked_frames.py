"""Masked frame modelling for audio: hide spans of each recording's log-mel frames and predict, from the encoder's
features at the hidden frames, what was there; no labels. A per-frame objective for encoders that keep their
frames (`conv1d`, `gru`, `lstm`), which a per-frame task such as speech recognition fine-tunes.

Two targets (`method.target`):

- `codes` (default, BEST-RQ: Chiu et al., 2022): each clean frame's code, the nearest of `codebook_size` random
  unit vectors to a random projection of the frame (both fixed, drawn from `codebook_seed`), predicted by
  cross-entropy. Classes, not values: the encoder cannot lower the loss by blurring, it must tell sounds apart.
- `signal` (Mockingjay / TERA: Liu et al., 2020): each hidden frame's standardized log-mel values, by squared error.

Spans are placed as wav2vec 2.0 places them: `mask_ratio` of a recording's real frames, in spans of `span` frames
at random starts (spans may overlap, so slightly fewer are hidden), shown as 0, the training split's mean. Its
runs are scored by k-NN on the encoder's pooled features and by the hidden frames' loss (and codes' accuracy),
and exported as the encoder alone."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from transferctl.data.samples import Batch, Samples, iterate_batches
from transferctl.distributed import world
from transferctl.engine.evaluate import Evaluation
from transferctl.engine.train import Selection
from transferctl.errors import ConfigError
from transferctl.methods.base import Export, Method, OwnGenerator, Parts, knn_metrics
from transferctl.modalities import dataset_modality, fits_modality, modality_of
from transferctl.modalities.audio import front_ends_of
from transferctl.registry import HEADS, LOSSES, METHODS, MODELS

if TYPE_CHECKING:
    from transferctl.build import Trained
    from transferctl.config import Config
    from transferctl.distributed import World
    from transferctl.runs import Run

EVALUATION_SEED = 0  # validation and evaluation hide the same frames every time, so epochs compare
VALIDATION = Selection("val_loss", higher_is_better=False)
Target = Literal["codes", "signal"]


@HEADS.register("frame_predictor", serves=("masked_frames",), reads="token_features")
def frame_predictor(feature_dim: int, num_outputs: int) -> nn.Module:
    """A linear layer over the features at each hidden frame: a logit per code, or the frame's log-mel values."""
    return nn.Linear(feature_dim, num_outputs)


class MaskedFrameLoss(nn.Module):
    """Cross-entropy against codes (integer targets), squared error against log-mel frames (float targets)."""

    def forward(self, predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dtype == torch.long:
            return F.cross_entropy(predicted.float(), targets)
        return F.mse_loss(predicted.float(), targets.float())


@LOSSES.register(serves=("masked_frames",))
def masked_frame_loss() -> nn.Module:
    """The hidden frames' loss: cross-entropy of their predicted codes, or squared error of their predicted log-mel values."""
    return MaskedFrameLoss()


@dataclass(frozen=True)
class SpanMasking:
    """Which frames of each recording are hidden: round(ratio x real frames / span) spans of `span` frames at
    uniformly drawn starts within the real frames."""

    ratio: float
    span: int

    def __call__(
        self, count: int, frames: int, lengths: torch.Tensor | None, generator: torch.Generator, rank: int = 0, ranks: int = 1
    ) -> torch.Tensor:
        """(count, frames) booleans, True where hidden. The draws cover the global batch (`ranks` slices of this
        size) on the CPU generator, as one process would draw them."""
        most = max(1, math.ceil(self.ratio * frames / self.span))
        draws = torch.rand(count * ranks, most, generator=generator)[rank * count : (rank + 1) * count]
        real = lengths.cpu() if lengths is not None else torch.full((count,), frames)
        spans = (self.ratio * real / self.span).round().clamp_min(1).long()  # every recording hides at least one span
        starts = (draws * (real - self.span + 1).clamp_min(1).unsqueeze(1)).long()
        starts = starts.masked_fill(torch.arange(most).unsqueeze(0) >= spans.unsqueeze(1), frames)  # unused: off the end
        position = torch.arange(frames).view(1, 1, -1)
        hidden = ((position >= starts.unsqueeze(2)) & (position < starts.unsqueeze(2) + self.span)).any(dim=1)
        return hidden & (torch.arange(frames).unsqueeze(0) < real.unsqueeze(1))


class RandomProjectionQuantizer(nn.Module):
    """BEST-RQ's target maker: a fixed random projection of each frame, compared by cosine with a fixed random
    codebook; a frame's code is its nearest entry. Nothing in it trains; the seed re-creates it exactly."""

    def __init__(self, features: int, codebook_size: int, code_dim: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        projection = torch.empty(features, code_dim)
        bound = math.sqrt(6.0 / (features + code_dim))  # Xavier-uniform, as BEST-RQ initializes it
        self.register_buffer("projection", projection.uniform_(-bound, bound, generator=generator), persistent=False)
        codebook = torch.randn(codebook_size, code_dim, generator=generator)
        self.register_buffer("codebook", F.normalize(codebook, dim=1), persistent=False)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(..., features) -> (...) the code of each frame."""
        projected = F.normalize(frames.float() @ self.projection.to(frames.device), dim=-1)
        return (projected @ self.codebook.to(frames.device).T).argmax(dim=-1)


@dataclass
class MaskedFramesObjective(OwnGenerator):
    """The hidden frames' codes or values predicted from the encoder's features there. Its random draws come from
    its own generator, which goes with the checkpoint."""

    forward: nn.Module
    criterion: nn.Module
    masking: SpanMasking
    quantizer: RandomProjectionQuantizer | None  # None: the frames' own values are the targets
    seed: int
    rank: int = 0
    ranks: int = 1
    description: str = "pretraining"
    selection: Selection = VALIDATION
    generator_salt: ClassVar[int] = 32_452_843

    @property
    def validation_metrics(self) -> Mapping[str, bool]:
        return {"val_loss": False, **({"val_masked_accuracy": True} if self.quantizer is not None else {})}

    def hide(
        self, x: torch.Tensor, lengths: torch.Tensor | None, generator: torch.Generator, rank: int = 0, ranks: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs with the hidden frames at 0, the hidden frames (N, frames), their targets (count[, mels]))."""
        frames = x.shape[-1]
        hidden = self.masking(len(x), frames, lengths, generator, rank, ranks).to(x.device)
        clean = x.squeeze(1).transpose(1, 2)[hidden]  # (count, mels): the hidden frames as they were
        targets = self.quantizer(clean) if self.quantizer is not None else clean
        return x.masked_fill(hidden.view(len(x), 1, 1, frames), 0.0), hidden, targets

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        (x,) = batch.inputs
        shown, hidden, targets = self.hide(x, batch.side.get("lengths"), self.generator, self.rank, self.ranks)
        return self.criterion(self.forward(shown, hidden, **batch.side), targets)

    @torch.no_grad()
    def measure(self, network: nn.Module, data: Samples, batch_size: int) -> dict[str, float]:
        """The loss over the hidden frames of `data` and the share of their codes predicted right (`codes`),
        hiding frames with a fixed seed."""
        network.eval()
        generator, modality = torch.Generator().manual_seed(EVALUATION_SEED), modality_of(data)
        loss, right, count = 0.0, 0, 0
        for inputs, _, side in iterate_batches(data, batch_size, with_side=True):
            x = modality.model_input(inputs, data)
            if "lengths" in side:  # recordings of any length: cut to the batch's longest
                x = x[..., : max(int(side["lengths"].max()), 1)]
            shown, hidden, targets = self.hide(x, side.get("lengths"), generator)
            predicted = network(shown, hidden, **side)
            loss += self.criterion(predicted, targets).item() * len(targets)
            if self.quantizer is not None:
                right += int((predicted.argmax(-1) == targets).sum())
            count += len(targets)
        measured = {"loss": loss / max(count, 1)}
        return measured | ({"accuracy": right / max(count, 1)} if self.quantizer is not None else {})

    def validate(self, val: Samples, batch_size: int, network: nn.Module) -> dict[str, float]:
        measured = self.measure(network, val, batch_size)
        return {f"val_masked_{name}" if name == "accuracy" else f"val_{name}": value for name, value in measured.items()}


def log_mel_frame_encoders() -> list[str]:
    """The audio encoders with features at every frame of the log-mel spectrogram they read (not a speech
    checkpoint, whose frames are its own, over the waveform)."""

    encoders = [MODELS.get(name) for name in MODELS.names_with("gives", "token_features")]
    return [e.name for e in encoders if fits_modality(e, "audio") and "log_mel" in front_ends_of(e)]


@METHODS.register("masked_frames")
@dataclass
class MaskedFrames(Method):
    """Masked frame modelling: spans of log-mel frames hidden, their codes (or values) predicted; labels unused."""

    head = "frame_predictor"
    loss = "masked_frame_loss"
    serves = "masked_frames"
    augmentation = "none"  # SpecAugment's masks would hide what the targets are made of
    uses_labels = False
    evaluation_splits = ("train", "test")  # k-NN: the labelled training split is the bank

    target: Target = "codes"
    mask_ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5  # the share of real frames hidden (before overlaps)
    span: PositiveInt = 10  # frames per hidden span
    codebook_size: Annotated[int, Field(ge=2, le=65_536)] = 256
    code_dim: PositiveInt = 16
    codebook_seed: int = 0

    def check(self, cfg: Config, ranks: World) -> None:
        modality = dataset_modality(cfg.data.name)
        if modality != "audio":
            raise ConfigError(
                f"method: 'masked_frames' hides frames of recordings, and data set '{cfg.data.name}' is {modality}; use an audio data set"
            )
        if cfg.model.name not in log_mel_frame_encoders():
            raise ConfigError(
                f"model.name: 'masked_frames' predicts at every log-mel frame, and model '{cfg.model.name}' gives no features "
                f"at those frames; use {', '.join(log_mel_frame_encoders())}"
            )

    def num_outputs(self, data: Samples) -> int:
        return self.codebook_size if self.target == "codes" else data.sample_shape[-2]

    def quantizer(self, data: Samples) -> RandomProjectionQuantizer | None:
        if self.target == "signal":
            return None
        return RandomProjectionQuantizer(data.sample_shape[-2], self.codebook_size, self.code_dim, self.codebook_seed)

    def scorer(self, forward: nn.Module, criterion: nn.Module, data: Samples, seed: int) -> MaskedFramesObjective:
        ranks = world()
        return MaskedFramesObjective(
            forward, criterion, SpanMasking(self.mask_ratio, self.span), self.quantizer(data), seed, ranks.rank, ranks.size
        )

    def objective(self, parts: Parts) -> MaskedFramesObjective:
        return self.scorer(parts.forward, parts.criterion, parts.train, parts.cfg.train.seed)

    def evaluate(self, trained: Trained, run: Run) -> Evaluation:
        cfg, test = trained.cfg, trained.split(train=False)
        scorer = self.scorer(trained.network, LOSSES.build(cfg.loss.name, cfg.loss.options), test, cfg.train.seed)
        measured = scorer.measure(trained.network, test, cfg.data.eval_batch_size)
        return Evaluation({**knn_metrics(trained), **{f"masked_{name}": value for name, value in measured.items()}})

    def export(self) -> Export:
        return Export(encoder_only=True, output="embeddings", kind="encoder")
