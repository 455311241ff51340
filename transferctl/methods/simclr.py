"""SimCLR (Chen et al., 2020): two augmented views of every sample, a projection head, NT-Xent; no labels.
Its runs are scored by k-NN on the encoder's features and exported as the encoder alone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from transferctl import plots
from transferctl.data.augment import BatchAugment
from transferctl.data.pipeline import held_out_views
from transferctl.data.samples import Batch, Samples
from transferctl.distributed import world
from transferctl.engine.evaluate import Evaluation
from transferctl.engine.train import Selection
from transferctl.methods.base import Export, Method, Parts, knn_metrics
from transferctl.modalities.base import Modality
from transferctl.registry import METHODS

if TYPE_CHECKING:
    from transferctl.build import Trained, Training
    from transferctl.config import Config
    from transferctl.runs import Run

VALIDATION = Selection("val_loss", higher_is_better=False)


@dataclass
class ContrastiveObjective:
    """NT-Xent between the two views of every sample. Across ranks, NT-Xent gathers every rank's embeddings:
    negatives come from the global batch. `forward` is what training calls (the network, or its DDP /
    compiled wrapper)."""

    forward: nn.Module
    criterion: nn.Module
    augment: BatchAugment  # for the validation views
    modality: Modality
    gather: bool = False
    description: str = "pretraining"
    selection: Selection = VALIDATION
    validation_metrics: ClassVar[Mapping[str, bool]] = {"val_loss": False}

    def prepare(self) -> None: ...

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        z1, z2 = self.forward(torch.cat(batch.inputs)).chunk(2)
        return self.criterion(z1, z2, gather=self.gather)

    @torch.no_grad()
    def validate(self, val: Samples, batch_size: int, network: nn.Module) -> dict[str, float]:
        """NT-Xent on the held-out samples (every rank: all of them), with a fixed augmentation seed so epochs compare."""
        network.eval()
        size = min(batch_size, len(val))
        views = held_out_views(val, self.augment, self.modality, views=2, batch_size=size, seed=0)
        total, count = torch.zeros((), device=val.targets.device), 0
        for batch in views.batches(epoch=0):
            z1, z2 = network(torch.cat(batch.inputs)).chunk(2)
            total += self.criterion(z1, z2) * len(batch)
            count += len(batch)
        return {"val_loss": total.item() / max(count, 1)}

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@METHODS.register("simclr")
@dataclass
class SimCLR(Method):
    """SimCLR: two augmented views of every sample, a projection head and NT-Xent; labels unused."""

    head = "projection"
    loss = "nt_xent"
    serves = "contrastive"
    augmentation = "strong"
    views = 2
    full_batches = True  # NT-Xent contrasts each batch: every batch full of negatives
    uses_labels = False
    plots_first_batch = True
    evaluation_splits = ("train", "test")  # k-NN: the labelled training split is the bank

    def notes(self, cfg: Config) -> list[str]:
        if cfg.data.augment is not None and cfg.data.augment.name == "none" and not cfg.model.options.get("dropout"):
            return [
                "data.augment: none gives SimCSE's views, which differ only by the encoder's dropout, and the model has none: "
                "both views are the same; set model.dropout (e.g. 0.1)"
            ]
        return []

    def objective(self, parts: Parts) -> ContrastiveObjective:
        return ContrastiveObjective(parts.forward, parts.criterion, parts.augment, parts.modality, gather=world().distributed)

    def write_plots(self, run: Run, training: Training, first_inputs: tuple[torch.Tensor, ...] | None) -> None:
        if first_inputs is not None and training.modality.shows_inputs:  # text: views are token ids, not pictures
            plots.write_view_pairs(run, [training.modality.displayable(view, training.train) for view in first_inputs])

    def evaluate(self, trained: Trained, run: Run) -> Evaluation:
        """Weighted k-NN from the labelled training split's features onto the test split's."""
        return Evaluation(knn_metrics(trained))

    def export(self) -> Export:
        return Export(encoder_only=True, output="embeddings", kind="encoder")
