"""Export: each format reloads without transferctl and matches the eager model; parity failures and errors."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import make_mnist_root, write_config
from transferctl.build import build_network
from transferctl.config import load_config
from transferctl.data import load_split
from transferctl.methods import Export
from transferctl.modalities.image import normalize
from transferctl.recipes import export as export_module
from transferctl.recipes import finetune, pretrain
from transferctl.runs import create_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small classifier run and a small SimCLR (encoder-only) run on idx digits."""
    base = tmp_path_factory.mktemp("export")
    root = make_mnist_root(base / "data", 300, 120)
    runs = base / "runs"
    classifier_cfg = write_config(
        base / "ft.yaml",
        f"""\
method: finetune
model: {{name: cnn, widths: [8, 16]}}
data: {{name: mnist, root: {root}, labels_per_class: 10, batch_size: 32}}
train: {{max_steps: 6, device: cpu}}
""",
    )
    simclr_cfg = write_config(
        base / "simclr.yaml",
        f"""\
method: simclr
model: {{name: mlp, hidden_dim: 32}}
head: {{name: projection, hidden_dim: 32, out_dim: 8}}
data: {{name: mnist, root: {root}, batch_size: 64}}
train: {{max_steps: 3, device: cpu}}
""",
    )
    return {"classifier": finetune(None, classifier_cfg, runs_dir=runs), "encoder": pretrain(simclr_cfg, runs_dir=runs), "runs": runs}


def eager_model(run_dir: Path):
    cfg = load_config(None, base=yaml.safe_load((run_dir / "config.yaml").read_text()))
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    test = load_split(cfg.data, train=False)
    network = build_network(cfg, (test.channels, test.image_size, test.image_size), test.num_classes)
    network.load_state_dict(state)
    module = (network if cfg.method.name == "finetune" else network.encoder).eval()
    return Normalized(module, test.mean, test.std), test.inputs.float()  # exports take raw pixels, in [0, 255]


class Normalized(torch.nn.Module):
    """The eager module on raw pixels: normalized as its training split was, outside the module."""

    def __init__(self, module, mean, std):
        super().__init__()
        self.module, self.mean, self.std = module, mean, std

    def forward(self, pixels):
        return self.module(normalize(pixels / 255, self.mean, self.std))


def export(cli, trained, kind, *args):
    return cli("export", "--from", trained[kind].run_dir, *args, "--runs-dir", trained["runs"], "--json")


def test_every_format_reloads_without_transferctl_and_matches_eager(cli, trained):
    result = export(cli, trained, "classifier", "--format", "torchscript", "--format", "onnx", "--format", "safetensors")
    assert result.code == 0, result.stderr
    model, images = eager_model(trained["classifier"].run_dir)
    for batch in (1, 37):  # neither is the traced batch size
        assert_matches(result.json, model, images[:batch])
    for name in ("torchscript", "onnx", "safetensors"):
        parity = result.json["parity"][name]
        assert parity["passed"] and parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4
        assert parity["images"] == 120 and parity["batch_sizes"][0] != export_module.TRACE_BATCH


