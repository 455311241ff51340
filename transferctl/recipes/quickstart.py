"""`transferctl quickstart`: pretrain -> finetune -> evaluate on the shipped MNIST sample, and the same fine-tune from
a random encoder on the same labels: the verdict says what pretraining bought."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferctl.config import Config, load_config
from transferctl.engine.train import Reporter
from transferctl.recipes.evaluation import evaluate
from transferctl.recipes.training import RunResult, finetune, finetune_config, pretrain, recipe_path, train_run
from transferctl.runs import DEFAULT_RUNS_DIR


def quickstart(*, runs_dir: Path = DEFAULT_RUNS_DIR, reporter: Reporter | None = None) -> list[RunResult]:
    """The six runs of the chain: pretrain, its k-NN evaluation, finetune, its test evaluation; then the same
    fine-tune from a random encoder and its test evaluation (what `verdict` compares)."""
    pretrained = pretrain(recipe_path("quickstart"), runs_dir=runs_dir, reporter=reporter)
    knn = evaluate(str(pretrained.run_dir), runs_dir=runs_dir, reporter=reporter)
    tuned = finetune(str(pretrained.run_dir), runs_dir=runs_dir, reporter=reporter)
    tested = evaluate(str(tuned.run_dir), runs_dir=runs_dir, reporter=reporter)
    scratch = train_run(from_scratch(str(pretrained.run_dir), runs_dir), runs_dir=runs_dir, command="finetune", reporter=reporter)
    scratch_tested = evaluate(str(scratch.run_dir), runs_dir=runs_dir, reporter=reporter)
    return [pretrained, knn, tuned, tested, scratch, scratch_tested]


def from_scratch(source: str, runs_dir: Path) -> Config:
    """The fine-tune `finetune --from source` runs (its recipe, labels, steps and seed), from a random encoder."""
    resolved = finetune_config(source, runs_dir=runs_dir).to_dict()
    resolved["finetune"]["source"] = None
    return load_config(None, base=resolved, command="finetune")


def verdict(runs: list[RunResult]) -> dict[str, Any]:
    """The pretrained fine-tune's test accuracy against the same fine-tune's from a random encoder, and their runs."""
    tuned, tested, scratch, scratch_tested = runs[2:6]
    pretrained_accuracy, scratch_accuracy = tested.metrics["accuracy"], scratch_tested.metrics["accuracy"]
    return {
        "pretrained_accuracy": pretrained_accuracy,
        "scratch_accuracy": scratch_accuracy,
        "difference": pretrained_accuracy - scratch_accuracy,
        "pretrained_run": tuned.run_id,
        "scratch_run": scratch.run_id,
    }


def verdict_line(found: dict[str, Any]) -> str:
    better = "beat" if found["difference"] > 0 else "did not beat"
    return (
        f"verdict: the pretrained encoder {better} training from scratch on the same labels: test accuracy "
        f"{found['pretrained_accuracy']:.1%} against {found['scratch_accuracy']:.1%} ({100 * found['difference']:+.1f} points; "
        f"runs {found['pretrained_run']} and {found['scratch_run']})"
    )
