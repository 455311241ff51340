"""The seam: a method and a task that a plugin registers run pretrain -> finetune -> evaluate -> export end to
end, with no change to transferctl; encoders give their stage feature maps; what config check skips."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_config
from transferctl.components import load_components

SEAM_PLUGIN = '''
"""A pretext method (which quarter turn was an image given?) and a task (a digit's value, as a number)."""
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transferctl.data import iterate_batches
from transferctl.engine import Evaluation, Selection
from transferctl.methods import Export, Method, Parts
from transferctl.modalities import modality_of
from transferctl.registry import HEADS, LOSSES, METHODS, TASKS
from transferctl.tasks import Task


def quarter_turns(x, turns):
    return torch.stack([torch.rot90(image, int(k), dims=(1, 2)) for image, k in zip(x, turns)])


@torch.no_grad()
def turn_accuracy(network, data, batch_size):
    network.eval()
    modality, correct = modality_of(data), 0
    for inputs, _ in iterate_batches(data, batch_size):
        x = modality.model_input(inputs, data)
        for k in range(4):
            turns = torch.full((len(x),), k)
            correct += (network(quarter_turns(x, turns)).argmax(1) == turns).sum().item()
    return correct / (4 * len(data))


@dataclass
class TurnObjective:
    forward: nn.Module
    criterion: nn.Module
    seed: int
    description: str = "pretraining"
    selection: Selection = Selection("val_turn_accuracy", higher_is_better=True)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)  # its own randomness: checkpointed

    def prepare(self):
        pass

    def loss(self, batch, step):
        (x,) = batch.inputs
        turns = torch.randint(0, 4, (len(x),), generator=self.generator)
        return self.criterion(self.forward(quarter_turns(x, turns)), turns)

    def validate(self, val, batch_size, network):
        return {"val_turn_accuracy": turn_accuracy(network, val, batch_size)}

    def epoch_metrics(self):
        return {}

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


@METHODS.register("quarter_turns")
@dataclass
class QuarterTurns(Method):
    """Predict which of four quarter turns each image was given (a plugin)."""

    head = "linear"
    loss = "cross_entropy"
    serves = "classification"
    augmentation = "light"
    uses_labels = False

    def num_outputs(self, data):
        return 4

    def objective(self, parts: Parts):
        return TurnObjective(parts.forward, parts.criterion, parts.cfg.train.seed)

    def evaluate(self, trained, run):
        return Evaluation({"turn_accuracy": turn_accuracy(trained.network, trained.split(train=False), 256)})

    def export(self):
        return Export(encoder_only=True, output="embeddings", kind="encoder")


@HEADS.register("value", serves=("digit_value",))
def value_head(feature_dim: int, num_outputs: int) -> nn.Module:
    """One linear output per value."""
    return nn.Linear(feature_dim, num_outputs)


@LOSSES.register(serves=("digit_value",))
def smooth_l1(beta: float = 1.0) -> nn.Module:
    """Smooth L1 between predicted and true values."""
    return nn.SmoothL1Loss(beta=beta)


@torch.no_grad()
def absolute_errors(model, data, batch_size, scale):
    model.eval()
    modality = modality_of(data)
    batches = iterate_batches(data, batch_size)
    return torch.cat([(model(modality.model_input(x, data)).squeeze(1) / scale - y.float()).abs() for x, y in batches])


@TASKS.register("digit_value")
@dataclass
class DigitValue(Task):
    """A digit's value as a number (a plugin)."""

    scale: float = 1.0
    head = "value"
    loss = "smooth_l1"
    serves = "digit_value"
    target_kind = "class"
    selection = Selection("val_mae", higher_is_better=False)
    output = "value"
    exported_as = "regressor"

    def num_outputs(self, data):
        return 1

    def fit(self, train):
        self.mean_value = train.targets.float().mean().item()
        return {"mean_value": self.mean_value}

    def load_fitted(self, state):
        self.mean_value = state["mean_value"]

    def batch_loss(self, criterion, outputs, targets):
        return criterion(outputs.squeeze(1), targets.float() * self.scale)

    def validate(self, network, val, batch_size):
        return {"val_mae": absolute_errors(network, val, batch_size, self.scale).mean().item()}

    def evaluate(self, model, test, batch_size, run):
        return Evaluation({"mae": absolute_errors(model, test, batch_size, self.scale).mean().item()})

    def card(self, data):
        return {"classes": None, "unit": "digit value", "mean_value": self.mean_value}  # fitted on the training split
