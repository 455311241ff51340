"""Config loading, overrides and validation: every error names the key, the problem and the fix."""

from __future__ import annotations

import pytest

from transferctl.config import apply_overrides, load_config, parse_override, read_yaml
from transferctl.errors import ConfigError

BASE = {"method": "simclr", "data": {"name": "mnist"}}


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_minimal_config_resolves_method_defaults_and_every_option(tmp_path):
    cfg = load_config(write(tmp_path, "method: simclr\ndata: {name: mnist}\n"))
    assert (cfg.head.name, cfg.loss.name, cfg.data.augment.name) == ("projection", "nt_xent", "simclr")
    assert cfg.loss.options == {"temperature": 0.5}
    assert cfg.model.options["widths"] == (32, 64, 128)
    assert cfg.optimizer.options["lr"] == pytest.approx(1e-3)

    classifier = load_config(write(tmp_path, "method: finetune\ndata: {name: mnist}\n"))
    assert (classifier.head.name, classifier.loss.name) == ("linear", "cross_entropy")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "method: supervised\ndata: {name: fashion_mnist, labels_per_class: 5}\n"))
    again = load_config(None, base=cfg.to_dict())
    assert again == cfg


def test_overrides_parse_yaml_scalars_and_dotted_keys():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("data.root=null") == (["data", "root"], None)
    assert parse_override("model.widths=[8, 16]") == (["model", "widths"], [8, 16])
    assert parse_override("data.download=true") == (["data", "download"], True)
    assert apply_overrides(BASE, ["optimizer.name=sgd", "optimizer.lr=0.1"])["optimizer"] == {"name": "sgd", "lr": 0.1}


@pytest.mark.parametrize("text", ["train.epochs", "=3", "train..epochs=3", "1x=2"])
def test_malformed_override_is_a_config_error(text):
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        parse_override(text)


def test_override_wins_over_file_and_is_validated(tmp_path):
    path = write(tmp_path, "method: simclr\ndata: {name: mnist}\ntrain: {epochs: 5}\n")
    assert load_config(path, ["train.epochs=7"]).train.epochs == 7
    message = error_of(path, ["train.epochs=-1"])
    assert message.startswith("override 'train.epochs=-1': train.epochs:")
    assert "greater than 0" in message


def test_misspelled_key_in_yaml_suggests_the_right_one(tmp_path):
    message = error_of(write(tmp_path, "method: simclr\ndata: {name: mnist}\ntrain: {epoch: 5}\n"))
    assert str(tmp_path / "c.yaml") in message
    assert "train.epoch: unknown key; did you mean 'epochs'?" in message


def test_misspelled_override_suggests_the_right_key(tmp_path):
    message = error_of(write(tmp_path, "method: simclr\ndata: {name: mnist}\n"), ["trian.epochs=3"])
    assert "override 'trian.epochs=3'" in message and "did you mean 'train'?" in message


def test_misspelled_component_option_suggests_and_lists_options(tmp_path):
    message = error_of(write(tmp_path, "method: simclr\ndata: {name: mnist}\nloss: {name: nt_xent, temprature: 0.1}\n"))
    assert "loss.temprature: unknown option" in message and "did you mean 'temperature'?" in message


def test_unknown_component_lists_registered_ones(tmp_path):
    message = error_of(write(tmp_path, "method: simclr\ndata: {name: mnist}\noptimizer: {name: adamm}\n"))
    assert "optimizer.name: unknown optimizer 'adamm'; did you mean 'adam'?" in message
    assert "registered: adam, adamw, lars, sgd" in message


def test_unknown_dataset_is_named(tmp_path):
    assert "unknown dataset 'minst'; did you mean 'mnist'?" in error_of(write(tmp_path, "method: simclr\ndata: {name: minst}\n"))


