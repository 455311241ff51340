"""Losses against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from transferctl.losses import cross_entropy, nt_xent


def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """The SimCLR paper's definition, one anchor at a time."""
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        positive = (i + n) % n2
        sims = [(z[i] @ z[k]).item() / temperature for k in range(n2)]
        denominator = sum(math.exp(sims[k]) for k in range(n2) if k != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / n2


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_direct_computation(temperature):
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    assert nt_xent(temperature)(z1, z2).item() == pytest.approx(nt_xent_by_hand(z1, z2, temperature), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_high_for_swapped_ones():
    z = torch.eye(8) * 5
    loss = nt_xent(0.1)
    assert loss(z, z).item() < 0.01
    assert loss(z, z.roll(1, dims=0)).item() > 5


def test_nt_xent_gradient_flows_to_both_views():
    z1, z2 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    nt_xent(0.5)(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_cross_entropy_label_smoothing():
    logits, labels = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([0])
    assert cross_entropy(0.0)(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    assert cross_entropy(0.3)(logits, labels).item() > cross_entropy(0.0)(logits, labels).item()


def test_objectives_call_wrapped_forwards_without_asking_their_truth():
    """torch.compile's wrapper raises on len(); an objective must not test it for truthiness."""
    from torch import nn

    from transferctl.data import Batch
    from transferctl.data.augment import BatchAugment
    from transferctl.methods.simclr import ContrastiveObjective
    from transferctl.methods.supervised import TaskObjective
    from transferctl.modalities import modality_named
    from transferctl.models import Network
    from transferctl.tasks.classification import Classification

    class CompiledLike(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

        def __len__(self):
            raise TypeError("does not support len()")

    network = Network(nn.Flatten(), nn.Linear(4, 3))
    x, labels = torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    contrastive = ContrastiveObjective(CompiledLike(network), nt_xent(0.5), BatchAugment(), modality_named("image"))
    classifier = TaskObjective(network, Classification(), cross_entropy(0.0), CompiledLike(network))
    assert torch.isfinite(contrastive.loss(Batch((x, x), labels), 0)) and torch.isfinite(classifier.loss(Batch((x,), labels), 0))
