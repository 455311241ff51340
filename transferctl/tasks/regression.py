"""Regression: one or more continuous targets per sample, from a linear or small MLP head over pooled features.

Targets are standardized for training: the head ends in the training split's target mean and std (buffers, so
the checkpoint and every export carry them), its outputs are in the targets' own units, and the loss compares
outputs and targets after standardizing both, which is the same as training on standardized targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import PositiveInt
from torch import nn

from transferctl import agreement, plots
from transferctl.data.samples import Samples
from transferctl.engine.evaluate import Evaluation, predict
from transferctl.engine.train import Selection
from transferctl.errors import ConfigError
from transferctl.registry import HEADS, TASKS
from transferctl.tasks.base import Task

if TYPE_CHECKING:
    from transferctl.modalities.base import ReadBatch
    from transferctl.runs import Run

Effect = Literal["crop", "rotation", "translate", "hflip", "colour", "blur"]


class RegressionHead(nn.Module):
    """A linear layer (or Linear-ReLU-Linear) over the pooled features, then the targets' std and mean: its
    outputs are in the targets' units."""

    def __init__(self, body: nn.Module, num_outputs: int):
        super().__init__()
        self.body = body
        self.register_buffer("target_mean", torch.zeros(num_outputs))
        self.register_buffer("target_std", torch.ones(num_outputs))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features) * self.target_std + self.target_mean


@HEADS.register("regressor", serves=("regression",))
def regressor_head(feature_dim: int, num_outputs: int, hidden_dim: PositiveInt | None = None, standardize: bool = True) -> nn.Module:
    """Continuous outputs in the targets' units: linear over the (standardized) features, or a small MLP with
    `hidden_dim` units."""
    norm: list[nn.Module] = [nn.BatchNorm1d(feature_dim, affine=False)] if standardize else []
    if hidden_dim is None:
        layers: list[nn.Module] = [nn.Linear(feature_dim, num_outputs)]
    else:
        layers = [nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, num_outputs)]
    return RegressionHead(nn.Sequential(*norm, *layers), num_outputs)


def regression_metrics(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per target (columns): mean absolute error, root mean squared error and the coefficient of determination."""
    error = predictions.double() - targets.double()
    spread = ((targets.double() - targets.double().mean(0)) ** 2).sum(0)
    return {
        "mean_abs_error": error.abs().mean(0),
        "rmse": error.pow(2).mean(0).sqrt(),
        "r2": 1 - error.pow(2).sum(0) / spread.clamp_min(1e-12),
    }


@TASKS.register("regression")
@dataclass
class Regression(Task):
    """Continuous targets: standardized for training, predicted in their own units; mean_abs_error, rmse, r2 each.

    `changed_by` names the augmentation effects that change the targets (a rotation changes an angle, a flip
    negates it); training refuses augmentations with them. Set it to [] for targets no geometry changes."""

    changed_by: tuple[Effect, ...] = ("rotation", "hflip")
    head = "regressor"
    loss = "mse"
    serves = "regression"
    target_kind = "values"
    selection = Selection("val_loss", higher_is_better=False)  # standardized: comparable across targets and units
    validation_metrics: ClassVar[Mapping[str, bool]] = {"val_loss": False, "val_mean_abs_error": False}
    output = "values"
    exported_as = "regressor"
    augmentation = "none"  # nothing that might change the targets unless the config asks for it
    minimum_agreement: ClassVar[Mapping[str, float]] = {}  # continuous outputs: the values' difference is the check

    def __post_init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.mean = self.std = torch.zeros(0)

    def num_outputs(self, data: Samples) -> int:
        return len(data.target_names)

    def breaking_effects(self) -> frozenset[str]:
        return frozenset(self.changed_by)

    def fit(self, train: Samples) -> dict[str, Any]:
        values = train.targets.double()
        std = values.std(0, unbiased=False) if len(values) > 1 else torch.ones(values.shape[1], dtype=torch.float64)
        state = {"target_names": list(train.target_names), "mean": values.mean(0).tolist(), "std": std.clamp_min(1e-6).tolist()}
        self.load_fitted(state)
        return state

    def load_fitted(self, state: dict[str, Any]) -> None:
        self.names = tuple(state["target_names"])
        self.mean, self.std = torch.tensor(state["mean"]), torch.tensor(state["std"])

    def initialize(self, network: nn.Module) -> None:
        head = network.head
        if not isinstance(getattr(head, "target_mean", None), torch.Tensor):
            raise ConfigError("head.name: a regression head must carry the targets' mean and std (target_mean, target_std); use regressor")
        head.target_mean.copy_(self.mean)
        head.target_std.copy_(self.std)

    def batch_loss(self, criterion: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mean.device != outputs.device:  # once: the statistics then stay on the training device
            self.mean, self.std = self.mean.to(outputs.device), self.std.to(outputs.device)
        return criterion((outputs.float() - self.mean) / self.std, (targets.float() - self.mean) / self.std)

    def validate(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, float]:
        predictions = predict(network, val, batch_size)
        standardized = (predictions - self.mean.to(predictions.device)) / self.std.to(predictions.device)
        truth = (val.targets.float() - self.mean.to(predictions.device)) / self.std.to(predictions.device)
        errors = regression_metrics(predictions, val.targets)["mean_abs_error"]
        return {"val_loss": (standardized - truth).pow(2).mean().item(), "val_mean_abs_error": errors.mean().item()}

    def evaluate(self, model: nn.Module, test: Samples, batch_size: int, run: Run) -> Evaluation:
        predictions = predict(model, test, batch_size)
        per_target = {name: values.tolist() for name, values in regression_metrics(predictions, test.targets).items()}
        metrics = {name: sum(values) / len(values) for name, values in per_target.items()}  # the mean over targets
        if len(self.names) > 1:
            for name, values in per_target.items():
                metrics |= {f"{target}_{name}": value for target, value in zip(self.names, values, strict=True)}
        table = {target: {name: per_target[name][i] for name in per_target} for i, target in enumerate(self.names)}
        run.write_json("regression.json", {"targets": table, "test_samples": len(test)})
        plots.write_regression(run, list(self.names), predictions.cpu(), test.targets.cpu())
        return Evaluation(metrics, {"per_target": table})

    def compare(self, expected: torch.Tensor, actual: torch.Tensor) -> agreement.Counts:
        return agreement.none(expected, actual)

    def decode(
        self, outputs: torch.Tensor, fitted: Mapping[str, Any], top_k: int = 1, batch: ReadBatch | None = None
    ) -> list[dict[str, Any]]:
        """The predicted `value` in the target's own units (the head de-standardizes its outputs); `values` by target
        name where there are several."""
        names = list(fitted.get("target_names") or self.names)
        rows = outputs.float().tolist()
        if len(names) == 1:
            return [{"value": row[0]} for row in rows]
        return [{"values": dict(zip(names, row, strict=True))} for row in rows]

    def card(self, data: Samples) -> dict[str, Any]:
        return {
            "classes": None,
            "targets": list(self.names),
            "units": "the targets' own (the model de-standardizes its outputs)",
            "target_mean": self.mean.tolist(),
            "target_std": self.std.tolist(),
        }
