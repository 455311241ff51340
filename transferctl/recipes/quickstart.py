"""`transferctl quickstart`: pretrain -> finetune -> evaluate on the shipped MNIST sample."""

from __future__ import annotations

from pathlib import Path

from transferctl.engine.train import Reporter
from transferctl.recipes.evaluation import evaluate
from transferctl.recipes.training import RunResult, finetune, pretrain, recipe_path
from transferctl.runs import DEFAULT_RUNS_DIR


def quickstart(*, runs_dir: Path = DEFAULT_RUNS_DIR, reporter: Reporter | None = None) -> list[RunResult]:
    """The four runs of the chain: pretrain, its k-NN evaluation, finetune, its test evaluation."""
    pretrained = pretrain(recipe_path("quickstart"), runs_dir=runs_dir, reporter=reporter)
    knn = evaluate(str(pretrained.run_dir), runs_dir=runs_dir, reporter=reporter)
    tuned = finetune(str(pretrained.run_dir), runs_dir=runs_dir, reporter=reporter)
    tested = evaluate(str(tuned.run_dir), runs_dir=runs_dir, reporter=reporter)
    return [pretrained, knn, tuned, tested]
