"""Masked language modelling (BERT, Devlin et al., 2019): hide a share of each text's tokens, predict them from
the encoder's features at their places; no labels. Of the chosen tokens, 80% become the mask token, 10% a random
token and 10% stay as they are, so the encoder cannot learn that only mask tokens matter. The head predicts
only at the chosen places (`Network(inputs, positions)`), which spares the vocabulary-wide projection of every
other token. Its runs are scored by k-NN on the encoder's pooled features and by the accuracy of the hidden
tokens' predictions, and exported as the encoder alone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from transferctl.data.samples import Batch, Samples, iterate_batches
from transferctl.distributed import world
from transferctl.engine.evaluate import Evaluation
from transferctl.engine.train import Selection
from transferctl.errors import ConfigError, UsageError
from transferctl.methods.base import Export, Method, OwnGenerator, Parts, knn_metrics
from transferctl.modalities import dataset_modality, modality_of
from transferctl.registry import HEADS, LOSSES, METHODS

if TYPE_CHECKING:
    from transferctl.build import Trained
    from transferctl.config import Config
    from transferctl.distributed import World
    from transferctl.runs import Run

IGNORED = -100  # the target of a token that is not predicted
EVALUATION_SEED = 0  # validation and evaluation hide the same tokens every time, so epochs compare
VALIDATION = Selection("val_loss", higher_is_better=False)


class TokenPredictor(nn.Module):
    """BERT's prediction head: a dense layer, GELU and layer norm, then one logit per token of the vocabulary. Tied,
    the output layer is the encoder's token embedding table (as BERT's): the dense layer maps the features to the
    embeddings' width, and the logits are similarities to every token's embedding (plus a bias)."""

    def __init__(self, feature_dim: int, vocab_size: int, word_embedding: nn.Embedding | None, hidden: bool):
        super().__init__()
        width = word_embedding.embedding_dim if word_embedding is not None else feature_dim
        layers = [nn.Linear(feature_dim, width), nn.GELU(), nn.LayerNorm(width)] if hidden or width != feature_dim else []
        self.transform = nn.Sequential(*layers)
        self.output = nn.Linear(width, word_embedding.num_embeddings if word_embedding is not None else vocab_size)
        if word_embedding is not None:
            self.output.weight = word_embedding.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.output(self.transform(features))


@HEADS.register("token_predictor", serves=("masked_tokens",), reads="token_features")
def token_predictor(
    feature_dim: int, vocab_size: int, word_embedding: nn.Module | None = None, hidden: bool = True, tied: bool = True
) -> nn.Module:
    """BERT's prediction head (dense, GELU, layer norm), its output layer tied to the encoder's token embeddings unless tied=false."""
    if tied and word_embedding is None:
        raise ConfigError("head.tied: the encoder has no token embedding table to tie the output layer to; set head.tied=false")
    return TokenPredictor(feature_dim, vocab_size, word_embedding if tied else None, hidden)


@dataclass(frozen=True)
class TokenMasking:
    """Which tokens a text hides and what it shows in their place (BERT's 80/10/10)."""

    ratio: float
    mask_token: float
    random_token: float
    special_ids: dict[str, Any]
    continues_word: torch.Tensor | None = None  # per vocabulary id (whole-word masking): the token continues a word

    def special(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([self.special_ids["pad"], self.special_ids["mask"], *self.special_ids["keep"]], dtype=dtype)

    def maskable(self, ids: torch.Tensor) -> torch.Tensor:
        """Where `ids` holds a token that may be hidden: not padding, [MASK] or a boundary token."""
        return ~torch.isin(ids, self.special(ids.dtype).to(ids.device))

    def chosen(self, ids: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The tokens to hide: each maskable token whose draw is under the ratio, or with whole words, every token of a
        word whose first token's draw is (so a word's other pieces cannot give it away)."""
        maskable = self.maskable(ids)
        if self.continues_word is None:
            return (draws < self.ratio) & maskable
        after_special = torch.cat([torch.ones_like(maskable[:, :1]), ~maskable[:, :-1]], dim=1)
        starts = maskable & (~self.continues_word.to(ids.device)[ids.long()] | after_special)
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        word_start = torch.where(starts, positions, 0).cummax(dim=1).values  # each token's word's first position
        return (draws.gather(1, word_start) < self.ratio) & maskable

    def __call__(self, ids: torch.Tensor, generator: torch.Generator, rank: int = 0, ranks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(the ids shown to the encoder, the ids to predict: the hidden tokens' own, IGNORED elsewhere). The draws
        cover the global batch (`ranks` slices of this size) on the CPU generator, as one process would draw them."""
        n, length = ids.shape
        mine = slice(rank * n, (rank + 1) * n)
        draws = torch.rand(2, n * ranks, length, generator=generator)[:, mine].to(ids.device)
        special = self.special(ids.dtype)
        ordinary = torch.arange(self.special_ids["vocab_size"], dtype=ids.dtype)
        ordinary = ordinary[~torch.isin(ordinary, special)]  # a random token is never padding, [MASK], [CLS] or [SEP]
        random_ids = ordinary[torch.randint(len(ordinary), (n * ranks, length), generator=generator)[mine]].to(ids.device)
        chosen = self.chosen(ids, draws[0])
        shown = ids.masked_fill(chosen & (draws[1] < self.mask_token), self.special_ids["mask"])
        swapped = chosen & (draws[1] >= self.mask_token) & (draws[1] < self.mask_token + self.random_token)
        shown = torch.where(swapped, random_ids, shown)
        return shown, ids.masked_fill(~chosen, IGNORED)


@dataclass
class MaskedTokensObjective(OwnGenerator):
    """The hidden tokens predicted from the encoder's features at their places. Its random draws come from its
    own generator, which goes with the checkpoint."""

    forward: nn.Module
    criterion: nn.Module
    masking: TokenMasking
    seed: int
    rank: int = 0
    ranks: int = 1
    description: str = "pretraining"
    # batches grouped by length hold unlike numbers of tokens: with the split's mean count of hidden tokens per text,
    # each batch's loss is scaled to its share of tokens, so every token weighs the same whatever batch it is in
    hidden_per_text: float | None = None
    selection: Selection = VALIDATION
    validation_metrics: ClassVar[Mapping[str, bool]] = {"val_loss": False, "val_masked_accuracy": True}
    generator_salt: ClassVar[int] = 15_485_863

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        (ids,) = batch.inputs
        shown, targets = self.masking(ids, self.generator, self.rank, self.ranks)
        chosen = targets != IGNORED
        logits = self.forward(shown, chosen)
        if not chosen.any():  # a batch of very short texts may hide nothing: no loss, and no NaN
            return logits.sum() * 0.0
        loss = self.criterion(logits, targets[chosen])
        if self.hidden_per_text is None:
            return loss
        return loss * (chosen.sum() / (self.hidden_per_text * len(ids)))

    @torch.no_grad()
    def measure(self, network: nn.Module, data: Samples, batch_size: int) -> dict[str, float]:
        """The loss and the share of hidden tokens predicted right on `data`, hiding tokens with a fixed seed."""
        network.eval()
        generator, modality = torch.Generator().manual_seed(EVALUATION_SEED), modality_of(data)
        loss, right, count = 0.0, 0, 0  # over the hidden tokens of the whole split
        for inputs, _ in iterate_batches(data, batch_size):
            shown, targets = self.masking(modality.model_input(inputs, data), generator)
            chosen = targets != IGNORED
            if not chosen.any():
                continue
            logits = network(shown, chosen)
            loss += F.cross_entropy(logits.float(), targets[chosen], reduction="sum").item()
            right += (logits.argmax(1) == targets[chosen]).sum().item()
            count += int(chosen.sum())
        return {"loss": loss / max(count, 1), "masked_accuracy": right / max(count, 1)}

    def validate(self, val: Samples, batch_size: int, network: nn.Module) -> dict[str, float]:
        measured = self.measure(network, val, batch_size)
        return {"val_loss": measured["loss"], "val_masked_accuracy": measured["masked_accuracy"]}


@METHODS.register("mlm")
@dataclass
class MaskedLanguageModel(Method):
    """Masked language modelling: hidden tokens predicted from the encoder's features at their places; labels unused."""

    name: ClassVar[str] = "mlm"  # as registered: what its messages call it
    head = "token_predictor"
    loss = "token_cross_entropy"
    serves = "masked_tokens"
    augmentation = "none"
    uses_labels = False
    evaluation_splits = ("train", "test")  # k-NN: the labelled training split is the bank

    mask_ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15  # the share of tokens hidden
    mask_token: Annotated[float, Field(ge=0.0, le=1.0)] = 0.8  # of the hidden ones: shown as the mask token
    random_token: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1  # of the hidden ones: shown as a random token
    whole_words: bool = False  # hide every piece of a chosen word (mask_ratio is then the share of words)

    def check(self, cfg: Config, ranks: World) -> None:
        modality = dataset_modality(cfg.data.name)
        if modality != "text":
            raise ConfigError(
                f"method: '{cfg.method.name}' hides tokens of texts, and data set '{cfg.data.name}' is {modality}; use a text data set"
            )
        if self.mask_token + self.random_token > 1:
            raise ConfigError(f"method: mask_token={self.mask_token} and random_token={self.random_token} add up to more than 1; lower one")

    def masking(self, data: Samples) -> TokenMasking:
        special = modality_of(data).augment_context(data)["special_ids"]
        if special["mask"] is None:
            raise UsageError(
                f"method: '{self.name}' shows hidden tokens as the mask token, and the tokenizer has none; use one with [MASK] or <mask>"
            )
        continues_word = None
        if self.whole_words:
            continues_word = data.tokenization.continues_word
            if continues_word is None:
                raise UsageError(
                    "method.whole_words: the tokenizer's vocabulary does not mark where words continue (a bpe without a "
                    "continuing-subword prefix); use data.tokenizer.kind=wordpiece or set method.whole_words=false"
                )
        return TokenMasking(self.mask_ratio, self.mask_token, self.random_token, special, continues_word)

    def objective(self, parts: Parts) -> MaskedTokensObjective:
        ranks, masking, train = world(), self.masking(parts.train), parts.train
        hidden_per_text = None
        if parts.cfg.data.group_by_length:  # the split's mean count of hidden tokens per text
            hidden_per_text = self.mask_ratio * masking.maskable(train.inputs).sum().item() / len(train)
        return MaskedTokensObjective(
            parts.forward, parts.criterion, masking, parts.cfg.train.seed, ranks.rank, ranks.size, hidden_per_text=hidden_per_text
        )

    def evaluate(self, trained: Trained, run: Run) -> Evaluation:
        cfg, test = trained.cfg, trained.split(train=False)
        scorer = MaskedTokensObjective(trained.network, LOSSES.build(cfg.loss.name, cfg.loss.options), self.masking(test), cfg.train.seed)
        measured = scorer.measure(trained.network, test, cfg.data.eval_batch_size)
        return Evaluation({**knn_metrics(trained), "masked_accuracy": measured["masked_accuracy"]})

    def export(self) -> Export:
        return Export(encoder_only=True, output="embeddings", kind="encoder")


__all__ = ["IGNORED", "MaskedLanguageModel", "TokenMasking", "token_predictor"]
