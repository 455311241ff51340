"""Pseudo-labels on the unlabeled samples (FixMatch), optionally aligned to the labelled class shares and checked
against label propagation (`propagation.py`): what fine-tuning adds to the task's loss when `finetune.unlabeled.weight`
is set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transferctl.data.pipeline import UnlabeledStream


@dataclass
class PseudoLabels:
    """FixMatch (Sohn et al., 2020): the model's confident predictions on weakly augmented unlabeled
    images are cross-entropy targets for strongly augmented views of the same images. Early on few
    predictions pass `threshold`, so the term grows as the classifier becomes trustworthy. `passed` and
    `seen` count the pseudo-labels kept since they were last taken: the rate a threshold is tuned by.

    With `class_shares` (distribution alignment, as in ReMixMatch, over each batch): the predictions
    are reweighted so their batch mean matches those shares before the threshold. Classes the model
    over-predicts no longer take most pseudo-labels, so the ones it under-predicts get their share.

    With a `prior` (label propagation over the starting encoder's features, `propagation.py`): each
    prediction is multiplied by its image's propagated class distribution and renormalised. The two
    opinions err differently (the classifier on what the image looks like, the graph on which
    labelled images it lies near), so a pseudo-label that passes the threshold is one they share."""

    stream: UnlabeledStream
    weight: float
    threshold: float
    warmup_steps: int = 0  # steps of labels alone first: pseudo-labels read from a head that has learnt something
    class_shares: torch.Tensor | None = None  # the labelled images' class frequencies, summing to 1, on the device
    prior: torch.Tensor | None = None  # per pool image: class probabilities from label propagation, on the device
    passed: torch.Tensor | float = 0.0  # summed on the device: reading it every step would sync
    seen: int = 0
    propagate: Callable[[], torch.Tensor] | None = None  # computes `prior` (a pass over the data) in `prepare`
    # the task's own pseudo-labels (tags per token: `Task.pseudo_label_loss`); None: a class per sample, as above
    task_loss: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def prepare(self) -> None:
        """Compute the prior, once, before training (`config check` skips it: it costs a pass over the pool)."""
        if self.propagate is not None:
            self.prior = self.propagate()

    def loss(self, forward: nn.Module, step: int) -> torch.Tensor:
        if step < self.warmup_steps:
            return torch.zeros((), device=self.stream.data.targets.device)
        weak, strong, index = self.stream.batch(step)
        if self.task_loss is not None:
            loss, passed = self.task_loss(forward, weak, strong, self.stream.data.side_of(index), self.threshold)
            self.passed, self.seen = self.passed + passed.sum(), self.seen + len(passed)
            return self.weight * loss
        with torch.no_grad():
            prior = self.prior[index] if self.prior is not None else None
            confidence, targets = self.targets(forward(weak).float().softmax(dim=1), prior)
        mask = (confidence >= self.threshold).float()
        self.passed, self.seen = self.passed + mask.sum(), self.seen + len(mask)
        per_image = F.cross_entropy(forward(strong).float(), targets, reduction="none")
        return self.weight * (per_image * mask).mean()

    def targets(self, probabilities: torch.Tensor, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence, class) of each weak view's prediction, aligned to `class_shares` when given, then
        multiplied by the images' `prior` (renormalised) when given."""
        if self.class_shares is not None:
            aligned = probabilities * (self.class_shares / probabilities.mean(dim=0).clamp_min(1e-6))
            probabilities = aligned / aligned.sum(dim=1, keepdim=True)
        if prior is not None:  # two opinions multiplied: a class passes where both find it likely
            joint = probabilities * prior
            probabilities = joint / joint.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return probabilities.max(dim=1)

    def take_counts(self) -> tuple[torch.Tensor | float, int]:
        """(pseudo-labels kept, pseudo-labels read) since the last call (one per unlabeled sample; a task that reads its
        own counts its own: a tagger's tokens); the counts restart at zero."""
        counts = (self.passed, self.seen)
        self.passed, self.seen = 0.0, 0
        return counts
