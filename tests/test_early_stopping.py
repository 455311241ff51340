"""Early stopping and validation every few steps: the loop stops once patience runs out, counts patience across a
resume, and the run records where it stopped; evaluation then reads best.pt. Bad settings are one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import write_config
from tests.test_engine_hooks import PlainObjective, ToyPipeline
from transferctl.build import schedule_metric_of
from transferctl.checkpoints import Checkpoint
from transferctl.engine.train import EarlyStop, Selection, Settings, SilentReporter, Steps, fit
from transferctl.errors import ConfigError, RunFailed
from transferctl.recipes import evaluate, pretrain
from transferctl.registry import SCHEDULERS

ACCURACY = Selection("val_accuracy", higher_is_better=True)


@dataclass
class ScriptedObjective(PlainObjective):
    """Validation returns the next score of `scores` (one per validation)."""

    scores: list[float] = field(default_factory=list)
    selection: Selection = ACCURACY
    validation_metrics: dict[str, bool] = field(default_factory=lambda: {"val_accuracy": True})
    validations: int = 0

    def validate(self, val, batch_size, network) -> dict[str, float]:
        self.validations += 1
        return {"val_accuracy": self.scores[self.validations - 1]}


def _run(
    scores,
    *,
    per_epoch=4,
    total=40,
    val_every_steps=None,
    patience=2,
    min_delta=0.0,
    cooldown=0.0,
    resume=None,
    saves=None,
    plateau=None,
    decay=None,
):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if decay is not None:  # a chainable schedule: each step's rate from the last
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)
    if plateau is not None:  # the plateau schedule's options
        scheduler = SCHEDULERS.build("plateau", plateau, optimizer=optimizer, total_steps=total)
    stop = EarlyStop("val_accuracy", True, patience, min_delta, cooldown) if patience else None
    watched = ("val_accuracy", True) if plateau is not None else None
    settings = Settings(
        Steps(per_epoch, total, False), 2, 100, 1, val_every_steps=val_every_steps, early_stop=stop, schedule_metric=watched
    )
    rows: list[dict[str, Any]] = []

    def save(weights, training, row, is_best):
        if row is not None:
            rows.append(row)
        if saves is not None:
            saves.append((weights, training, row))

    objective = ScriptedObjective(model, scores=scores)
    pipeline = ToyPipeline(per_epoch)
    result = fit(objective, model, optimizer, scheduler, pipeline, [0, 1], settings, save=save, reporter=SilentReporter(), resume=resume)
    return result, rows


def test_training_stops_once_the_metric_has_not_improved_for_patience_validations():
    result, rows = _run([0.5, 0.6, 0.6, 0.55, 0.9, 0.9], patience=2)
    assert result.position.early_stopped_at == 16  # validations at steps 4, 8, 12, 16: no gain at 12 and 16
    assert [r["step"] for r in rows] == [4, 8, 12, 16] and rows[-1]["early_stopped"]
    assert result.position.best["step"] == 12  # ties go to the later validation: best.pt holds step 12's weights
    assert result.stopped_early


def test_min_delta_counts_a_small_gain_as_none():
    scores = [0.5, 0.51, 0.52, 0.53, 0.54, 0.55, 0.56, 0.57, 0.58, 0.59]
    assert _run(scores, patience=2, min_delta=0.05)[0].position.early_stopped_at == 12
    assert _run(scores, patience=2)[0].position.early_stopped_at is None


def test_a_run_that_keeps_improving_trains_all_its_steps():
    result, rows = _run([0.1 * i for i in range(1, 11)], patience=2)
    assert result.position.step == 40 and result.position.early_stopped_at is None and len(rows) == 10


def test_validation_every_few_steps_validates_inside_epochs():
    _, rows = _run([0.1 * i for i in range(1, 30)], per_epoch=10, total=20, val_every_steps=3, patience=0)
    # every 3 steps, and at each epoch's end (10, 20) as ever; a row at a fraction of its epoch
    assert [r["step"] for r in rows] == [3, 6, 9, 10, 12, 15, 18, 20]
    assert [r["epoch"] for r in rows][:4] == [0.3, 0.6, 0.9, 1] and "val_accuracy" in rows[0]


def test_a_resumed_run_keeps_its_patience_count():
    scores = [0.5, 0.6, 0.6, 0.6, 0.6]
    whole, _ = _run(list(scores), patience=3)
    saves: list = []
    _run(list(scores), patience=3, total=12, saves=saves)  # the same run, ended after step 12 (one validation stale)
    weights, training, _ = saves[-1]
    checkpoint = Checkpoint(config={}, model=weights, data={}, epoch=3, step=12, training=training)
    resumed, rows = _run(list(scores[3:]), patience=3, resume=checkpoint)
    assert whole.position.early_stopped_at == resumed.position.early_stopped_at == 20
    assert [r["step"] for r in rows] == [16, 20]


STALLS_AT_16 = [0.5, 0.6, 0.6, 0.6, 0.9, 0.95, 0.97, 0.99, 0.99, 0.99]  # patience 2 runs out at step 16


def test_a_cooldown_anneals_the_rate_to_zero_over_its_fraction_of_the_steps_then_stops():
    """Patience runs out at step 16; a cooldown of 0.5 takes 8 more steps, the rate of step s times (24 - s) / 8, and
    the gains it brings do not restart patience. A row's `lr` is its last step's."""
    result, rows = _run(list(STALLS_AT_16), patience=2, cooldown=0.5)
    assert result.position.cooldown_from == 16 and rows[3]["cooldown_until"] == 24
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24] and rows[-1]["early_stopped"]
    assert result.position.early_stopped_at == 24 and result.stopped_early
    assert [r["lr"] for r in rows] == pytest.approx([0.01] * 4 + [0.01 * 5 / 8, 0.01 * 1 / 8])
    assert result.position.best["step"] == 24  # the annealed weights validate best: best.pt holds them


def test_a_cooldown_scales_a_chainable_schedule_s_rate_without_compounding():
    """ExponentialLR computes each rate from the last one: the cooldown's factor must apply to its rate, not build up."""
    _, rows = _run(list(STALLS_AT_16), patience=2, cooldown=0.5, decay=0.9)
    assert [r["lr"] for r in rows[4:]] == pytest.approx([0.01 * 0.9**19 * 5 / 8, 0.01 * 0.9**23 * 1 / 8])