@pytest.mark.parametrize(
    "extra, key",
    [
        ("data: {name: mnist, batch_size: 0}", "data.batch_size"),
        ("data: {name: mnist, batch_size: many}", "data.batch_size"),
        ("data: {name: mnist, val_fraction: 1.5}", "data.val_fraction"),
        ("data: {name: mnist}\ntrain: {device: gpu}", "train.device"),
        ("data: {name: mnist}\nloss: {name: nt_xent, temperature: 0}", "loss.temperature"),
        ("data: {name: mnist}\noptimizer: {name: sgd, momentum: 2}", "optimizer.momentum"),
    ],
)
def test_wrong_type_or_range_names_key_and_value(tmp_path, extra, key):
    message = error_of(write(tmp_path, f"method: simclr\n{extra}\n"))
    assert f"{key}:" in message and "got" in message


def test_loss_that_does_not_fit_the_method(tmp_path):
    message = error_of(write(tmp_path, "method: simclr\ndata: {name: mnist}\nloss: {name: cross_entropy}\n"))
    assert "does not fit method 'simclr'; use one of: nt_xent" in message


def test_missing_required_keys(tmp_path):
    assert "method: required key is missing" in error_of(write(tmp_path, "data: {name: mnist}\n"))
    assert "data: required key is missing" in error_of(write(tmp_path, "method: simclr\n"))


def test_malformed_yaml_reports_line_and_column(tmp_path):
    path = write(tmp_path, "method: simclr\ndata: {name: mnist\ntrain: [\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+, column \d+"):
        read_yaml(path)


@pytest.mark.parametrize("text, problem", [("", "config is empty"), ("- a\n- b\n", "must be a mapping")])
def test_empty_or_non_mapping_config(tmp_path, text, problem):
    with pytest.raises(ConfigError, match=problem):
        read_yaml(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "method: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        read_yaml(path)


def test_overrides_reach_sections_the_file_does_not_name(tmp_path):
    path = write(tmp_path, "method: supervised\ndata: {name: mnist}\n")
    cfg = load_config(path, ["optimizer.lr=0.1", "head.dropout=0.5", "loss.label_smoothing=0.1", "data.augment.rotation=5"])
    assert (cfg.optimizer.name, cfg.optimizer.options["lr"]) == ("adamw", 0.1)
    assert (cfg.head.name, cfg.head.options["dropout"]) == ("linear", 0.5)
    assert cfg.loss.options["label_smoothing"] == 0.1 and cfg.data.augment.options["rotation"] == 5


def test_an_override_that_renames_a_component_drops_the_old_options(tmp_path):
    path = write(tmp_path, "method: simclr\ndata: {name: mnist, batch_size: 32}\nmodel: {name: cnn, widths: [8]}\n")
    cfg = load_config(path, ["model.name=mlp", "data.name=fashion_mnist"])
    assert cfg.model.name == "mlp" and "widths" not in cfg.model.options
    assert cfg.data.name == "fashion_mnist" and cfg.data.batch_size == 32  # data is not a component


@pytest.mark.parametrize(
    "override",
    ["model.widths=[16,-1]", "model.widths=[]", "model.convs_per_stage=0", "train.seed=100000000000000000000"],
)
def test_sizes_and_seeds_are_bounded(tmp_path, override):
    message = error_of(write(tmp_path, "method: simclr\ndata: {name: mnist}\n"), [override])
    assert message.startswith(f"override '{override}'")


@pytest.mark.parametrize(
    ("override", "key", "bound"),
    [("model.hidden_dim=0", "model.hidden_dim", "greater than 0 (got 0)"), ("head.dropout=2", "head.dropout", "less than 1 (got 2)")],
)
def test_mlp_and_head_sizes_are_bounded(tmp_path, override, key, bound):
    message = error_of(write(tmp_path, "method: supervised\ndata: {name: mnist}\nmodel: {name: mlp}\n"), [override])
    # the override, the key it set, and the fix: the bound the value must keep (and the value it got)
    assert message.startswith(f"override '{override}': {key}: ") and message.endswith(bound), message
