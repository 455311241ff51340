"""The loop's optional hooks into an objective: `train_mode` at each epoch's start and `after_step` after each step it
takes. A tiny linear model and a pipeline of made-up batches: no data set, a few milliseconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from transferctl.data.samples import Batch
from transferctl.engine.train import Selection, Settings, SilentReporter, Steps, fit

BASE_LR = 0.1
VALIDATION = Selection("val_loss", higher_is_better=False)


class ToyPipeline:
    """`per_epoch` batches of two samples per epoch; the batches at `nan_at` ((epoch, batch) pairs) hold NaNs."""

    views = 1

    def __init__(self, per_epoch: int, nan_at: tuple[tuple[int, int], ...] = ()):
        self.per_epoch, self.nan_at = per_epoch, nan_at

    def batches(self, epoch: int, start_batch: int = 0):
        for i in range(start_batch, self.per_epoch):
            fill = float("nan") if (epoch, i) in self.nan_at else float(i + 1)
            yield Batch(inputs=(torch.full((2, 3), fill),), targets=torch.zeros(2, dtype=torch.long))

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None: ...


@dataclass
class PlainObjective:
    """An objective without the optional hooks (a plugin written before them)."""

    model: nn.Module
    description: str = "training"
    selection: Selection = VALIDATION

    def prepare(self) -> None: ...

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        return self.model(batch.inputs[0]).pow(2).mean()

    def validate(self, val, batch_size, network) -> dict[str, float]:
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class HookedObjective(PlainObjective):
    """Records what the hooks see: the steps, whether the weights had moved since the step's loss, the learning rate."""

    optimizer: torch.optim.Optimizer | None = None
    taken: list[tuple[int, bool, float]] = field(default_factory=list)
    epochs_started: int = 0

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        self.before = self.model.weight.detach().clone()
        return super().loss(batch, step)

    def train_mode(self, network: nn.Module) -> None:
        self.epochs_started += 1
        network.train()

    def after_step(self, step: int) -> None:
        moved = not torch.equal(self.model.weight, self.before)
        self.taken.append((step, moved, self.optimizer.param_groups[0]["lr"]))


def _fit(objective, model: nn.Module, optimizer: torch.optim.Optimizer, pipeline: ToyPipeline, total: int, on_nan: str = "stop"):
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    settings = Settings(Steps(pipeline.per_epoch, total, drop_last=False), eval_batch_size=2, log_every=100, val_every=1, on_nan=on_nan)
    return fit(objective, model, optimizer, scheduler, pipeline, None, settings, save=lambda *args: None, reporter=SilentReporter())


def _toy() -> tuple[nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=BASE_LR)


def test_after_step_follows_each_step_taken_and_train_mode_each_epoch():
    model, optimizer = _toy()
    objective = HookedObjective(model, optimizer=optimizer)
    result = _fit(objective, model, optimizer, ToyPipeline(per_epoch=2, nan_at=((1, 0),)), total=5, on_nan="skip")
    assert result.position.step == 5
    assert [step for step, _, _ in objective.taken] == [0, 1, 3, 4]  # once per step taken; step 2 was skipped
    assert all(moved for _, moved, _ in objective.taken)  # after the optimizer updated the weights
    # before the schedule moves on: the rate the step was taken at
    assert [lr for _, _, lr in objective.taken] == pytest.approx([BASE_LR / (step + 1) for step in (0, 1, 3, 4)])
    assert objective.epochs_started == 3  # two full epochs and the partial third


def test_an_objective_without_the_hooks_gets_the_defaults():
    model, optimizer = _toy()
    model.eval()
    start = model.weight.detach().clone()
    _fit(PlainObjective(model), model, optimizer, ToyPipeline(per_epoch=2), total=3)
    assert model.training  # the default train_mode: the whole network in training mode
    assert not torch.equal(model.weight, start)


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_trains_in_float32_with_a_note_where_the_cpu_would_emulate_it(monkeypatch, tmp_path, emulated):
    from tests.conftest import make_mnist_root
    from transferctl.build import build_training
    from transferctl.config import load_config
    from transferctl.engine import train

    monkeypatch.setattr(train, "emulated_bf16", lambda device: emulated)
    sections = {
        "method": "supervised",
        "model": {"name": "cnn", "widths": [8]},
        "data": {"name": "mnist", "root": str(make_mnist_root(tmp_path, 64, 16)), "batch_size": 16},
        "train": {"precision": "bf16", "device": "cpu", "max_steps": 1},
    }
    training = build_training(load_config(None, base=sections, command="pretrain"))
    assert training.settings.precision == ("32" if emulated else "bf16")
    assert (train.EMULATED_BF16_NOTE in training.notes) is emulated