def test_the_cooldown_s_end_is_validated_off_the_cadence_and_a_resume_inside_it_goes_on_exactly():
    saves: list = []
    whole, rows = _run(list(STALLS_AT_16), patience=2, cooldown=0.3, saves=saves)  # ceil(0.3 * 16) = 5 steps: ends at 21
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 21] and whole.position.early_stopped_at == 21
    assert rows[-1]["lr"] == pytest.approx(0.01 / 5)
    weights, training, row = saves[4]  # step 20's checkpoint, one step before the end
    assert row["step"] == 20
    checkpoint = Checkpoint(config={}, model=weights, data={}, epoch=5, step=20, training=training)
    resumed, resumed_rows = _run(list(STALLS_AT_16[5:]), patience=2, cooldown=0.3, resume=checkpoint)
    assert resumed.position.early_stopped_at == 21 and resumed_rows[0]["lr"] == pytest.approx(rows[-1]["lr"])


def test_a_cooldown_that_would_outrun_the_budget_ends_with_it():
    result, rows = _run(list(STALLS_AT_16), patience=2, cooldown=1.0, total=28)  # 16 more steps: cut at the budget's 28
    assert rows[3]["cooldown_until"] == 28 and result.position.step == 28
    assert result.position.early_stopped_at is None and rows[-1]["lr"] == pytest.approx(0.01 / 12)


