"""Evaluation protocols: classification (accuracy, loss, per-class accuracy, confusion) and k-NN on features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transferctl.data import ImageData, iterate_batches, normalize


@dataclass
class Classification:
    accuracy: float
    loss: float
    per_class_accuracy: list[float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class


def _inputs(images: torch.Tensor, data: ImageData) -> torch.Tensor:
    return normalize(images.float().div_(255), data.mean, data.std)


@torch.no_grad()
def classify(model: nn.Module, data: ImageData, batch_size: int) -> Classification:
    """Top-1 accuracy, mean cross-entropy and the confusion matrix of `model` on `data`."""
    model.eval()
    k = data.num_classes
    confusion = torch.zeros(k, k, dtype=torch.long, device=data.images.device)
    total_loss = torch.zeros((), device=data.images.device)
    for images, labels in iterate_batches(data, batch_size):
        logits = model(_inputs(images, data))
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum")
        confusion += torch.bincount(labels * k + logits.argmax(1), minlength=k * k).view(k, k)
    confusion = confusion.cpu()
    per_class = confusion.diag().double() / confusion.sum(1).clamp_min(1)
    return Classification(
        accuracy=confusion.diag().sum().item() / max(confusion.sum().item(), 1),
        loss=total_loss.item() / max(len(data), 1),
        per_class_accuracy=per_class.tolist(),
        confusion=confusion.tolist(),
    )


@torch.no_grad()
def embed(encoder: nn.Module, data: ImageData, batch_size: int) -> torch.Tensor:
    """L2-normalized features of every image in `data`, in order."""
    encoder.eval()
    features = [F.normalize(encoder(_inputs(images, data)).float(), dim=1) for images, _ in iterate_batches(data, batch_size)]
    return torch.cat(features)


@torch.no_grad()
def knn_accuracy(
    encoder: nn.Module, bank: ImageData, queries: ImageData, *, k: int, temperature: float, batch_size: int
) -> float:
    """Weighted k-NN (cosine similarity, weights exp(sim / temperature)) from `bank`'s labels onto `queries`."""
    bank_features = embed(encoder, bank, batch_size)
    bank_labels = bank.labels
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), batch_size):
        images = queries.images[start : start + batch_size]
        sims = F.normalize(encoder(_inputs(images, queries)).float(), dim=1) @ bank_features.T
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(images), queries.num_classes, device=sims.device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sims / temperature).exp())
        correct += (votes.argmax(1) == queries.labels[start : start + batch_size]).sum().item()
    return correct / max(len(queries), 1)
