"""Plugins: `--plugin MODULE` and the `transferctl.plugins` entry points add components to the registries."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
import torch

from transferctl import plugins
from transferctl.components import load_components
from transferctl.registry import REGISTRIES

TINY_MODEL = '''
from torch import nn
from transferctl.registry import MODELS


@MODELS.register()
def tiny_mlp(in_channels: int, image_size: int, hidden_dim: int = 24) -> nn.Module:
    """One linear layer on the flattened image (a plugin)."""
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden_dim), nn.ReLU())
    encoder.feature_dim = hidden_dim
    return encoder
'''

EXTRA_LOSS = '''
from torch import nn
from transferctl.registry import LOSSES


@LOSSES.register(serves=("classification",))
def smooth_ce(smoothing: float = 0.2) -> nn.Module:
    """Cross-entropy with label smoothing (from an entry point)."""
    return nn.CrossEntropyLoss(label_smoothing=smoothing)
'''


@pytest.fixture(autouse=True)
def _restored_registries(monkeypatch, tmp_path):
    """Plugins register into process-wide registries: each test leaves them, sys.path and sys.modules (its
    plugin modules) as it found them."""
    load_components()
    saved = {kind: dict(registry._entries) for kind, registry in REGISTRIES.items()}
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for kind, registry in REGISTRIES.items():
        registry._entries.clear()
        registry._entries.update(saved[kind])
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def _state(run_dir, prefix="encoder."):
    state = torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_a_plugin_model_pretrains_and_finetunes_through_the_cli(cli, simclr_config, tmp_path):
    runs = tmp_path / "runs"
    use_plugin = ["model.name=tiny_mlp", "model.hidden_dim=24", "train.max_steps=2", "--runs-dir", runs, "--json"]
    unknown = cli("pretrain", "-c", simclr_config, *use_plugin)
    assert unknown.code == 2 and "unknown model 'tiny_mlp'" in unknown.json["error"]

    (tmp_path / "tiny_plugin.py").write_text(TINY_MODEL)  # in the current folder, as a user's would be
    pre = cli("--plugin", "tiny_plugin", "pretrain", "-c", simclr_config, *use_plugin)
    assert pre.code == 0, pre.stderr
    encoder = _state(pre.json["run_dir"])
    assert encoder["encoder.1.weight"].shape == (24, 28 * 28)

    tuned = cli(
        "--plugin",
        "tiny_plugin",
        "finetune",
        "--from",
        pre.json["run_id"],
        "finetune.freeze_encoder=true",
        "data.labels_per_class=2",
        "data.batch_size=16",
        "train.max_steps=2",
        "--runs-dir",
        runs,
        "--json",
    )
    assert tuned.code == 0, tuned.stderr
    assert tuned.json["parent"] == pre.json["run_id"]
    probed = _state(tuned.json["run_dir"])
    assert probed.keys() == encoder.keys() and all(torch.equal(probed[k], encoder[k]) for k in encoder)
    assert _state(tuned.json["run_dir"], "head.")["head.2.weight"].shape == (10, 24)  # the recipe's head: standardize, dropout, linear

    listing = cli("--plugin", "tiny_plugin", "list", "models", "--json")
    assert listing.json["models"]["tiny_mlp"] == {
        "summary": "One linear layer on the flattened image (a plugin).",
        "origin": "plugin:tiny_plugin",
    }
    assert listing.json["models"]["cnn"]["origin"] == "builtin"
    human = cli("list", "models")
    assert "tiny_mlp" in human.stdout and "[plugin:tiny_plugin]" in human.stdout


def test_a_plugin_file_path_works_too(cli, tmp_path):
    path = tmp_path / "plugins" / "file_plugin.py"
    path.parent.mkdir()
    path.write_text(TINY_MODEL)
    listing = cli("--plugin", str(path), "list", "models", "--json")
    assert listing.code == 0, listing.stderr
    assert listing.json["models"]["tiny_mlp"]["origin"] == "plugin:file_plugin"


@pytest.mark.parametrize(
    "source, expected",
    [
        (None, "--plugin missing_plugin: cannot load it (ModuleNotFoundError: No module named 'missing_plugin')"),
        ("raise RuntimeError('no GPU\\nhere')", "cannot load it (RuntimeError: no GPU here)"),
        (
            "from transferctl.registry import MODELS\n@MODELS.register()\ndef cnn(in_channels: int):\n    '''x'''\n",
            "cannot load it (ValueError: model 'cnn' is already registered)",
        ),
    ],
)
def test_a_plugin_that_fails_to_load_is_a_one_line_error(cli, simclr_config, tmp_path, source, expected):
    if source is not None:
        (tmp_path / "missing_plugin.py").write_text(source)
    result = cli("--plugin", "missing_plugin", "pretrain", "-c", simclr_config, "--runs-dir", tmp_path / "runs", "--json")
    assert result.code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert expected in result.json["error"]
    assert not (tmp_path / "runs").exists()


def _entry_points(tmp_path, monkeypatch, value: str):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    entry = importlib.metadata.EntryPoint(name="extras", value=value, group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [entry] if group == plugins.ENTRY_POINT_GROUP else [])


def test_entry_point_plugins_load_automatically(cli, tmp_path, monkeypatch, digits_root):
    (tmp_path / "ep_plugin.py").write_text(EXTRA_LOSS)
    _entry_points(tmp_path, monkeypatch, "ep_plugin")
    listing = cli("list", "losses", "--json")
    assert listing.code == 0, listing.stderr
    assert listing.json["losses"]["smooth_ce"]["origin"] == "plugin:ep_plugin"
    from transferctl.config import load_config

    cfg = load_config(None, ["loss.name=smooth_ce"], base={"method": "supervised", "data": {"name": "mnist", "root": str(digits_root)}})
    assert cfg.loss.name == "smooth_ce" and cfg.loss.options == {"smoothing": 0.2}


def test_a_broken_entry_point_is_a_one_line_error(cli, tmp_path, monkeypatch):
    _entry_points(tmp_path, monkeypatch, "no_such_module_here")
    result = cli("list", "--json")
    assert result.code == 2 and result.stderr.count("\n") == 1
    assert "plugin 'extras'" in result.json["error"] and "no_such_module_here" in result.json["error"]