def test_the_plateau_schedule_lowers_the_rate_after_patience_stale_validations_and_resumes_its_count():
    """Validations at every epoch's end (steps 4, 8, ...); two without a gain halve the rate, down to its floor. A row's
    `lr` is its last step's, so a cut made at a validation shows in the next row. A resume keeps the counters."""
    scores = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7]
    options = {"patience": 2, "factor": 0.5, "min_lr_ratio": 0.2}
    result, rows = _run(list(scores), patience=0, plateau=options)
    assert [r["lr"] for r in rows] == pytest.approx([0.01] * 4 + [0.005] * 2 + [0.0025] * 3 + [0.002])  # floor: 0.2 of 0.01
    assert result.position.step == 40  # the schedule never stops a run; early stopping does
    saves: list = []
    _run(list(scores), patience=0, plateau=options, total=20, saves=saves)  # the same run, ended after step 20: one stale
    weights, training, _ = saves[-1]
    checkpoint = Checkpoint(config={}, model=weights, data={}, epoch=5, step=20, training=training)
    _, resumed = _run(list(scores[5:]), patience=0, plateau=options, resume=checkpoint)
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in rows[5:]])


def test_a_plateau_cut_applies_from_the_next_step():
    """The next step's rate was set when the last step ended; a cut at a validation sets it again."""
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    schedule = SCHEDULERS.build("plateau", {"patience": 1, "factor": 0.1, "min_lr_ratio": 0.05}, optimizer=optimizer, total_steps=10)
    optimizer.step()
    schedule.step()
    schedule.observe(0.5, higher_is_better=False)
    schedule.observe(0.5, higher_is_better=False)  # no gain: cut now
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01) and schedule.get_last_lr() == pytest.approx([0.01])
    schedule.observe(0.4, higher_is_better=False)  # a gain: no cut
    schedule.observe(0.45, higher_is_better=False)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)  # 0.1 of 0.01 is below the floor: held at 0.05 of 0.1
    optimizer.step()
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


def test_the_plateau_schedule_watches_early_stopping_s_metric_else_best_pt_s_and_must_cut_before_it_stops():
    objective = SimpleNamespace(selection=Selection("val_loss", higher_is_better=False))
    cfg = SimpleNamespace(scheduler=SimpleNamespace(name="plateau"))
    schedule = SCHEDULERS.build("plateau", {"patience": 2}, optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), total_steps=10)
    assert schedule_metric_of(cfg, schedule, objective, [0], None) == ("val_loss", False)
    assert schedule_metric_of(cfg, schedule, objective, [0], EarlyStop("val_accuracy", True, 3)) == ("val_accuracy", True)
    with pytest.raises(ConfigError, match=r"train.early_stop.patience \(2\) is not above scheduler.patience \(2\)"):
        schedule_metric_of(cfg, schedule, objective, [0], EarlyStop("val_accuracy", True, 2))
    cosine = SCHEDULERS.build("cosine", {}, optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), total_steps=10)
    assert schedule_metric_of(cfg, cosine, objective, [], None) is None  # a per-step schedule watches nothing


# --------------------------------------------------------------------------- through the CLI

SUPERVISED = """\
method: supervised
model: {{name: cnn, widths: [8, 16]}}
optimizer: {{name: adamw, lr: 0.0001}}
data: {{name: mnist, root: {root}, batch_size: 32, eval_batch_size: 256}}
train: {{epochs: 5, log_every: 5, device: cpu, val_every_steps: 3, early_stop: {{patience: 1, min_delta: 0.5}}}}
"""


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, digits_root) -> Path:
    """A supervised run that must stop at its second validation (no gain of 0.5 in accuracy within 3 steps)."""
    folder = tmp_path_factory.mktemp("early")
    config = write_config(folder / "supervised.yaml", SUPERVISED.format(root=digits_root))
    return pretrain(config, runs_dir=folder / "runs").run_dir


