"""Recipes: one function per verb, each config -> components -> engine -> runs/<id>/.

The YAML files here are the recipes' built-in defaults (used when no -c is given).
"""

from transferctl.recipes.evaluation import evaluate
from transferctl.recipes.prediction import embed, predict
from transferctl.recipes.quickstart import quickstart
from transferctl.recipes.resume import resume
from transferctl.recipes.training import RunResult, finetune, finetune_config, pretrain

__all__ = ["RunResult", "embed", "evaluate", "finetune", "finetune_config", "predict", "pretrain", "quickstart", "resume"]
