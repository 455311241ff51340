"""Did the unlabeled data help? A fine-tune that learns from pseudo-labels is compared, once it is done, with a
labels-only head: a logistic regression on the starting encoder's features of the labelled samples (what the labels
alone give, in seconds). Both are scored on the labelled samples and on the held-out validation split; when the
fine-tune is clearly worse on the held-out split (beyond twice the binomial standard error), the run says so in one
line: pseudo-labels can amplify a wrong start (confirmation bias) and end below what the labels alone reach (so can
a fine-tune too short to beat a linear head, which the same line then tells)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferctl.data.samples import Samples
from transferctl.engine.evaluate import embed, predict

L2 = 1.0  # the regression's inverse strength, scikit-learn's C


def logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, iterations: int = 200) -> Callable:
    """A multinomial logistic regression (standardized features, L2 with scikit-learn's C=1, L-BFGS) fitted on
    `features`; returns the function that gives class logits of new features."""
    features = features.float()
    mean, std = features.mean(0), features.std(0, unbiased=False).clamp_min(1e-6)
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels) + weight.pow(2).sum() / (2 * L2 * len(x))
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda new: ((new.float() - mean) / std) @ weight + bias


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1).cpu() == labels.cpu()).double().mean().item() if len(labels) else math.nan


@dataclass
class LabelsOnlyCheck:
    """The labels-only head's accuracy on the labelled samples and the validation split, worked out on the starting
    encoder (`prepare`), and the comparison with the fine-tuned network (`report`)."""

    encoder: nn.Module  # a copy of the network's encoder as it starts (pretrained, or the seeded random one)
    train: Samples
    val: Samples
    batch_size: int
    baseline: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, encoder: nn.Module, starting: Callable[[], dict[str, torch.Tensor]] | None, train: Samples, val: Samples, batch_size: int):
        start = copy.deepcopy(encoder)
        if starting is not None:
            start.load_state_dict(starting())
        return cls(start, train, val, batch_size)

    def prepare(self) -> None:
        device = self.train.targets.device
        self.encoder.to(device)
        labelled, held_out = embed(self.encoder, self.train, self.batch_size), embed(self.encoder, self.val, self.batch_size)
        head = logistic_regression(labelled.cpu(), self.train.targets.cpu(), self.train.num_classes)
        self.baseline = {
            "labelled": accuracy(head(labelled.cpu()), self.train.targets),
            "held_out": accuracy(head(held_out.cpu()), self.val.targets),
        }
        self.encoder.to("cpu")  # not needed again: free the device

    def report(self, network: nn.Module) -> dict[str, Any]:
        """summary.json's `unlabeled_check`: both models' accuracies, the verdict and, when the unlabeled data made
        things worse, a `warning` line."""
        tuned = {
            "labelled": accuracy(predict(network, self.train, self.batch_size), self.train.targets),
            "held_out": accuracy(predict(network, self.val, self.batch_size), self.val.targets),
        }
        check: dict[str, Any] = {
            part: {"finetuned": tuned[part], "labels_only": self.baseline[part], "samples": len(data)}
            for part, data in (("labelled", self.train), ("held_out", self.val))
        }
        part = "held_out" if len(self.val) else "labelled"
        gap, samples = tuned[part] - self.baseline[part], len(self.val) if len(self.val) else len(self.train)
        mean = (tuned[part] + self.baseline[part]) / 2
        margin = 2 * math.sqrt(max(mean * (1 - mean), 1e-12) / max(samples, 1))
        check["verdict"] = "hurt" if gap < -margin else "helped" if gap > margin else "no clear difference"
        if check["verdict"] == "hurt":
            where = "held-out" if part == "held_out" else "labelled"
            check["warning"] = (
                f"the fine-tune with unlabeled data ends below what its labels alone give: {where} accuracy "
                f"{100 * tuned[part]:.1f}% against {100 * self.baseline[part]:.1f}% for a labels-only head on the starting encoder "
                f"({samples} samples); fine-tune again with finetune.unlabeled.weight=0, or a longer finetune.unlabeled.warmup_steps"
            )
        return check
