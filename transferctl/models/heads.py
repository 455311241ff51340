"""Heads on top of an encoder, and the Network (encoder + head) that training uses."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, PositiveInt
from torch import nn

from transferctl.registry import HEADS


@HEADS.register("projection", serves=("contrastive",))
def projection_head(feature_dim: int, hidden_dim: PositiveInt = 512, out_dim: PositiveInt = 128, batch_norm: bool = True) -> nn.Module:
    """SimCLR's projection MLP: Linear-BN-ReLU-Linear; thrown away after pretraining."""
    norm: list[nn.Module] = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
    return nn.Sequential(
        nn.Linear(feature_dim, hidden_dim, bias=not batch_norm), *norm, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


@HEADS.register("linear", serves=("classification", "multilabel"))
def classifier_head(
    feature_dim: int, num_outputs: int, dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0, standardize: bool = False
) -> nn.Module:
    """A linear layer (optionally after dropout) producing one output per class (a logit per class, for multi-label).

    `standardize` first scales every feature to zero mean and unit variance (a batch norm without
    affine parameters, as in MAE's linear probe): contrastive features carry their signal as small
    variations around large means, which leaves a plain linear head badly conditioned for SGD.
    """
    norm: list[nn.Module] = [nn.BatchNorm1d(feature_dim, affine=False)] if standardize else []
    return nn.Sequential(*norm, nn.Dropout(dropout), nn.Linear(feature_dim, num_outputs))


class Network(nn.Module):
    """An encoder and a head; `encoder` is what pretraining hands on to fine-tuning. The head reads the encoder's
    pooled features or, when it was registered with `reads="feature_maps"` (decoders, dense heads), the
    encoder's stage feature maps, shallow to deep, or with `reads="token_features"` (masked language modelling),
    its features at every token (N, steps, dim)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, reads: str = "features"):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.reads = reads
        self.frozen_encoder = False  # linear probe: no gradients into the encoder (and its BN statistics fixed by eval())

    def parameter_counts(self) -> dict[str, int]:
        """How many of the network's parameters training updates (not a frozen encoder's, not LoRA's fixed weights), of
        how many."""
        return {
            "trained": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in self.parameters()),
        }

    def freeze_encoder(self) -> None:
        self.frozen_encoder = True
        self.encoder.requires_grad_(False)

    def encode(self, inputs: torch.Tensor, **side: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """What the head reads: pooled features, the stage feature maps, or the features at every token."""
        side = side_for(self.encoder, side)
        if self.reads == "feature_maps":
            return self.encoder.feature_maps(inputs, **side)
        if self.reads == "token_features":
            return self.encoder.token_features(inputs, **side)[0]
        return self.encoder(inputs, **side)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor | None = None, **side: torch.Tensor) -> torch.Tensor:
        """The head's output; `positions` (a boolean mask over the tokens, for a head that reads token features)
        keeps the features of those tokens only, (count, dim), before the head. `side`: the inputs' side
        information (lengths, word ids), handed to the encoder and the head that declare it (`side_inputs`)."""
        if self.frozen_encoder:
            with torch.no_grad():
                features = self.encode(inputs, **side)
        else:
            features = self.encode(inputs, **side)
        head_side = side_for(self.head, side)
        if head_side:
            return self.head(features[positions] if positions is not None else features, **head_side)
        return self.head(features[positions] if positions is not None else features)


def side_for(module: nn.Module, side: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The side information a module takes: all of it for a Network (which hands each name on), else the names in
    its `side_inputs` (none by default)."""
    if isinstance(module, Network):
        return side
    names = getattr(module, "side_inputs", ())
    return {name: value for name, value in side.items() if name in names}
