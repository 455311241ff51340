"""The one registry mechanism: decorator registration, listing, validation, building with context."""

from __future__ import annotations

import pytest
from pydantic import PositiveInt

from transferctl.components import load_components
from transferctl.errors import ConfigError
from transferctl.registry import REGISTRIES, Registry


def make_registry() -> Registry:
    widgets = Registry("widget", context=("in_channels",))

    @widgets.register()
    def small(in_channels: int, size: PositiveInt = 3, label: str = "s"):
        """A small widget."""
        return ("small", in_channels, size, label)

    @widgets.register("large", tier=2)
    def make_large():
        return ("large",)

    return widgets


def test_register_list_and_wildcards():
    widgets = make_registry()
    assert widgets.names() == ["large", "small"]
    assert widgets.names("sm*") == ["small"]
    assert widgets.get("large").meta == {"tier": 2}
    assert widgets.get("small").summary == "A small widget."


def test_duplicate_names_are_refused():
    widgets = make_registry()
    with pytest.raises(ValueError, match="already registered"):
        widgets.register("small")(lambda: None)


def test_context_arguments_are_not_config_options():
    entry = make_registry().get("small")
    assert list(entry.options()) == ["size", "label"]
    with pytest.raises(ConfigError, match=r"widget\.in_channels: unknown option"):
        entry.validate({"in_channels": 3}, where="widget")


def test_validate_fills_defaults_and_checks_types():
    entry = make_registry().get("small")
    assert entry.validate({"size": "4"}, where="widget") == {"size": 4, "label": "s"}
    with pytest.raises(ConfigError, match=r"widget.size: .*greater than 0 \(got -1\)"):
        entry.validate({"size": -1}, where="widget")


def test_build_passes_only_the_context_a_component_takes():
    widgets = make_registry()
    assert widgets.build("small", {"size": 5, "label": "x"}, in_channels=1, num_classes=10) == ("small", 1, 5, "x")
    assert widgets.build("large", {}, in_channels=1) == ("large",)


# The one list of the built-in components (test_cli.py checks the CLI's listing against the registries, not this list).
BUILT_IN = {
    "methods": {"simclr", "supervised", "finetune", "autoencoder", "mae", "mlm", "electra", "masked_frames"},
    "tasks": {"classification", "multilabel", "regression", "segmentation", "detection", "token_classification", "speech_recognition"},
    "modalities": {"image", "audio", "text"},
    "models": {"mlp", "cnn", "resnet18", "gru", "lstm", "conv1d", "transformer", "hf", "timm"},
    "heads": {
        "projection",
        "linear",
        "class_maps",
        "decoder",
        "regressor",
        "fpn",
        "unet",
        "token_predictor",
        "replaced_token_detector",
        "fcos",
        "tagger",
        "ctc",
        "frame_predictor",
    },
    "losses": {
        *("nt_xent", "cross_entropy", "mse", "bce", "l1", "huber"),
        *(
            "pixel_cross_entropy",
            "token_cross_entropy",
            "replaced_token_detection",
            "fcos_loss",
            "tagging_loss",
            "ctc",
            "binary_cross_entropy",
            "asymmetric",
            "masked_frame_loss",
        ),
    },
    "optimizers": {"sgd", "adam", "adamw", "lars"},
    "schedulers": {"cosine", "constant", "plateau"},
    "datasets": {
        "mnist",
        "fashion_mnist",
        "cifar10",
        "image_folder",
        "mnist_sample",
        "mnist_rotation",
        "regression_folder",
        "mnist_scenes",
        "segmentation_folder",
        "coco_folder",
        "yolo_folder",
        "shards",
        "fsdd",
        "audio_folder",
        "ag_news",
        "text_csv",
        "conll2003",
        "conll_folder",
        "token_jsonl",
        "fsdd_sequences",
        "speech_folder",
    },
    "augmentations": {"simclr", "light", "upright", "none", "audio_simclr", "audio_light", "text_simclr", "text_light"},
    "target_kinds": {"class", "class_per_pixel", "class_sequence", "values", "boxes", "class_per_word", "transcript", "class_set"},
    "trackers": {"tensorboard", "mlflow", "wandb"},
}


def test_the_built_in_components_of_every_kind():
    load_components()
    assert set(REGISTRIES) == set(BUILT_IN)
    for kind, names in BUILT_IN.items():
        assert {entry.name for entry in REGISTRIES[kind] if entry.origin == "builtin"} == names, kind


def test_context_names_are_per_kind():
    load_components()
    options = REGISTRIES["datasets"].get("image_folder").options()
    assert {"image_size", "channels"} <= set(options) and "root" not in options
    assert "image_size" not in REGISTRIES["models"].get("mlp").options()


def test_the_encoder_learning_rate_scale_reaches_the_optimizer():
    from transferctl.build import build_network, build_optimizer, parameter_groups
    from transferctl.config import load_config

    cfg = load_config(None, ["optimizer.lr=0.2"], base={"method": "finetune", "data": {"name": "mnist"}, "optimizer": {"name": "sgd"}})
    network = build_network(cfg, (1, 28, 28), 10)
    optimizer = build_optimizer(cfg, parameter_groups(network, encoder_lr_scale=0.1))
    encoder_ids = {id(p) for p in network.encoder.parameters()}
    for group in optimizer.param_groups:
        is_encoder = {id(p) for p in group["params"]} <= encoder_ids
        assert group["lr"] == pytest.approx(0.02 if is_encoder else 0.2)
    biases = [g for g in optimizer.param_groups if all(p.ndim == 1 for p in g["params"])]
    assert biases and all(g["weight_decay"] == 0.0 for g in biases)  # no decay on biases and norm weights


def test_a_model_registers_what_it_gives_beyond_pooled_features():
    """`gives` (what build.py's errors list as the encoders that fit a head's `reads`) is what the built encoders have."""
    from transferctl.models.hf import HuggingFaceEncoder, HuggingFaceImageEncoder

    load_components()
    models = REGISTRIES["models"]
    context = dict(in_channels=1, image_size=28, sequence_features=16, vocab_size=50, pad_id=0, max_length=16, vocabulary=None)
    for entry in models:
        gives = set(entry.meta.get("gives", ()))
        if entry.name == "hf":  # built from a checkpoint folder: its encoder classes say
            assert gives == {"token_features", "feature_maps"} and hasattr(HuggingFaceEncoder, "token_features")
            assert hasattr(HuggingFaceImageEncoder, "feature_maps")
            continue
        options = {"arch": "resnet10t"} if entry.name == "timm" else {}  # timm: any of its models, named
        encoder = models.build(entry.name, entry.validate(options, "model"), **context)
        has = {"feature_maps"} if getattr(encoder, "stage_channels", ()) else set()
        has |= {"token_features"} if hasattr(encoder, "token_features") else set()
        assert gives == has, entry.name
    assert models.names_with("gives", "feature_maps") == ["cnn", "hf", "resnet18", "timm"]
    assert models.names_with("gives", "token_features") == ["conv1d", "gru", "hf", "lstm", "transformer"]
