"""Label propagation (Zhou et al., 2004; for deep semi-supervised learning, Iscen et al., 2019): a few
labels spread along the k-nearest-neighbour graph of an encoder's features, so every unlabeled image
gets a class distribution from the labelled images its neighbourhood leads to. On a pretrained encoder
that is a second opinion, independent of the classifier being fine-tuned."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def propagate_labels(
    labelled: torch.Tensor,
    labels: torch.Tensor,
    pool: torch.Tensor,
    num_classes: int,
    *,
    neighbours: int = 50,
    alpha: float = 0.99,
    steps: int = 30,
    block_elements: int = 1 << 27,
) -> torch.Tensor:
    """Class probabilities of every `pool` row: (I - alpha*W)^-1 Y by `steps` diffusion steps, W the
    symmetric, normalised graph joining each feature to its `neighbours` most similar ones (cosine
    similarity cubed, as Iscen et al.), Y the one-hot labels of `labelled`. Features are L2-normalised
    rows; an image the labels never reach gets the uniform distribution."""
    features = torch.cat([labelled, pool]).float()
    rows_per_block = max(1, min(2048, block_elements // len(features)))  # similarity blocks of at most 512 MB
    graph = _normalised_knn_graph(features, min(neighbours, len(features) - 1), rows_per_block)
    seeds = torch.zeros(len(features), num_classes, device=features.device)
    seeds[torch.arange(len(labelled), device=features.device), labels] = 1.0
    scores = seeds
    for _ in range(steps):
        scores = alpha * torch.sparse.mm(graph, scores) + seeds
    scores = scores[len(labelled) :].clamp_min(0)
    reached = scores.sum(dim=1, keepdim=True) > 0
    return torch.where(reached, F.normalize(scores, p=1, dim=1), torch.full_like(scores, 1.0 / num_classes))


def _normalised_knn_graph(features: torch.Tensor, neighbours: int, rows_per_block: int) -> torch.Tensor:
    """D^-1/2 (A + A^T) D^-1/2 as a sparse matrix, A[i, j] = max(0, cos(i, j))^3 for j among i's nearest."""
    n = len(features)
    columns, weights = [], []
    for start in range(0, n, rows_per_block):
        sims = features[start : start + rows_per_block] @ features.T
        rows = torch.arange(start, min(start + rows_per_block, n), device=features.device)
        sims[rows - start, rows] = -2.0  # not its own neighbour
        top, index = sims.topk(neighbours, dim=1)
        columns.append(index)
        weights.append(top.clamp_min(0) ** 3)
    rows = torch.arange(n, device=features.device).repeat_interleave(neighbours)
    edges = torch.stack([rows, torch.cat(columns).flatten()])
    affinity = torch.sparse_coo_tensor(edges, torch.cat(weights).flatten(), (n, n), check_invariants=True)
    affinity = (affinity + affinity.t()).coalesce()
    inv_sqrt_degree = torch.sparse.sum(affinity, dim=1).to_dense().clamp_min(1e-12).rsqrt()
    i, j = affinity.indices()
    normalised = affinity.values() * inv_sqrt_degree[i] * inv_sqrt_degree[j]
    return torch.sparse_coo_tensor(affinity.indices(), normalised, (n, n), check_invariants=True).coalesce()
