"""`model.weights`: an encoder's starting weights from a local .pt/.safetensors file, or DEFAULT (published)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tests.conftest import write_config
from transferctl.build import build_encoder, build_training
from transferctl.config import load_config
from transferctl.models.weights import load_model_weights


def _saved_encoder(cfg, path: Path, seed: int = 123) -> dict[str, torch.Tensor]:
    """A freshly initialised encoder (another seed than training's), saved to `path`."""
    torch.manual_seed(seed)
    state = build_encoder(cfg, {"in_channels": 1, "image_size": 28}).state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("filename", ["resnet18.pt", "resnet18.safetensors"])
def test_a_saved_resnet18_encoder_loads_through_the_config(simclr_config, tmp_path, filename):
    saved = _saved_encoder(load_config(simclr_config, ["model.name=resnet18"]), tmp_path / filename)
    cfg = load_config(simclr_config, ["model.name=resnet18", f"model.weights={filename}"])  # relative to the cwd
    assert cfg.model.weights == str(tmp_path / filename)  # stored absolute
    loaded = build_training(cfg).network.encoder.state_dict()
    assert _same(loaded, saved)
    torch.manual_seed(0)
    assert not torch.equal(
        build_encoder(cfg, {"in_channels": 1, "image_size": 28}).state_dict()["0.weight"], saved["0.weight"]
    )  # not the default init


def test_finetune_from_local_weights_through_the_cli(cli, simclr_config, tmp_path, digits_root):
    config = write_config(
        tmp_path / "ft.yaml",
        f"""\
method: finetune
model: {{name: cnn, widths: [8, 16], weights: enc.pt}}
data: {{name: mnist, root: {digits_root}, labels_per_class: 2, batch_size: 16}}
train: {{max_steps: 2, device: cpu}}
finetune: {{freeze_encoder: true}}
""",
    )
    saved = _saved_encoder(load_config(config, ["model.weights=null"]), tmp_path / "enc.pt")
    result = cli("finetune", "-c", config, "--runs-dir", tmp_path / "runs", "--json")
    assert result.code == 0, result.stderr
    state = torch.load(Path(result.json["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert _same({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}, saved)


def test_a_whole_network_or_a_run_checkpoint_gives_its_encoder(simclr_config, tmp_path):
    cfg = load_config(simclr_config)
    saved = _saved_encoder(cfg, tmp_path / "enc.pt")
    torch.save(
        {"model": {**{f"encoder.{k}": v for k, v in saved.items()}, "head.0.weight": torch.ones(2)}, "step": 3}, tmp_path / "ckpt.pt"
    )
    encoder = build_encoder(cfg, {"in_channels": 1, "image_size": 28})
    load_model_weights(encoder, load_config(simclr_config, ["model.weights=ckpt.pt"]))
    assert _same(encoder.state_dict(), saved)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.weights=missing.pt"], "missing.pt: no such file"),
        (["model.weights=enc.pt", "model.widths=[8,32]"], "does not fit model 'cnn'"),
        (["model.name=mlp", "model.weights=enc.pt"], "10 unexpected keys (first: 0.weight)"),
        (["model.weights=junk.pt"], "not a readable state dict (UnpicklingError)"),
        (["model.weights=DEFAULT"], "model 'cnn' has no published weights"),
        (["model.name=resnet18", "model.weights=DEFAULT"], "set model.small_images=false"),
        (
            ["model.name=resnet18", "model.small_images=false", "model.weights=DEFAULT"],
            "downloading the published weights of 'resnet18' failed (URLError",
        ),
    ],
)
def test_weights_that_cannot_be_used_are_one_line_errors(cli, simclr_config, tmp_path, monkeypatch, overrides, expected):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    _saved_encoder(load_config(simclr_config), tmp_path / "enc.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    result = cli("config", "check", "-c", simclr_config, *overrides, "--json")
    assert result.code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert expected in result.json["error"]
    if "failed" in expected:
        assert "use a local file: model.weights=PATH" in result.json["error"]


def test_default_resnet18_weights_are_torchvisions_imagenet_weights_renamed(simclr_config, monkeypatch):
    torch.manual_seed(7)
    published = torchvision.models.resnet18(weights=None).state_dict()  # stands in for the download
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda url, **kwargs: published)
    cfg = load_config(simclr_config, ["model.name=resnet18", "model.small_images=false", "model.weights=DEFAULT"])
    encoder = build_encoder(cfg, {"in_channels": 3, "image_size": 64})
    load_model_weights(encoder, cfg)
    loaded = encoder.state_dict()
    assert torch.equal(loaded["0.weight"], published["conv1.weight"])
    assert torch.equal(loaded["7.1.bn2.running_var"], published["layer4.1.bn2.running_var"])
    assert len(loaded) == len([k for k in published if not k.startswith("fc.")])


def test_a_finetune_from_a_run_refuses_other_weights(cli, tmp_path):
    from transferctl.errors import ConfigError

    with pytest.raises(ConfigError, match="takes its encoder from RUN"):
        load_config(
            None, ["model.weights=x.pt"], base={"method": "finetune", "data": {"name": "mnist"}, "finetune": {"source": str(tmp_path)}}
        )


def _image_folder(root: Path, per_class: dict[str, int]) -> Path:
    from PIL import Image

    generator = np.random.default_rng(0)
    for split, count in per_class.items():
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(generator.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_the_shipped_image_folder_config_checks_with_local_torchvision_weights(cli, tmp_path):
    root = _image_folder(tmp_path / "my_images", {"train": 6, "test": 2})
    torch.manual_seed(3)
    torchvision_state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(torchvision_state, tmp_path / "resnet18-local.pth")  # what torch.hub caches, copied by hand
    config = Path(__file__).parent.parent / "configs" / "finetune_imagefolder.yaml"
    result = cli("config", "check", "-c", config, f"data.root={root}", "model.weights=resnet18-local.pth", "data.image_size=32", "--json")
    assert result.code == 0, result.stderr
    report = result.json
    assert report["components"]["weights"] == str(tmp_path / "resnet18-local.pth")
    assert report["data"] == {"train_samples": 11, "val_samples": 1, "classes": 2, "input_shape": [3, 32, 32]}
    assert report["shapes"]["features"] == [11, 512] and report["shapes"]["output"] == [11, 2]
    assert report["parameters"]["head"] == 512 * 2 + 2
