"""Losses. `serves` names the kinds of objective a loss fits: contrastive (simclr), classification, ...; a method
or task names the kind it needs."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import nn

from transferctl.distributed import gather_with_grad
from transferctl.errors import ConfigError
from transferctl.registry import LOSSES


class NTXentLoss(nn.Module):
    """SimCLR's normalized temperature-scaled cross-entropy over 2N views.

    `z1[i]` and `z2[i]` are two views of image i. Each of the 2N embeddings is classified against
    the other 2N - 1: its partner is the positive, the remaining 2N - 2 are negatives.
    """

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, gather: bool = False) -> torch.Tensor:
        """With `gather`, embeddings of all ranks join the batch (global negatives): every rank then
        computes the loss of the global batch, and DDP's gradient averaging gives its exact gradient."""
        if gather:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        n = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        logits = z @ z.T / self.temperature
        logits.fill_diagonal_(float("-inf"))  # an embedding is never its own negative
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, targets)


@LOSSES.register(serves=("contrastive",))
def nt_xent(temperature: PositiveFloat = 0.5) -> nn.Module:
    """NT-Xent (SimCLR): contrast each view's partner against all other views in the batch."""
    return NTXentLoss(temperature)


ClassWeights = Literal["balanced"] | list[PositiveFloat] | None


def _class_weights(weights: ClassWeights, class_counts: torch.Tensor | None) -> torch.Tensor | None:
    """`loss.class_weights` as a tensor: `balanced` weighs class c by N / (C * n_c) over the training split's counts
    (scikit-learn's "balanced"; a class without samples weighs 0), a list is taken as given, one weight per class."""
    if weights is None:
        return None
    if class_counts is None:
        raise ConfigError("loss.class_weights: the training split has no class per sample to weigh; drop it")
    if weights == "balanced":
        counts = class_counts.double()
        return torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp_min(1)), 0.0).float()
    if len(weights) != len(class_counts):
        raise ConfigError(
            f"loss.class_weights: {len(weights)} weights for {len(class_counts)} classes; "
            f"give one per class, in the classes' order, or `balanced`"
        )
    return torch.tensor(weights, dtype=torch.float32)


@LOSSES.register(serves=("classification",))
def cross_entropy(
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0,
    class_weights: ClassWeights = None,
    class_counts: torch.Tensor | None = None,
) -> nn.Module:
    """Cross-entropy on class logits, with optional label smoothing and class weights (`balanced`: inverse to each
    class's share of the training split; or one weight per class)."""
    return nn.CrossEntropyLoss(weight=_class_weights(class_weights, class_counts), label_smoothing=label_smoothing)


class MultiLabelLoss(nn.Module):
    """Binary cross-entropy of each class's logit, averaged over samples and classes. `gamma_pos` and `gamma_neg` weigh
    each term by how wrong it still is, (1 - p)^gamma_pos for a class the sample has and p^gamma_neg for one it lacks
    (focal loss: both the same); `clip` shifts a lacking class's probability down by that much first, so that easy
    negatives count for nothing (the asymmetric loss of Ridnik et al., 2021)."""

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 0.0, clip: float = 0.0):
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.clip = gamma_pos, gamma_neg, clip

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        if not (self.gamma_pos or self.gamma_neg or self.clip):
            return F.binary_cross_entropy_with_logits(logits, targets)
        p = logits.sigmoid()
        has = targets * F.logsigmoid(logits) * (1 - p).pow(self.gamma_pos)
        p_lacking = (p - self.clip).clamp_min(0) if self.clip else p
        log_lacking = (1 - p_lacking).clamp_min(1e-8).log() if self.clip else F.logsigmoid(-logits)
        lacks = (1 - targets) * log_lacking * p_lacking.pow(self.gamma_neg)
        return -(has + lacks).mean()


@LOSSES.register(serves=("multilabel",))
def binary_cross_entropy(focal_gamma: Annotated[float, Field(ge=0.0)] = 0.0) -> nn.Module:
    """Binary cross-entropy per class on logits (multi-label); `focal_gamma` > 0: focal loss, easy decisions count less."""
    return MultiLabelLoss(focal_gamma, focal_gamma)


@LOSSES.register(serves=("multilabel",))
def asymmetric(
    gamma_neg: Annotated[float, Field(ge=0.0)] = 4.0,
    gamma_pos: Annotated[float, Field(ge=0.0)] = 0.0,
    clip: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05,
) -> nn.Module:
    """The asymmetric loss (ASL) for multi-label data where most classes are absent from most samples: absent classes'
    easy terms are damped (gamma_neg) and the easiest dropped (clip); present ones weigh as in cross-entropy."""
    return MultiLabelLoss(gamma_pos, gamma_neg, clip)


@LOSSES.register(serves=("masked_tokens",))
def token_cross_entropy(label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0) -> nn.Module:
    """Cross-entropy of the predicted tokens against the hidden ones (masked language modelling)."""
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


class ElementwiseLoss(nn.Module):
    """The mean of a per-element loss between a prediction and its target, or its weighted mean: `weight` (1 where
    an element counts, 0 where not: the hidden patches of masked modelling) broadcasts over the elements.
    `unit_targets`: the loss wants targets in [0, 1] (pixels), not in the model's input space."""

    def __init__(self, elementwise, unit_targets: bool = False):
        super().__init__()
        self.elementwise, self.unit_targets = elementwise, unit_targets

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.elementwise(prediction.float(), target.float())
        if weight is None:
            return loss.mean()
        weight = weight.float().expand_as(loss)
        return (loss * weight).sum() / weight.sum().clamp_min(1.0)


@LOSSES.register(serves=("reconstruction", "regression"))
def mse() -> nn.Module:
    """Mean squared error between prediction and target (optionally over the elements a weight selects)."""
    return ElementwiseLoss(lambda p, t: F.mse_loss(p, t, reduction="none"))


@LOSSES.register(serves=("reconstruction",))
def bce() -> nn.Module:
    """Binary cross-entropy of predicted logits against targets in [0, 1] (pixels), optionally weighted."""
    return ElementwiseLoss(lambda p, t: F.binary_cross_entropy_with_logits(p, t, reduction="none"), unit_targets=True)


@LOSSES.register(serves=("regression",))
def l1() -> nn.Module:
    """Mean absolute error between prediction and target."""
    return ElementwiseLoss(lambda p, t: F.l1_loss(p, t, reduction="none"))


@LOSSES.register(serves=("regression",))
def huber(delta: PositiveFloat = 1.0) -> nn.Module:
    """Huber loss: squared below `delta` (in standardized target units for regression), absolute above it."""
    return ElementwiseLoss(lambda p, t: F.huber_loss(p, t, reduction="none", delta=delta))