def assert_matches(out, model, x):
    with torch.no_grad():
        expected = model(x)

    scripted = torch.jit.load(out["files"]["torchscript"])
    assert torch.allclose(scripted(x), expected, atol=1e-5)

    onnx.checker.check_model(onnx.load(out["files"]["onnx"]))
    session = onnxruntime.InferenceSession(out["files"]["onnx"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # a dynamic batch axis
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.allclose(logits, expected.numpy(), atol=1e-4)
    assert (logits.argmax(1) == expected.argmax(1).numpy()).all()

    weights = load_file(out["files"]["safetensors"])
    assert weights.keys() == {f"network.{k}" for k in model.module.state_dict()}  # the module behind its pixel normalization
    assert torch.allclose(export_module.load_safetensors(out["files"]["safetensors"])(x), expected, atol=1e-6)


def test_model_card_describes_inputs_classes_and_parity(cli, trained):
    result = export(cli, trained, "classifier", "--format", "onnx")
    assert result.code == 0, result.stderr
    export_dir = Path(result.json["export_dir"])
    assert export_dir == trained["classifier"].run_dir / "export"
    card = json.loads((export_dir / "model_card.json").read_text())
    assert card["kind"] == "classifier" and card["run_id"] == trained["classifier"].run_id
    assert card["input"]["shape"] == ["batch", 1, 28, 28] and card["input"]["mean"] == [0.1307]
    assert len(card["classes"]) == 10 and card["output"] == {"name": "logits", "shape": ["batch", 10]}
    assert card["parity"]["onnx"]["passed"]
    digest = hashlib.sha256((export_dir / "model.onnx").read_bytes()).hexdigest()
    assert card["files"]["onnx"]["sha256"] == digest
    report = json.loads((trained["classifier"].run_dir / "export_report.json").read_text())
    assert report["parity"]["onnx"]["passed"]
    assert not [p for p in export_dir.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_encoder_run_exports_the_encoder(cli, trained, tmp_path):
    result = export(cli, trained, "encoder", "--format", "torchscript", "--format", "onnx", "--output", tmp_path / "out")
    assert result.code == 0, result.stderr
    _, images = eager_model(trained["encoder"].run_dir)
    scripted = torch.jit.load(str(tmp_path / "out" / "model.pt"))
    assert scripted(images[:5]).shape == (5, 32)
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["kind"] == "encoder" and card["output"]["name"] == "embeddings" and card["classes"] is None


def test_parity_check_catches_a_perturbed_model(trained):
    model, images = eager_model(trained["classifier"].run_dir)

    def perturbed(x):
        return model(x) + 1e-3

    good = export_module.check_parity(model, model, images, 1e-4, [50, 7])
    bad = export_module.check_parity(model, perturbed, images, 1e-4, [50, 7])
    assert good.passed and good.max_abs_diff == 0.0
    assert not bad.passed and bad.max_abs_diff == pytest.approx(1e-3, rel=1e-2)


def test_a_perturbed_export_fails_with_exit_1_and_keeps_the_previous_export(cli, trained, monkeypatch):
    first = export(cli, trained, "classifier", "--format", "torchscript")
    assert first.code == 0, first.stderr
    path = Path(first.json["files"]["torchscript"])
    before = path.read_bytes()

    original = export_module.FORMATS["torchscript"]

    def save_perturbed(exported, target):
        broken = copy.deepcopy(exported.module)
        with torch.no_grad():
            broken.network.head[-1].bias.add_(0.5)  # the classifier's linear layer, behind the pixel normalization
        original.save(dataclasses.replace(exported, module=broken), target)

    monkeypatch.setitem(
        export_module.FORMATS, "torchscript", export_module.Format("torchscript", "model.pt", save_perturbed, original.load)
    )
    second = export(cli, trained, "classifier", "--format", "torchscript")
    assert second.code == 1
    assert "failed its parity check" in second.stderr and "max abs diff 0.5" in second.stderr
    assert path.read_bytes() == before

    unchecked = export(cli, trained, "classifier", "--format", "torchscript", "--no-verify")
    assert unchecked.code == 0 and unchecked.json["verified"] is False and unchecked.json["parity"] == {}
    assert path.read_bytes() != before


def test_unknown_format_lists_formats_with_a_suggestion(cli, trained):
    result = export(cli, trained, "classifier", "--format", "onxx")
    assert result.code == 2
    assert "unknown export format 'onxx'; did you mean 'onnx'?" in result.stderr and "torchscript" in result.stderr


def test_missing_optional_dependency_names_the_extra(cli, trained, monkeypatch):
    real_find_spec = export_module.importlib.util.find_spec
    monkeypatch.setattr(export_module.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real_find_spec(name))
    result = export(cli, trained, "classifier", "--format", "onnx")
    assert result.code == 2 and 'pip install "transferctl[onnx]"' in result.stderr and "onnxruntime" in result.stderr


def test_a_run_without_a_checkpoint_is_refused(cli, trained):
    config = yaml.safe_load((trained["classifier"].run_dir / "config.yaml").read_text())
    run = create_run(trained["runs"], "finetune-mnist", config, None, "finetune")
    result = cli("export", "--from", run.path, "--format", "onnx", "--runs-dir", trained["runs"])
    assert result.code == 2 and "the run has no checkpoint yet" in result.stderr
    assert not (run.path / "export").exists()


def test_nan_outputs_never_pass_the_parity_check(trained):
    model, images = eager_model(trained["classifier"].run_dir)

    def broken(x):
        return torch.full_like(model(x), float("nan"))

    assert not export_module.check_parity(broken, broken, images[:20], 1e-4, [10]).passed


def test_a_new_export_removes_files_its_card_does_not_list(cli, trained, tmp_path):
    out = tmp_path / "out"
    assert export(cli, trained, "classifier", "--format", "torchscript", "--format", "safetensors", "--output", out).code == 0
    assert export(cli, trained, "classifier", "--format", "safetensors", "--output", out).code == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_card.json"]
    assert json.loads((out / "model_card.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("standardize", [False, True])
def test_safetensors_rebuilds_a_classifier_with_its_number_of_classes(tmp_path, standardize):
    """The fine-tune recipes' standardized head puts its linear layer at head.2, not head.1."""
    cfg = load_config(
        None,
        [f"head.standardize={str(standardize).lower()}"],
        base={"method": "finetune", "model": {"name": "mlp", "hidden_dim": 8}, "data": {"name": "mnist"}},
    )
    network = build_network(cfg, (1, 28, 28), 7).eval()
    example = torch.randn(3, 1, 28, 28)
    spec = Export(encoder_only=False, output="logits", kind="classifier")
    exported = export_module.Exported(network, example, spec, "images", cfg.to_dict(), num_outputs=7, sample_shape=(1, 28, 28), fitted={})
    export_module._save_safetensors(exported, tmp_path / "model.safetensors")
    rebuilt = export_module.load_safetensors(tmp_path / "model.safetensors")
    assert torch.equal(rebuilt(example), network(example)) and rebuilt(example).shape == (3, 7)


def test_safetensors_of_transferctl_0_1_still_rebuild(tmp_path):
    """0.1.0 wrote only the config and the input shape: the head's size and whether it is an encoder come from the weights."""
    from safetensors.torch import save_file

    cfg = load_config(None, [], base={"method": "finetune", "model": {"name": "mlp", "hidden_dim": 8}, "data": {"name": "mnist"}})
    network = build_network(cfg, (1, 28, 28), 7).eval()
    old = cfg.to_dict() | {"method": "finetune"}
    old.pop("task")
    metadata = {"transferctl_config": json.dumps(old), "input_shape": json.dumps([1, 28, 28])}
    example = torch.randn(3, 1, 28, 28)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, tmp_path / "classifier.safetensors", metadata=metadata)
    save_file({k: v.contiguous() for k, v in network.encoder.state_dict().items()}, tmp_path / "encoder.safetensors", metadata=metadata)
    assert torch.equal(export_module.load_safetensors(tmp_path / "classifier.safetensors")(example), network(example))
    assert torch.equal(export_module.load_safetensors(tmp_path / "encoder.safetensors")(example), network.encoder(example))
