"""Did the unlabeled data help? A fine-tune that learns from pseudo-labels is compared, once it is done, with a
labels-only head: a logistic regression on the starting encoder's features of the labelled samples (what the labels
alone give, in seconds). Both are scored on the labelled samples and on the held-out validation split; when the
fine-tune is worse on the held-out split by McNemar's paired test (one-sided, 5%: of the samples only one of the two
gets right, the fine-tune gets clearly fewer), the run says so in one line. Pseudo-labels can amplify a wrong start
(confirmation bias) and end below what the labels alone reach; so can a fine-tune too short to beat a linear head,
which the same line then tells."""

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
Z_ONE_SIDED = 1.645  # McNemar's test, one-sided at 5%: is the fine-tune right on fewer of the same samples?


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


@dataclass
class LabelsOnlyCheck:
    """The labels-only head's accuracy on the labelled samples and the validation split, worked out on the starting
    encoder (`prepare`), and the comparison with the fine-tuned network (`report`)."""

    encoder: nn.Module  # a copy of the network's encoder as it starts (pretrained, or the seeded random one)
    train: Samples
    val: Samples
    batch_size: int
    baseline: dict[str, torch.Tensor] = field(default_factory=dict)  # which samples the labels-only head gets right

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
            "labelled": right(head(labelled.cpu()), self.train.targets),
            "held_out": right(head(held_out.cpu()), self.val.targets),
        }
        self.encoder.to("cpu")  # not needed again: free the device

    def report(self, network: nn.Module) -> dict[str, Any]:
        """summary.json's `unlabeled_check`: both models' accuracies on the labelled samples and the validation split,
        the verdict of a paired test on the validation split (the labelled samples without one) and, when the
        fine-tune is worse, a `warning` line."""
        tuned = {part: right(predict(network, data, self.batch_size), data.targets) for part, data in self.parts().items()}
        check: dict[str, Any] = {
            part: {"finetuned": mean(tuned[part]), "labels_only": mean(self.baseline[part]), "samples": len(tuned[part])}
            for part in self.parts()
        }
        part = "held_out" if len(self.val) else "labelled"
        only_tuned = int((tuned[part] & ~self.baseline[part]).sum())
        only_baseline = int((self.baseline[part] & ~tuned[part]).sum())
        z = (only_tuned - only_baseline) / math.sqrt(only_tuned + only_baseline) if only_tuned + only_baseline else 0.0
        check[part].update(only_finetuned_right=only_tuned, only_labels_only_right=only_baseline, z=round(z, 3))
        check["verdict"] = "hurt" if z <= -Z_ONE_SIDED else "helped" if z >= Z_ONE_SIDED else "no clear difference"
        if check["verdict"] == "hurt":
            where = "held-out" if part == "held_out" else "labelled"
            check["warning"] = (
                f"the fine-tune with unlabeled data ends below what its labels alone give: {where} accuracy "
                f"{100 * check[part]['finetuned']:.1f}% against {100 * check[part]['labels_only']:.1f}% for a labels-only head on "
                f"the starting encoder ({check[part]['samples']} samples, {only_baseline} right only by the head, {only_tuned} only "
                f"by the fine-tune); fine-tune again with finetune.unlabeled.weight=0, or a longer finetune.unlabeled.warmup_steps"
            )
        return check

    def parts(self) -> dict[str, Samples]:
        return {"labelled": self.train, "held_out": self.val}


def right(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Which samples the logits classify correctly (bool, on the CPU)."""
    return logits.argmax(1).cpu() == labels.cpu()


def mean(correct: torch.Tensor) -> float:
    return correct.double().mean().item() if len(correct) else math.nan
