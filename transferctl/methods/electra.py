"""Replaced-token detection (ELECTRA, Clark et al., 2020): a small generator, trained by masked language modelling,
fills each text's hidden places with tokens it samples; the encoder, the discriminator, tells at every token whether
it is the text's own or a replacement. The encoder learns from every token of a text rather than the hidden 15%,
which is why it learns more per step of compute than masked language modelling does at small scale. The generator
lives in the head (it shares the encoder's token embeddings, as ELECTRA's does) and goes with it: a fine-tune
`--from` the run gets the encoder. Scored by k-NN on the pooled features, the generator's share of hidden tokens
predicted right and the encoder's share of tokens it tells right; exported as the encoder alone."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from transferctl.data.samples import Batch, Samples, iterate_batches
from transferctl.engine.evaluate import Evaluation
from transferctl.engine.train import Selection
from transferctl.errors import ConfigError
from transferctl.methods.base import OwnGenerator, Parts, knn_metrics
from transferctl.methods.mlm import EVALUATION_SEED, IGNORED, MaskedLanguageModel, TokenMasking, TokenPredictor
from transferctl.modalities import modality_of
from transferctl.models.transformer import TransformerEncoder
from transferctl.registry import HEADS, LOSSES, METHODS

if TYPE_CHECKING:
    from transferctl.build import Trained
    from transferctl.config import Config
    from transferctl.distributed import World
    from transferctl.runs import Run

VALIDATION = Selection("val_loss", higher_is_better=False)


class TokenGenerator(nn.Module):
    """The generator: the encoder's token embeddings (shared), its own learned positions and pre-LN blocks at the
    encoder's width, few of them (one by default; DeBERTaV3 keeps the width and halves the depth, ELECTRA narrows
    the width: a generator as strong as the encoder makes replacements too hard to tell), and a prediction head
    tied to the shared embeddings."""

    def __init__(self, word_embedding: nn.Embedding, pad_id: int, max_length: int, layers: int, heads: int, dropout: float):
        super().__init__()
        vocab_size, width = word_embedding.weight.shape
        self.encoder = TransformerEncoder(vocab_size, pad_id, max_length, width, layers, heads, 4, dropout, "mean", tokens=word_embedding)
        self.predict = TokenPredictor(width, vocab_size, word_embedding, hidden=True)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token logits (count, vocabulary) at the `positions` of `ids` (the hidden places)."""
        features, _ = self.encoder.token_features(ids)
        return self.predict(features[positions])

    # 0.22.0 held the encoder's parts directly under the generator; its runs' checkpoints load under the new names
    RENAMED: ClassVar[tuple[tuple[str, str], ...]] = (
        ("embedding.", "encoder.tokens."),
        ("positions", "encoder.positions"),
        ("blocks.", "encoder.blocks."),
        ("norm.", "encoder.norm."),
    )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for old, new in self.RENAMED:
            for key in [key for key in state_dict if key.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ReplacedTokenDetector(nn.Module):
    """ELECTRA's discriminator head (dense, GELU, one logit: replaced) over the encoder's features at each token, and
    the generator that makes the replacements."""

    def __init__(self, feature_dim: int, token_generator: TokenGenerator):
        super().__init__()
        self.token_generator = token_generator
        self.detect = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.GELU(), nn.Linear(feature_dim, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.detect(features).squeeze(-1)


@HEADS.register("replaced_token_detector", serves=("replaced_tokens",), reads="token_features")
def replaced_token_detector(
    feature_dim: int,
    vocab_size: int,
    pad_id: int,
    sample_shape: tuple[int, ...],
    word_embedding: nn.Module | None = None,
    generator_layers: Annotated[int, Field(ge=1, le=12)] = 1,
    generator_heads: PositiveInt = 4,
    generator_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1,
) -> nn.Module:
    """ELECTRA's discriminator head and its generator (one block at the encoder's width, sharing its token embeddings)."""
    if not isinstance(word_embedding, nn.Embedding):
        raise ConfigError(
            "head: 'replaced_token_detector' shares the encoder's token embeddings, and this encoder has none; "
            "use one with a token table (transformer, gru, lstm)"
        )
    if word_embedding.embedding_dim % generator_heads:
        width = word_embedding.embedding_dim
        raise ConfigError(f"head.generator_heads: {generator_heads} heads do not divide the encoder's width {width}; pick a divisor")
    token_generator = TokenGenerator(word_embedding, pad_id, sample_shape[0], generator_layers, generator_heads, generator_dropout)
    return ReplacedTokenDetector(feature_dim, token_generator)


class ReplacedTokenLoss(nn.Module):
    """The generator's cross-entropy on the hidden tokens plus `detection_weight` times the encoder's binary
    cross-entropy on every token (replaced or not); ELECTRA weighs detection 50 times, as its loss per token is
    far smaller. `shares` scale each term (batches grouped by length: a batch's share of the split's tokens)."""

    def __init__(self, detection_weight: float):
        super().__init__()
        self.detection_weight = detection_weight

    def forward(
        self,
        generated: torch.Tensor,
        hidden: torch.Tensor,
        detected: torch.Tensor,
        replaced: torch.Tensor,
        shares: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        generation, detection = self.terms(generated, hidden, detected, replaced)
        return generation * shares[0] + self.detection_weight * detection * shares[1]

    @staticmethod
    def terms(
        generated: torch.Tensor, hidden: torch.Tensor, detected: torch.Tensor, replaced: torch.Tensor, reduction: str = "mean"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's cross-entropy per hidden token and the detection loss per real token (or their sums)."""
        # a batch of very short texts may hide nothing, or hold no real token: no term, and no NaN
        generation, detection = generated.sum() * 0.0, detected.sum() * 0.0
        if len(hidden):
            generation = F.cross_entropy(generated.float(), hidden, reduction=reduction)
        if len(replaced):
            detection = F.binary_cross_entropy_with_logits(detected.float(), replaced.float(), reduction=reduction)
        return generation, detection


@LOSSES.register(serves=("replaced_tokens",))
def replaced_token_detection(detection_weight: Annotated[float, Field(gt=0.0)] = 50.0) -> nn.Module:
    """ELECTRA's loss: the generator's masked-token cross-entropy plus detection_weight times the encoder's
    replaced-token binary cross-entropy."""
    return ReplacedTokenLoss(detection_weight)


def sample_tokens(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `logits`, drawn from its softmax by inverting its cumulative sum at one uniform draw per
    row from the CPU `generator` (a draw per token of the vocabulary would be a large copy to the device each step).
    Tokens of probability 0 (logit -inf) are never drawn: the draw falls in (0, total]."""
    cumulative = torch.softmax(logits.float(), dim=-1).cumsum(-1)
    draws = 1.0 - torch.rand(len(logits), generator=generator).to(logits.device)  # (0, 1]
    return torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None]).squeeze(-1)


@dataclass
class Corrupted:
    """A batch after the generator: what the encoder sees, the generator's logits at the hidden places and their
    true tokens, and which real tokens (not padding or boundaries) were replaced."""

    ids: torch.Tensor
    generated: torch.Tensor
    hidden: torch.Tensor
    real: torch.Tensor
    replaced: torch.Tensor


Generate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (shown ids, hidden places) -> logits at those places


def corrupt(ids: torch.Tensor, masking: TokenMasking, generate: Generate, generator: torch.Generator) -> Corrupted:
    """Hide tokens, let the generator fill them with tokens it samples (never padding, [MASK] or a boundary token,
    which would change what the encoder masks or reads as a text's edge); a sample equal to the text's token counts
    as the text's own (as ELECTRA labels it)."""
    shown, targets = masking(ids, generator)
    chosen = targets != IGNORED
    generated = generate(shown, chosen)
    with torch.no_grad():
        ordinary = generated.detach().float().index_fill(1, masking.special(torch.long).to(ids.device), float("-inf"))
        corrupted = ids.masked_scatter(chosen, sample_tokens(ordinary, generator).to(ids.dtype))
    real = masking.maskable(ids)
    return Corrupted(corrupted, generated, targets[chosen], real, (corrupted != ids)[real])


@dataclass
class ReplacedTokensObjective(OwnGenerator):
    """The generator's hidden-token loss and the encoder's replaced-token loss. The generator runs outside the
    training forward (it is the head's), so the method trains on one process. Its draws (masks, samples) come from
    its own generator, which goes with the checkpoint."""

    forward: nn.Module
    token_generator: nn.Module
    criterion: nn.Module
    masking: TokenMasking
    seed: int
    # batches grouped by length: the split's mean counts of hidden and real tokens per text, so that every token weighs
    # the same whatever batch it is in (as masked language modelling does)
    per_text: tuple[float, float] | None = None
    description: str = "pretraining"
    selection: Selection = VALIDATION
    validation_metrics: ClassVar[Mapping[str, bool]] = {
        "val_loss": False,
        "val_masked_accuracy": True,
        "val_detection_accuracy": True,
        "val_detection_recall": True,
    }
    generator_salt: ClassVar[int] = 32_452_843

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        (ids,) = batch.inputs
        c = corrupt(ids, self.masking, self.token_generator, self.generator)
        return self.criterion(c.generated, c.hidden, self.forward(c.ids, c.real), c.replaced, self.shares(c, len(ids)))

    def shares(self, c: Corrupted, texts: int) -> tuple[float, float]:
        """Each loss term's scale: 1, or in batches grouped by length the batch's count of hidden (real) tokens over
        the split's mean count per batch of this size, so that a batch of long texts weighs more than one of short."""
        if self.per_text is None:
            return 1.0, 1.0
        return len(c.hidden) / (self.per_text[0] * texts), len(c.replaced) / (self.per_text[1] * texts)

    @torch.no_grad()
    def measure(self, network: nn.Module, data: Samples, batch_size: int) -> dict[str, float]:
        """On `data`, its draws from a fixed seed: the loss per token (the generator's cross-entropy per hidden
        token plus the weighted detection loss per real token), the generator's share of hidden tokens predicted
        right, and the encoder's share of real tokens told right (`detection_accuracy`) and of replaced ones caught
        (`detection_recall`; calling every token the text's own scores 0 here, and the share of tokens left alone in
        accuracy). Its loss rises as the generator gets better, so it does not say which epoch's encoder is best."""
        network.eval()
        generator, modality = torch.Generator().manual_seed(EVALUATION_SEED), modality_of(data)
        sums = dict.fromkeys(("generation", "detection", "right", "hidden", "told", "real", "caught", "replaced"), 0.0)
        for inputs, _ in iterate_batches(data, batch_size):
            c = corrupt(modality.model_input(inputs, data), self.masking, network.head.token_generator, generator)
            if not len(c.replaced):
                continue
            detected = network(c.ids, c.real)
            said_replaced = detected > 0
            generation, detection = self.criterion.terms(c.generated, c.hidden, detected, c.replaced, reduction="sum")
            sums["generation"] += generation.item()
            sums["detection"] += detection.item()
            sums["right"] += int((c.generated.argmax(1) == c.hidden).sum())
            sums["hidden"] += len(c.hidden)
            sums["told"] += int((said_replaced == c.replaced).sum())
            sums["real"] += len(c.replaced)
            sums["caught"] += int((said_replaced & c.replaced).sum())
            sums["replaced"] += int(c.replaced.sum())
        share = lambda part, whole: sums[part] / max(sums[whole], 1)
        return {
            "loss": share("generation", "hidden") + self.criterion.detection_weight * share("detection", "real"),
            "masked_accuracy": share("right", "hidden"),
            "detection_accuracy": share("told", "real"),
            "detection_recall": share("caught", "replaced"),
        }

    def validate(self, val: Samples, batch_size: int, network: nn.Module) -> dict[str, float]:
        measured = self.measure(network, val, batch_size)
        return {f"val_{name}": value for name, value in measured.items()}


@METHODS.register("electra")
@dataclass
class ReplacedTokenDetection(MaskedLanguageModel):
    """Replaced-token detection (ELECTRA): the encoder tells the texts' own tokens from a small generator's
    replacements at every token; labels unused. Hidden tokens are all shown as the mask token, as ELECTRA's are."""

    name: ClassVar[str] = "electra"
    head = "replaced_token_detector"
    loss = "replaced_token_detection"
    serves = "replaced_tokens"

    mask_token: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    random_token: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0

    def check(self, cfg: Config, ranks: World) -> None:
        super().check(cfg, ranks)
        early_stop = cfg.train.early_stop
        if early_stop is not None and early_stop.metric in (None, "val_loss"):
            raise ConfigError(
                "train.early_stop: electra's val_loss rises as its generator gets better, so it cannot say when to stop; "
                "name another metric (train.early_stop.metric=val_detection_accuracy) or drop train.early_stop"
            )
        if ranks.distributed:
            raise ConfigError(
                "method: 'electra' runs its generator outside the training forward, so it trains on one process; run it without torchrun"
            )

    def objective(self, parts: Parts) -> ReplacedTokensObjective:
        masking, train = self.masking(parts.train), parts.train
        per_text = None
        if parts.cfg.data.group_by_length:
            real = masking.maskable(train.inputs).sum().item() / len(train)
            per_text = (self.mask_ratio * real, real)
        token_generator = parts.network.head.token_generator
        return ReplacedTokensObjective(parts.forward, token_generator, parts.criterion, masking, parts.cfg.train.seed, per_text)

    def evaluate(self, trained: Trained, run: Run) -> Evaluation:
        cfg, test = trained.cfg, trained.split(train=False)
        network = trained.network
        criterion = LOSSES.build(cfg.loss.name, cfg.loss.options)
        measured = ReplacedTokensObjective(network, network.head.token_generator, criterion, self.masking(test), cfg.train.seed).measure(
            network, test, cfg.data.eval_batch_size
        )
        scores = {name: measured[name] for name in ("masked_accuracy", "detection_accuracy", "detection_recall")}
        return Evaluation({**knn_metrics(trained), **scores})


__all__ = ["ReplacedTokenDetection", "replaced_token_detection", "replaced_token_detector"]
