"""Weight averaging: an exponential moving average (EMA) of a network's weights over training steps.

The average moves less with each noisy step than the trained weights do, so it usually scores a
little higher and varies less between runs, most of all with few labels. Batch-norm running
statistics are averaged too; integer buffers (batch counts) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """`network`'s EMA: after update n, avg <- d * avg + (1 - d) * live with d = min(decay, (1 + n) / (10 + n)).

    The warm-up of d (as in TensorFlow's ExponentialMovingAverage with num_updates) lets the average
    follow the first steps quickly instead of holding on to the initial weights for ~1 / (1 - decay)
    steps, which can be longer than a short fine-tune.
    """

    def __init__(self, network: nn.Module, decay: float):
        self.network = copy.deepcopy(network).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        # (average, live) tensor pairs, found once: state_dict tensors share storage with the modules,
        # so the per-step update touches no dicts (load_state_dict copies in place and keeps them valid)
        averages, live = self.network.state_dict(), network.state_dict()
        names = _one_name_per_tensor(averages)  # a tied tensor (a head sharing the token table) moves once a step
        self._floats = [(averages[k], live[k]) for k in names if averages[k].is_floating_point()]
        self._counters = [(averages[k], live[k]) for k in names if not averages[k].is_floating_point()]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average toward the live network's current weights."""
        weight = 1.0 - self.current_decay()
        for average, live in self._floats:
            average.lerp_(live.to(average.dtype), weight)
        for average, live in self._counters:
            average.copy_(live)
        self.updates += 1


def _one_name_per_tensor(state: dict[str, torch.Tensor]) -> list[str]:
    """The state's names, the first only of those that name one tensor (tied weights are listed under each name)."""
    seen: set[int] = set()
    names = []
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            names.append(name)
    return names
