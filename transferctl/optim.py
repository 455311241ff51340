"""Optimizers and learning-rate schedules.

Optimizers receive parameter groups from the engine; a group's `lr_scale` (the encoder's, in
fine-tuning) multiplies the configured learning rate. Schedules are multiplicative factors over
optimizer steps, so they apply to every group alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Annotated, Any

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from transferctl.engine.train import improves
from transferctl.registry import OPTIMIZERS, SCHEDULERS

Momentum = Annotated[float, Field(ge=0.0, lt=1.0)]
Betas = tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]]


BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|block|blocks)\.(\d+)\.")  # a transformer's numbered blocks, by their names


def layer_depths(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """Each encoder parameter's depth, from 0 (the input's embedding) to the top (what follows the last block), and the
    top: a timm model's own grouping (`group_matcher`), else its numbered blocks (`layer.3.`, `blocks.3.`), what is
    registered before the first of them at depth 0 and after the last at the top."""
    inner = getattr(encoder, "model", None)
    if inner is not None and hasattr(inner, "group_matcher"):
        from timm.models import group_parameters

        depths = {f"model.{k}": v for k, v in group_parameters(inner, inner.group_matcher(coarse=False), reverse=True).items()}
        top = max(depths.values(), default=0) + 1
        return {name: depths.get(name, top) for name, _ in encoder.named_parameters()}, top
    names = [name for name, _ in encoder.named_parameters()]
    blocks = {name: int(match.group(1)) + 1 for name in names if (match := BLOCK.search(name))}
    top = max(blocks.values(), default=0) + 1
    depths, seen_block = {}, False
    for name in names:
        seen_block = seen_block or name in blocks
        depths[name] = blocks.get(name, top if seen_block else 0)
    return depths, top


def layer_decayed(encoder: nn.Module, lr_scale: float, decay: float, weight_decay: float | None) -> list[dict[str, Any]]:
    """The encoder's parameters in one group per depth, each at `lr_scale * decay ** (top - depth)` (BEiT's layer-wise
    decay: the input's layers move least, the last block at `lr_scale * decay`)."""
    depths, top = layer_depths(encoder)
    by_depth: dict[int, list[torch.Tensor]] = {}
    for name, parameter in encoder.named_parameters():
        by_depth.setdefault(depths[name], []).append(parameter)
    extra = {"weight_decay": weight_decay} if weight_decay is not None else {}
    return [{"params": by_depth[d], "lr_scale": lr_scale * decay ** (top - d), **extra} for d in sorted(by_depth)]


def _groups(params: Iterable[dict[str, Any]], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Apply `lr * lr_scale` per group; biases and norm weights (1-d tensors) get no weight decay, and a
    group's own `weight_decay` overrides the optimizer's."""
    groups = []
    for group in params:
        scale = group.get("lr_scale", 1.0)
        tensors = [p for p in group["params"] if p.requires_grad]
        decay = [p for p in tensors if p.ndim > 1]
        no_decay = [p for p in tensors if p.ndim <= 1]
        for subset, wd in ((decay, group.get("weight_decay", weight_decay)), (no_decay, 0.0)):
            if subset:
                groups.append({"params": subset, "lr": lr * scale, "weight_decay": wd, "lr_scale": scale})
    return groups


@OPTIMIZERS.register()
def sgd(params, lr: PositiveFloat = 0.1, momentum: Momentum = 0.9, weight_decay: NonNegativeFloat = 5e-4, nesterov: bool = True):
    """SGD with (Nesterov) momentum."""
    return torch.optim.SGD(_groups(params, lr, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, foreach=True)


@OPTIMIZERS.register()
def adam(params, lr: PositiveFloat = 1e-3, betas: Betas = (0.9, 0.999), weight_decay: NonNegativeFloat = 0.0):
    """Adam."""
    return torch.optim.Adam(_groups(params, lr, weight_decay), lr=lr, betas=betas, foreach=True)


@OPTIMIZERS.register()
def adamw(params, lr: PositiveFloat = 1e-3, betas: Betas = (0.9, 0.999), weight_decay: NonNegativeFloat = 0.05):
    """AdamW (decoupled weight decay)."""
    return torch.optim.AdamW(_groups(params, lr, weight_decay), lr=lr, betas=betas, foreach=True)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., 2017), as SimCLR uses for large batches.

    Parameters without weight decay (biases, norm weights) skip the trust ratio, following SimCLR.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] > 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    weight_norm, grad_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = group["trust_coefficient"] * weight_norm / grad_norm
                    grad = grad * torch.where((weight_norm > 0) & (grad_norm > 0), trust, torch.ones_like(trust))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


@OPTIMIZERS.register()
def lars(
    params,
    lr: PositiveFloat = 0.3,
    momentum: Momentum = 0.9,
    weight_decay: NonNegativeFloat = 1e-6,
    trust_coefficient: PositiveFloat = 0.001,
):
    """LARS: SGD with momentum and a per-layer trust ratio, for large-batch contrastive pretraining."""
    return LARS(_groups(params, lr, weight_decay), lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


@SCHEDULERS.register()
def cosine(optimizer, total_steps: int, warmup_steps: NonNegativeInt = 0, min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0):
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` of the learning rate."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


@SCHEDULERS.register()
def constant(optimizer, total_steps: int, warmup_steps: NonNegativeInt = 0):
    """A constant learning rate after an optional linear warmup."""
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps))


class PlateauSchedule(LambdaLR):
    """Linear warmup, then the learning rate times `factor` each time the watched validation metric has gone
    `patience` validations without improving by more than `min_delta` (Keras' ReduceLROnPlateau; PyTorch's cuts after
    patience + 1, with a relative threshold), never below `min_lr_ratio` of it. The training loop calls `observe` after
    each validation; the counters go with the checkpoint (LambdaLR's state holds this object's attributes)."""

    def __init__(self, optimizer, warmup_steps: int, factor: float, patience: int, min_delta: float, min_lr_ratio: float):
        self.factor, self.patience, self.min_delta, self.min_lr_ratio = factor, patience, min_delta, min_lr_ratio
        self.scale, self.best, self.stale = 1.0, None, 0
        super().__init__(optimizer, lambda step: _warmup(step, warmup_steps) * self.scale)

    def observe(self, value: float, higher_is_better: bool) -> None:
        """One validation's value of the watched metric; a cut applies from the next step on."""
        if improves(value, self.best, higher_is_better, self.min_delta):
            self.best, self.stale = value, 0
            return
        self.stale += 1
        if self.stale >= self.patience:
            self.scale, self.stale = max(self.scale * self.factor, self.min_lr_ratio), 0
            # the rate of the next step was set when the last step ended: set it again, with the cut
            self._last_lr = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]
            for group, rate in zip(self.optimizer.param_groups, self._last_lr, strict=True):
                group["lr"] = rate


@SCHEDULERS.register()
def plateau(
    optimizer,
    total_steps: int,
    warmup_steps: NonNegativeInt = 0,
    factor: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1,
    patience: Annotated[int, Field(ge=1)] = 2,
    min_delta: NonNegativeFloat = 0.0,
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.001,
):
    """Linear warmup, then the rate times `factor` whenever validation has not improved for `patience` validations
    (the metric `train.early_stop` watches, else the one that picks best.pt): pairs with early stopping, for a budget
    with room to spare."""
    return PlateauSchedule(optimizer, min(warmup_steps, max(total_steps - 1, 0)), factor, patience, min_delta, min_lr_ratio)
