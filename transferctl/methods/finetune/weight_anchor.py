"""L2-SP: fine-tuning's pull toward the pretrained weights, added to the task's loss when `finetune.l2_sp` is set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class WeightAnchor:
    """L2-SP (Li et al., 2018): (strength / 2) * ||w - w0||^2 over the encoder's parameters, w0 the
    pretrained values. Unlike weight decay, which pulls toward zero, it keeps a few-label fine-tune
    near the features pretraining found."""

    params: list[nn.Parameter]
    start: list[torch.Tensor]
    strength: float

    @classmethod
    def toward(cls, encoder: nn.Module, pretrained: dict[str, torch.Tensor], strength: float) -> WeightAnchor:
        named = [(name, p) for name, p in encoder.named_parameters() if p.requires_grad]
        return cls([p for _, p in named], [pretrained[name].detach().to(p.device, p.dtype).clone() for name, p in named], strength)

    def penalty(self) -> torch.Tensor:
        distance = sum(((p.float() - p0.float()) ** 2).sum() for p, p0 in zip(self.params, self.start, strict=True))
        return 0.5 * self.strength * distance
