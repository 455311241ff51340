"""What evaluating a model needs whatever it was trained for: a model's outputs, an encoder's features, and the
weighted k-NN that scores features by labels. A task's own metrics live with the task (`transferctl/tasks/`).
Samples reach the model through their modality (`model_input`), whatever it is. Under torchrun every rank
evaluates its own share of the samples (`my_share`) and the counts or outputs are summed or gathered, so
every rank ends with the metrics of all samples."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferctl.data.samples import Samples, iterate_batches
from transferctl.distributed import any_rank, gather_rows, rank_share, world
from transferctl.errors import TransferError, UsageError
from transferctl.modalities import modality_of
from transferctl.models.heads import side_for


def my_share(data: Samples) -> torch.Tensor:
    """The positions of this rank's share of `data` (all of them with one process)."""
    share = rank_share(len(data))
    return torch.arange(share.start, share.stop, device=data.targets.device)


def over_my_share(data: Samples, batch_size: int, *, with_side: bool = False) -> Iterator[tuple]:
    """(inputs, targets) batches of this rank's share (and their side information, `with_side`). A streamed read
    that fails on one rank fails on all: that rank stops early, and every rank agrees on the failure before the
    collective that would wait for it."""
    failure = None
    try:
        yield from iterate_batches(data, batch_size, order=my_share(data), with_side=with_side)  # positions in the whole split: a
        # streamed sample that cannot be read is replaced as it would be with one process
    except TransferError as exc:
        failure = exc
    if world().distributed and any_rank(failure is not None, data.targets.device) and failure is None:
        raise UsageError("another rank could not read a sample (its error says which); fix the data and run again")
    if failure is not None:
        raise failure


@dataclass
class Evaluation:
    """What `evaluate` reports: flat metrics for summary.json, and extra JSON for the command's output."""

    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def predict(model: nn.Module, data: Samples, batch_size: int) -> torch.Tensor:
    """The model's outputs (float) for every sample in `data`, in order; a network (or a module that lists them in
    `side_inputs`) gets the samples' side information."""
    model.eval()
    modality = modality_of(data)
    batches = over_my_share(data, batch_size, with_side=True)
    mine = torch.cat([model(modality.model_input(inputs, data), **side_for(model, side)).float() for inputs, _, side in batches])
    return gather_rows(mine, len(data))


@torch.no_grad()
def embed(encoder: nn.Module, data: Samples, batch_size: int) -> torch.Tensor:
    """L2-normalized features of every sample in `data`, in order."""
    encoder.eval()
    modality = modality_of(data)
    batches = over_my_share(data, batch_size, with_side=True)
    mine = torch.cat(
        [F.normalize(encoder(modality.model_input(inputs, data), **side_for(encoder, side)).float(), dim=1) for inputs, _, side in batches]
    )
    return gather_rows(mine, len(data))


@torch.no_grad()
def knn_accuracy(encoder: nn.Module, bank: Samples, queries: Samples, *, k: int, temperature: float, batch_size: int) -> float:
    """Weighted k-NN (cosine similarity, weights exp(sim / temperature)) from `bank`'s labels onto `queries`."""
    bank_features, query_features = embed(encoder, bank, batch_size), embed(encoder, queries, batch_size)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), batch_size):
        sims = query_features[start : start + batch_size] @ bank_features.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = ((top_sims - top_sims[:, :1]) / temperature).exp()  # shifted by the max: no overflow at small T
        votes = torch.zeros(len(sims), queries.num_classes, device=sims.device)
        votes.scatter_add_(1, bank.targets[top_idx], weights)
        correct += (votes.argmax(1) == queries.targets[start : start + batch_size]).sum().item()
    return correct / max(len(queries), 1)
