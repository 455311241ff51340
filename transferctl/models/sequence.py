"""Encoders over sequences of feature vectors: a bidirectional recurrent network (`gru`) and a 1-D conv net
(`conv1d`). Here the sequence is a clip's mel frames: the model input (N, 1, n_mels, frames) read as `frames`
vectors of `n_mels` features. Both follow the encoder contract (`models/encoders.py`): forward gives pooled
features (N, feature_dim). Neither has 2-D stage maps, so dense heads (decoders, segmentation) do not fit them.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from transferctl.registry import MODELS


def spectrogram_frames(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, features, frames) spectrograms -> (N, frames, features) sequences."""
    return x.squeeze(1).transpose(1, 2)


class AttentionPooling(nn.Module):
    """A learnt score per step, softmax over the steps that count, and the weighted mean of the steps."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, steps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.score(steps).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(dim=1).unsqueeze(-1) * steps).sum(dim=1)


def mean_pool(steps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the steps that count (every step without a mask)."""
    if mask is None:
        return steps.mean(dim=1)
    weight = mask.unsqueeze(-1).to(steps.dtype)
    return (steps * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)


class RecurrentEncoder(nn.Module):
    """Sequences (N, steps, features) -> a bidirectional GRU -> the mean or attention-weighted mean of its outputs."""

    def __init__(self, features: int, hidden_dim: int, layers: int, pooling: str, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(features)
        self.rnn = nn.GRU(
            features, hidden_dim, num_layers=layers, batch_first=True, bidirectional=True, dropout=dropout if layers > 1 else 0.0
        )
        self.feature_dim = 2 * hidden_dim
        self.pool = AttentionPooling(self.feature_dim) if pooling == "attention" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, _ = self.rnn(self.norm(spectrogram_frames(x)))
        return self.pool(steps) if self.pool is not None else mean_pool(steps)


@MODELS.register(modality="audio", channels_last=False)
def gru(
    sequence_features: int,
    hidden_dim: PositiveInt = 128,
    layers: Annotated[int, Field(ge=1, le=6)] = 2,
    pooling: Literal["mean", "attention"] = "mean",
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0,
) -> RecurrentEncoder:
    """A bidirectional GRU over the frames of a sequence (mel frames), mean- or attention-pooled; 2 x hidden_dim features."""
    return RecurrentEncoder(sequence_features, hidden_dim, layers, pooling, dropout)


class ConvSequenceEncoder(nn.Sequential):
    """Conv1d-BN-ReLU stages over the steps (features as channels), max-pooled between stages, then averaged."""

    def __init__(self, features: int, widths: tuple[int, ...], kernel_size: int):
        layers: list[nn.Module] = []
        cin = features
        for stage, width in enumerate(widths):
            layers += [
                nn.Conv1d(cin, width, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(inplace=True),
            ]
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool1d(2))
            cin = width
        super().__init__(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.feature_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.squeeze(1))  # (N, features, steps): the features are the channels


@MODELS.register(modality="audio", channels_last=False)
def conv1d(
    sequence_features: int,
    widths: Annotated[tuple[PositiveInt, ...], Field(min_length=1, max_length=6)] = (64, 128, 256),
    kernel_size: Annotated[int, Field(ge=1, le=15)] = 5,
) -> ConvSequenceEncoder:
    """A 1-D conv net over mel frames (the mel bins as channels): conv stages with max-pooling, then average pooling."""
    return ConvSequenceEncoder(sequence_features, tuple(widths), kernel_size)
