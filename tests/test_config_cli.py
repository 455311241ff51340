"""`transferctl config show` and `config check`: the resolved config, and every component built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import write_config
from transferctl.build import build_network
from transferctl.config import load_config


def _one_line_error(result, code=2):
    assert result.code == code, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    return result.stderr


def test_show_prints_the_resolved_config_as_yaml_or_json(cli, simclr_config):
    expected = load_config(simclr_config, ["train.epochs=3"]).to_dict()
    shown = cli("config", "show", "-c", simclr_config, "train.epochs=3")
    assert shown.code == 0 and yaml.safe_load(shown.stdout) == expected
    assert expected["loss"] == {"name": "nt_xent", "temperature": 0.5}  # defaults filled in
    as_json = cli("config", "show", "-c", simclr_config, "train.epochs=3", "--json")
    assert as_json.code == 0 and as_json.json == expected


def test_show_of_a_finetune_config_merges_the_finetune_recipe(cli, tmp_path, digits_root):
    config = write_config(tmp_path / "ft.yaml", f"method: finetune\ndata: {{name: mnist, root: {digits_root}}}\n")
    shown = cli("config", "show", "-c", config, "data.labels_per_class=3", "--json").json
    assert shown["optimizer"]["name"] == "sgd" and shown["optimizer"]["lr"] == 0.05  # from the shipped recipe
    assert shown["data"]["labels_per_class"] == 3 and shown["finetune"]["source"] is None


def test_check_builds_everything_and_counts_parameters(cli, simclr_config, tmp_path):
    report = cli("config", "check", "-c", simclr_config, "--json")
    assert report.code == 0, report.stderr
    report = report.json
    network = build_network(load_config(simclr_config), (1, 28, 28), 10)
    encoder = sum(p.numel() for p in network.encoder.parameters())
    head = sum(p.numel() for p in network.head.parameters())
    assert report["parameters"] == {"total": encoder + head, "trainable": encoder + head, "encoder": encoder, "head": head}
    assert report["shapes"] == {"batch": [64, 1, 28, 28], "views": 2, "features": [64, 16], "output": [64, 16]}
    assert report["data"] == {"train_samples": 540, "val_samples": 60, "classes": 10, "input_shape": [1, 28, 28]}
    assert (report["method"], report["task"], report["components"]["modality"], report["notes"]) == ("simclr", None, "image", [])
    assert report["components"]["loss"] == "nt_xent" and report["loss"] > 0 and report["steps"] == 16
    assert not (tmp_path / "runs").exists()  # nothing written
    human = cli("config", "check", "-c", simclr_config)
    assert human.code == 0 and "config check: ok" in human.stderr and f"{encoder:,} / {head:,}" in human.stderr


def test_show_and_check_a_finetune_from_a_run(cli, simclr_config, tmp_path):
    runs = tmp_path / "runs"
    pre = cli("pretrain", "-c", simclr_config, "train.max_steps=2", "--runs-dir", runs, "--json").json
    shown = cli("config", "show", "--from", pre["run_id"], "--runs-dir", runs, "--json").json
    assert shown["method"] == {"name": "finetune"} and shown["task"] == {"name": "classification"} and shown["model"]["widths"] == [8, 16]
    assert shown["finetune"]["source"] == str(Path(pre["run_dir"]).resolve())
    probe = cli(
        "config",
        "check",
        "--from",
        pre["run_id"],
        "finetune.freeze_encoder=true",
        "data.labels_per_class=5",
        "data.batch_size=16",
        "--runs-dir",
        runs,
        "--json",
    )
    assert probe.code == 0, probe.stderr
    params = probe.json["parameters"]
    assert params["trainable"] == params["head"] == 16 * 10 + 10  # a linear probe trains the classifier only
    assert probe.json["shapes"]["output"] == [16, 10] and probe.json["data"]["train_samples"] == 50
    assert len(list(runs.iterdir())) == 1


@pytest.mark.parametrize(
    "args, expected",
    [
        (["show", "-c", "{cfg}", "train.epoch=3"], "train.epoch: unknown key; did you mean 'epochs'?"),
        (["check", "-c", "{cfg}", "model.name=cnnn"], "did you mean 'cnn'?"),
        (["check", "-c", "{cfg}", "model.widths=[8,8,8,8,8,8]"], "does not fit 1x28x28 inputs"),
        (["check", "-c", "{cfg}", "loss.temperature=1e-40"], "the loss of the first batch is nan"),
        (["check", "-c", "{cfg}", "data.root={tmp}/nowhere"], "data set 'mnist' not found"),
        (["show"], "config needs -c CONFIG"),
        (["check", "--from", "nope"], "no such run directory or run id"),
    ],
)
def test_problems_are_one_line_errors(cli, simclr_config, tmp_path, args, expected):
    result = cli("config", *[a.format(cfg=simclr_config, tmp=tmp_path) for a in args], "--json")
    assert expected in _one_line_error(result)
    assert result.json["exit_code"] == 2


def test_an_unexpected_failure_names_the_stage(cli, simclr_config, monkeypatch):
    from transferctl import build

    def broken(*args, **kwargs):
        raise RuntimeError("scheduler exploded\nsecond line")

    monkeypatch.setattr(build, "build_scheduler", broken)
    message = _one_line_error(cli("config", "check", "-c", simclr_config))
    assert (
        "config check failed at building the run (data, model, objective, optimizer, pipeline): RuntimeError: scheduler exploded" in message
    )


def test_check_a_finetune_with_warmup_l2_sp_and_pseudo_labels(cli, tmp_path, digits_root):
    """The check's loss is the training objective's, fine-tune options included (it takes the step)."""
    import torch

    from transferctl.build import build_encoder

    config = write_config(
        tmp_path / "ft.yaml",
        f"""\
method: finetune
model: {{name: cnn, widths: [8, 16], weights: enc.pt}}
data: {{name: mnist, root: {digits_root}, labels_per_class: 3, batch_size: 16}}
finetune: {{head_warmup_steps: 5, l2_sp: 0.1, unlabeled: {{weight: 1.0, batch_size: 8, threshold: 0.0}}}}
""",
    )
    torch.save(
        build_encoder(load_config(config, ["model.weights=null"]), {"in_channels": 1, "image_size": 28}).state_dict(), tmp_path / "enc.pt"
    )
    report = cli("config", "check", "-c", config, "--json")
    assert report.code == 0, report.stderr
    assert report.json["loss"] > 0 and report.json["components"]["weights"] == str(tmp_path / "enc.pt")