def test_the_summary_says_where_the_run_stopped_and_evaluation_reads_best(stopped_run, tmp_path):
    summary = json.loads((stopped_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["early_stopped_at"] == 6 and summary["best_step"] in (3, 6)
    assert "stopped early at step 6" in (stopped_run / "log.txt").read_text()
    rows = [json.loads(line) for line in (stopped_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    result = evaluate(str(stopped_run), runs_dir=tmp_path / "runs")
    assert json.loads((result.run_dir / "metrics.jsonl").read_text())["checkpoint"] == "best"


def test_a_run_with_a_cooldown_records_where_it_began_and_stops_at_its_end(tmp_path, digits_root):
    config = write_config(tmp_path / "s.yaml", SUPERVISED.format(root=digits_root))
    options = ["scheduler.name=constant", "train.early_stop.cooldown=0.5"]
    run = pretrain(config, options, runs_dir=tmp_path / "runs").run_dir  # patience runs out at step 6: 3 more steps
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["cooldown_from"], summary["early_stopped_at"]) == (6, 9)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9] and rows[1]["cooldown_until"] == 9 and rows[-1]["lr"] == pytest.approx(1e-4 / 3)
    assert "then the rate annealed to zero from step 6" in (run / "log.txt").read_text()


def test_a_run_whose_cooldown_its_budget_cut_short_is_not_extended(tmp_path, digits_root, cli):
    """Patience runs out at step 6, a cooldown of 1.0 would end at 12, the budget ends the run at 9 with its rate at
    zero: extending it would train on at a zero rate."""
    config = write_config(tmp_path / "s.yaml", SUPERVISED.format(root=digits_root))
    runs = tmp_path / "runs"
    run = pretrain(config, ["train.early_stop.cooldown=1.0", "train.max_steps=9"], runs_dir=runs).run_dir
    assert json.loads((run / "summary.json").read_text())["cooldown_from"] == 6
    result = cli("pretrain", "--resume", str(run), "train.max_steps=20", "--runs-dir", str(runs))
    assert result.code == 2 and "annealed to zero at step 9" in result.stderr and "Traceback" not in result.stderr


def test_an_early_stopped_run_is_not_resumed(stopped_run, cli):
    result = cli("pretrain", "--resume", str(stopped_run), "--runs-dir", str(stopped_run.parent))
    assert result.code == 2 and "stopped early at step 6" in result.stderr and "Traceback" not in result.stderr


def test_an_early_stop_metric_the_run_does_not_produce_is_refused_before_a_run(tmp_path, digits_root, cli):
    config = write_config(tmp_path / "s.yaml", SUPERVISED.format(root=digits_root))
    runs = tmp_path / "runs"
    result = cli("pretrain", "-c", config, "train.early_stop.metric=val_acuracy", "--runs-dir", runs)
    assert result.code == 2
    assert "train.early_stop.metric: the run does not produce 'val_acuracy'; did you mean 'val_accuracy'?" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not runs.exists()
    result = cli("pretrain", "-c", config, "data.val_fraction=0", "--runs-dir", runs)
    assert result.code == 2 and "needs a held-out split" in result.stderr and not runs.exists()
    result = cli("pretrain", "-c", config, "train.early_stop=null", "scheduler.name=plateau", "data.val_fraction=0", "--runs-dir", runs)
    assert result.code == 2 and "scheduler: 'plateau' lowers the learning rate when validation stops improving" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not runs.exists()


def test_a_plateau_run_watches_early_stopping_s_metric(tmp_path, digits_root):
    """Through the recipes: accuracy never gains 0.5 (min_delta), so each validation after the first halves the rate
    from the next step on."""
    config = write_config(tmp_path / "s.yaml", SUPERVISED.format(root=digits_root))
    options = ["scheduler.name=plateau", "scheduler.patience=1", "scheduler.factor=0.5", "scheduler.min_delta=0.5"]
    run = pretrain(config, [*options, "train.early_stop.patience=3"], runs_dir=tmp_path / "runs").run_dir  # stale at 6, 9, 12
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 12] and rows[-1]["early_stopped"]  # patience 3: stale at 6, 9 and 12
    assert [r["lr"] for r in rows] == pytest.approx([1e-4, 1e-4, 5e-5, 2.5e-5])


def test_a_watched_metric_that_validation_does_not_give_fails_the_run_loudly():
    @dataclass
    class Misdeclared(ScriptedObjective):
        def validate(self, val, batch_size, network) -> dict[str, float]:
            return {"val_other": 0.5}  # declares val_accuracy, gives something else

    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    settings = Settings(Steps(4, 8, False), 2, 100, 1, early_stop=EarlyStop("val_accuracy", True, 2))
    with pytest.raises(RunFailed, match="validation gave val_other, not 'val_accuracy'"):
        fit(Misdeclared(model), model, optimizer, scheduler, ToyPipeline(4), [0, 1], settings, save=print, reporter=SilentReporter())