'''

TURNS = """\
method: quarter_turns
model: {{name: cnn, widths: [8, 16]}}
optimizer: {{name: adamw, lr: 0.003}}
scheduler: {{name: constant}}
data: {{name: mnist, root: {root}, batch_size: 64, eval_batch_size: 256}}
train: {{epochs: 1, max_steps: 4, log_every: 2, device: cpu}}
"""


@pytest.fixture
def plugin(tmp_path, registries_restored):
    """The seam plugin, as a file in the current folder."""
    (tmp_path / "seam_plugin.py").write_text(SEAM_PLUGIN)
    return ["--plugin", "seam_plugin"]


def _ok(result) -> dict:
    assert result.code == 0, result.stderr
    return result.json


def _checkpoint(run_dir: str) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)


def test_a_plugins_method_and_task_run_the_whole_chain(cli, plugin, tmp_path, digits_root):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "turns.yaml", TURNS.format(root=digits_root))
    listing = _ok(cli(*plugin, "list", "--json"))
    assert listing["methods"]["quarter_turns"]["origin"] == "plugin:seam_plugin"
    assert listing["tasks"]["digit_value"]["summary"] == "A digit's value as a number (a plugin)."

    pre = _ok(cli(*plugin, "pretrain", "-c", config, "--runs-dir", runs, "--json"))
    assert 0.2 < pre["metrics"]["best_val_turn_accuracy"] == pre["metrics"]["val_turn_accuracy"]
    assert set(_checkpoint(pre["run_dir"])["training"]["objective"]) == {"generator"}
    # the objective's own random state goes with the checkpoint: a resumed run draws the same turns
    part = _ok(cli(*plugin, "pretrain", "-c", config, "train.max_steps=2", "--runs-dir", tmp_path / "part", "--json"))
    _ok(cli(*plugin, "pretrain", "--resume", part["run_dir"], "train.max_steps=4", "--runs-dir", tmp_path / "part", "--json"))
    whole, resumed = _checkpoint(pre["run_dir"])["model"], _checkpoint(part["run_dir"])["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    turns = _ok(cli(*plugin, "evaluate", "--from", pre["run_id"], "--runs-dir", runs, "--json"))
    assert set(turns["metrics"]) == {"turn_accuracy", "test_images"}

    tuned = _ok(
        cli(
            *plugin,
            "finetune",
            "--from",
            pre["run_id"],
            "task.name=digit_value",
            "task.scale=0.5",
            "data.labels_per_class=5",
            "data.batch_size=16",
            "train.max_steps=6",
            "--runs-dir",
            runs,
            "--json",
        )
    )
    tuned_dir = Path(tuned["run_dir"])
    stored = json.loads(json.dumps(__import__("yaml").safe_load((tuned_dir / "config.yaml").read_text())))
    assert stored["task"] == {"name": "digit_value", "scale": 0.5}
    assert (stored["head"]["name"], stored["loss"]) == ("value", {"name": "smooth_l1", "beta": 1.0})  # the task's defaults
    saved = _checkpoint(tuned["run_dir"])
    assert saved["task"] == {"mean_value": pytest.approx(4.5, abs=0.01)} and saved["model"]["head.weight"].shape == (1, 16)
    assert "val_mae" in tuned["metrics"] and "best_val_mae" in tuned["metrics"]

    evaluated = _ok(cli(*plugin, "evaluate", "--from", tuned["run_id"], "--runs-dir", runs, "--json"))
    exported = _ok(
        cli(
            *plugin, "export", "--from", tuned["run_id"], "--format", "torchscript", "--format", "safetensors", "--runs-dir", runs, "--json"
        )
    )
    assert all(p["passed"] for p in exported["parity"].values())
    card = json.loads((tuned_dir / "export" / "model_card.json").read_text())
    assert (card["kind"], card["method"], card["task"], card["unit"], card["output"]) == (
        "regressor",
        "finetune",
        "digit_value",
        "digit value",
        {"name": "value", "shape": ["batch", 1]},
    )
    assert card["mean_value"] == saved["task"]["mean_value"]  # the export's task got its fitted state back
    listing = {r["run_id"]: r["key_metric"]["name"] for r in _ok(cli("runs", "ls", "--runs-dir", runs, "--json"))["runs"]}
    assert [listing[made["run_id"]] for made in (pre, turns, tuned, evaluated)] == [
        "best_val_turn_accuracy",
        "turn_accuracy",
        "best_val_mae",
        "mae",
    ]
    # the exported model, served without transferctl, scores what evaluate measured
    from transferctl.config import DataConfig
    from transferctl.data import load_split
    from transferctl.modalities import modality_of

    test = load_split(DataConfig(name="mnist", root=str(digits_root)), train=False)
    served = torch.jit.load(exported["files"]["torchscript"])
    with torch.no_grad():
        predicted = served(modality_of(test).export_input(test.inputs, test)).squeeze(1) / 0.5  # raw pixels
    assert (predicted - test.targets.float()).abs().mean().item() == pytest.approx(evaluated["metrics"]["mae"], rel=1e-5)


def test_unknown_methods_and_tasks_get_a_did_you_mean(plugin, digits_root):
    from transferctl.config import load_config
    from transferctl.errors import ConfigError
    from transferctl.plugins import load_plugin

    load_plugin("seam_plugin")
    base = {"method": "quarter_turn", "data": {"name": "mnist", "root": str(digits_root)}}
    with pytest.raises(ConfigError, match="unknown method 'quarter_turn'; did you mean 'quarter_turns'"):
        load_config(None, [], base=base)
    with pytest.raises(ConfigError, match="unknown task 'digit_valu'; did you mean 'digit_value'"):
        load_config(None, ["task=digit_valu"], base={**base, "method": "finetune"})
    with pytest.raises(ConfigError, match="loss 'cross_entropy' does not fit task 'digit_value'; use one of: smooth_l1"):
        load_config(None, ["task=digit_value", "loss.name=cross_entropy"], base={**base, "method": "finetune"})


@pytest.mark.parametrize(
    "model, options, channels, strides",
    [
        ("cnn", {"widths": (8, 16, 32)}, (8, 16, 32), (1, 2, 4)),
        ("resnet18", {"small_images": True}, (64, 128, 256, 512), (1, 2, 4, 8)),
        ("resnet18", {"small_images": False}, (64, 128, 256, 512), (4, 8, 16, 32)),
    ],
)
def test_encoders_give_their_stage_feature_maps(model, options, channels, strides):
    from transferctl.registry import MODELS

    load_components()
    encoder = MODELS.build(model, options, in_channels=3, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = encoder.feature_maps(x)
    assert encoder.stage_channels == channels
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // s, 64 // s) for c, s in zip(channels, strides, strict=True)]
    with torch.no_grad():
        assert torch.allclose(maps[-1].mean(dim=(2, 3)), encoder(x))  # the pooled features are the deepest map's mean


def test_config_check_skips_label_propagation_and_notes_options_that_do_nothing(cli, tmp_path, digits_root, monkeypatch):
    from transferctl.methods import finetune as finetune_method

    def never(*args, **kwargs):
        raise AssertionError("config check ran label propagation")

    monkeypatch.setattr(finetune_method, "propagate_labels", never)
    config = write_config(
        tmp_path / "ft.yaml",
        f"""\
method: finetune
model: {{name: cnn, widths: [8, 16]}}
data: {{name: mnist, root: {digits_root}, labels_per_class: 3, batch_size: 16}}
finetune: {{unlabeled: {{weight: 1.0, batch_size: 8, propagate: true, align: true}}}}
""",
    )
    checked = cli("config", "check", "-c", config, "--json")
    assert checked.code == 0, checked.stderr
    assert not any("finetune.unlabeled" in note for note in checked.json["notes"])
    idle = cli("config", "check", "-c", config, "finetune.unlabeled.weight=0", "--json").json
    expected = (
        "finetune.unlabeled.align and finetune.unlabeled.propagate take effect only with pseudo-labels: finetune.unlabeled.weight is 0"
    )
    assert any(note.startswith(expected) for note in idle["notes"])
    run = cli("finetune", "-c", config, "finetune.unlabeled.weight=0", "train.max_steps=1", "--runs-dir", tmp_path / "runs")
    assert run.code == 0 and f"note: {expected}" in run.stderr
    assert f"note: {expected}" in (Path(run.stdout.strip()) / "log.txt").read_text()


EDGE_PLUGIN = """
from dataclasses import dataclass

from transferctl.methods import Method
from transferctl.registry import AUGMENTATIONS, METHODS


@METHODS.register("headless")
@dataclass
class Headless(Method):
    '''A method that names no default head or loss.'''


@METHODS.register("taskless")
@dataclass
class Taskless(Method):
    '''A method that trains a task but names no default one.'''

    trains_task = True


CALLS = []  # what jitter was given: each batch's shape, and the generator it drew with


@AUGMENTATIONS.register(modality="image")
def jitter(hflip_default: bool, amount: float = 0.1, level: float | None = None):
    '''Noise on whole batches: a plain callable, with no per-sample form (with `level`: every pixel that grey).'''
    import torch

    def augment(x, generator):
        CALLS.append((tuple(x.shape), generator))
        if level is not None:
            return torch.full_like(x, level)
        return (x + amount * torch.randn(x.shape, generator=generator, device=x.device)).clamp(0, 1)

    return augment
"""


@pytest.mark.parametrize(
    "args, expected",
    [
        (["method=headless", "head=null"], "head.name: method 'headless' has no default head; name one"),
        (["method=headless"], "loss.name: method 'headless' has no default loss; name one"),
        (["method=taskless"], "task: method 'taskless' trains a task head and has no default task; set task.name (classification"),
        (["task.foo=1"], "override 'task.foo=1': task: method 'simclr' trains no task head"),
        (["data.augment.name=jitter", "data.pipeline=loader"], "the loader pipeline augments one sample at a time"),
    ],
)
def test_what_a_component_leaves_out_is_a_one_line_error(cli, tmp_path, registries_restored, simclr_config, args, expected):
    (tmp_path / "edge_plugin.py").write_text(EDGE_PLUGIN)
    result = cli("--plugin", "edge_plugin", "config", "check", "-c", simclr_config, *args, "--json")
    assert result.code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in result.json["error"]


def test_a_plain_callable_augmentation_trains_on_the_memory_pipeline(cli, tmp_path, registries_restored, simclr_config):
    (tmp_path / "edge_plugin.py").write_text(EDGE_PLUGIN)
    result = cli(
        "--plugin",
        "edge_plugin",
        "pretrain",
        "-c",
        simclr_config,
        "data.augment.name=jitter",
        "data.augment.level=0.5",
        "train.max_steps=2",
        "--runs-dir",
        tmp_path / "runs",
        "--json",
    )
    assert result.code == 0, result.stderr
    # the memory pipeline calls it on whole batches of decoded images, with its own generator, once per view
    calls = sys.modules["edge_plugin"].CALLS
    assert [shape for shape, _ in calls[:4]] == [(64, 1, 28, 28)] * 4
    assert all(isinstance(generator, torch.Generator) for _, generator in calls)
    # and the model trains on what it returns: blank views make every image's embedding the same, so each step's
    # NT-Xent is exactly log(2 * 64 - 1) (its views' similarity no higher than any other's)
    (row,) = [json.loads(line) for line in (Path(result.json["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and row["train_loss"] == pytest.approx(math.log(2 * 64 - 1), rel=1e-4), (row, calls)
