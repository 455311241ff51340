"""A small pre-LN Transformer encoder over token ids (`transformer`): token and learned position embeddings,
pre-LN blocks with the padding masked out of attention, and mean or [CLS] pooling. The blocks are written out on
`scaled_dot_product_attention` (not nn.TransformerEncoder, whose eval-mode fast path traces differently from
call to call and would not pass TorchScript's trace check). Its features at every token
(`token_features`) are what masked language modelling predicts from."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from transferctl.errors import ConfigError
from transferctl.models.sequence import mean_pool, word_vectors_of
from transferctl.registry import MODELS


class SelfAttention(nn.Module):
    """Multi-head self-attention over the real tokens (scaled dot-product attention; padding masked out)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=padding, dropout_p=self.dropout if self.training else 0.0)
        return self.out(attended.transpose(1, 2).reshape(n, length, width))


class Block(nn.Module):
    """A pre-LN Transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, width * mlp_ratio), nn.GELU(), nn.Linear(width * mlp_ratio, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x), padding))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """Token ids (N, length), right-padded with `pad_id` -> pooled features (N, width)."""

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        max_length: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: int,
        dropout: float,
        pooling: str,
        tokens: nn.Embedding | None = None,
    ):
        """`tokens`: a token table to share (another encoder's, as ELECTRA's generator shares the encoder's), or a new one."""
        super().__init__()
        self.pad_id, self.pooling, self.feature_dim = pad_id, pooling, width
        self.word_vectors = None  # model.embeddings, loaded with the starting weights
        self.tokens = tokens if tokens is not None else nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.positions = nn.Parameter(torch.zeros(1, max_length, width))
        nn.init.trunc_normal_(self.positions, std=0.02)
        if tokens is None:
            nn.init.trunc_normal_(self.tokens.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    @property
    def word_embedding(self) -> nn.Embedding:
        return self.tokens

    def load_word_vectors(self) -> None:
        if self.word_vectors is not None:
            self.word_vectors.load_into(self.tokens)

    def token_features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features at every token (N, length, width) and the mask of real tokens."""
        mask = ids != self.pad_id
        x = self.drop(self.tokens(ids) + self.positions[:, : ids.shape[1]])
        padding = mask[:, None, None, :]  # (N, heads, queries, keys): every query attends to the real keys only
        for block in self.blocks:
            x = block(x, padding)
        return self.norm(x), mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        steps, mask = self.token_features(ids)
        return steps[:, 0] if self.pooling == "cls" else mean_pool(steps, mask)


@MODELS.register(modality="text", channels_last=False, gives=("token_features",))
def transformer(
    vocab_size: int,
    pad_id: int,
    max_length: int,
    width: PositiveInt = 256,
    layers: Annotated[int, Field(ge=1, le=24)] = 4,
    heads: PositiveInt = 4,
    mlp_ratio: Annotated[int, Field(ge=1, le=8)] = 4,
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1,
    pooling: Literal["mean", "cls"] = "mean",
    embeddings: str | None = None,
    vocabulary: dict[str, int] | None = None,
) -> TransformerEncoder:
    """A small pre-LN Transformer encoder (learned positions), mean- or [CLS]-pooled; width features."""
    if width % heads:
        raise ConfigError(f"model.heads: {heads} heads do not divide width {width}; pick a divisor of the width")
    encoder = TransformerEncoder(vocab_size, pad_id, max_length, width, layers, heads, mlp_ratio, dropout, pooling)
    encoder.word_vectors = word_vectors_of(embeddings, vocabulary)
    return encoder
