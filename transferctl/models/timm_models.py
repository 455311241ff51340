"""`timm`: any image model of timm (`model.arch`: a name of `timm.list_models()`), random or from pretrained weights
(`model.weights`: a state-dict file, a model folder as the hub holds it, or `hf-hub:timm/NAME` from the local cache).

The weights' `pretrained_cfg` (input size, mean, std, interpolation, crop) is copied into the run's config when the
config is resolved, so every run of the model, `--from` chains included, normalizes its images with the statistics
the weights were trained with, and a run rebuilds its encoder without the weights' folder. Images are resized on the
device per batch to the model's input size, and grey images repeated to three channels, inside the encoder, so
exports do the same. Pooled features are timm's pre-logits; stage maps come from `forward_intermediates`, which
keeps the model's own parameter names (timm's `features_only` renames them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from transferctl.errors import ConfigError, UsageError, did_you_mean
from transferctl.models import hub
from transferctl.models.encoders import as_checkpoint_input
from transferctl.registry import MODELS

INSTALL_HINT = 'pip install "transferctl[timm]"'
PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode", "classifier")
MAX_STAGES = 4  # a ViT gives a map per block; dense heads take a few, evenly spaced


def timm_module():
    try:
        import timm
    except ImportError:
        raise UsageError(f"model 'timm' needs timm: {INSTALL_HINT}") from None
    return timm


def _preprocessing(pretrained_cfg: Any) -> dict[str, Any]:
    """The parts of a timm `pretrained_cfg` that say how its inputs were prepared (and its classifier's name)."""
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict()
    chosen = {k: cfg[k] for k in PREPROCESSING_KEYS if cfg.get(k) is not None}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in chosen.items()}


def _checked_arch(arch: str | None) -> str:
    timm = timm_module()
    if not arch:
        raise ConfigError("model.arch: model 'timm' needs a timm model name (timm.list_models()), or model.weights=hf-hub:timm/NAME")
    if not timm.is_model(arch.split(".")[0]):
        raise ConfigError(f"model.arch: '{arch}' is not a timm model{did_you_mean(arch, timm.list_models())}")
    return arch.split(".")[0]  # a pretrained tag (convnext_atto.d2_in1k) names weights, not the architecture


def resolve_options(options: dict[str, Any], weights: str | None) -> dict[str, Any]:
    """The architecture, its arguments and its preprocessing from the weights' folder (config.json: `architecture`,
    `model_args`, `pretrained_cfg`), else timm's defaults for `arch`; a run's own config keeps what it holds."""
    if options.get("pretrained_cfg"):
        return options
    folder = hub.local_path(weights) if weights and weights != "DEFAULT" else None
    if folder is not None and folder.is_dir():
        config = hub.folder_config(folder, f"model.weights {weights}")
        arch = config.get("architecture")
        if options.get("arch") and _checked_arch(options["arch"]) != arch:
            raise ConfigError(f"model.arch: '{options['arch']}', and the weights in {weights} are a '{arch}'; drop model.arch")
        model_args = {k: v for k, v in (config.get("model_args") or {}).items() if k not in ("num_classes", "pretrained_cfg")}
        pretrained = config.get("pretrained_cfg") or timm_module().models.get_pretrained_cfg(arch) or {}
        return {**options, "arch": _checked_arch(arch), "model_args": {**model_args, **(options.get("model_args") or {})},
                "pretrained_cfg": _preprocessing(pretrained)}  # fmt: skip
    arch = _checked_arch(options.get("arch"))
    tag = options["arch"].split(".", 1)[1] if "." in options["arch"] else None
    pretrained = timm_module().models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    return {**options, "arch": arch, "pretrained_cfg": _preprocessing(pretrained) if pretrained else {}}


def _published(arch: str, pretrained_cfg: dict[str, Any] | None = None, **_: Any) -> dict[str, torch.Tensor]:
    """model.weights: DEFAULT: timm's default pretrained weights of the architecture, from the hub (cache first)."""
    cfg = timm_module().models.get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError(f"model.weights: DEFAULT: timm has no hub weights for '{arch}'; give hf-hub:ORG/NAME or a local file")
    where = "model.weights DEFAULT"
    return _encoder_state(hub.local_path(f"{hub.HUB_PREFIX}{cfg.hf_hub_id}", where), pretrained_cfg or {}, where)


def read_weights(weights: str, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    where = f"model.weights {weights}"
    return _encoder_state(hub.local_path(weights), options.get("pretrained_cfg") or {}, where)


def _encoder_state(path, pretrained_cfg: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """A timm state dict as the encoder's (`model.` + timm's names), without the pretrained classifier."""
    state = hub.read_state_dict(path, where)
    classifier = pretrained_cfg.get("classifier") or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    dropped = tuple(f"{name}." for name in classifiers)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # a DDP training checkpoint
    return {f"model.{k}": v for k, v in state.items() if not k.startswith(dropped)}


class TimmEncoder(nn.Module):
    """A timm model without its classifier: images (N, C, H, W), normalized -> pre-logits features (N, feature_dim)."""

    def __init__(self, arch: str, model_args: dict[str, Any], in_channels: int, input_size: int | None, interpolation: str):
        super().__init__()
        args = {k: v for k, v in model_args.items() if k != "num_classes"}
        self.model = timm_module().create_model(arch, pretrained=False, num_classes=0, **args)
        self.channels = int(args.get("in_chans", 3))
        if in_channels not in (self.channels, 1):
            raise ConfigError(f"model.arch: '{arch}' takes {self.channels}-channel images, the data has {in_channels}; set data.channels")
        patches = getattr(self.model, "patch_embed", None)
        fixed = getattr(patches, "img_size", None) if not getattr(patches, "dynamic_img_size", False) else None
        if fixed is not None and input_size is not None and tuple(fixed) != (input_size, input_size):
            raise ConfigError(
                f"model.input_size: '{arch}' takes {fixed[0]}x{fixed[1]} images; drop model.input_size (images are resized to it)"
            )
        self.input_size = input_size or (fixed[0] if fixed is not None else None)
        self.interpolation = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        self.feature_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        info = list(getattr(self.model, "feature_info", None) or ())
        self.stage_indices: list[int] = []
        if info and hasattr(self.model, "forward_intermediates"):
            step = max(1, len(info) // MAX_STAGES)
            self.stage_indices = list(range(len(info) - 1, -1, -step))[:MAX_STAGES][::-1]
        self.stage_channels = tuple(int(info[i]["num_chs"]) for i in self.stage_indices)

    def prepared(self, x: torch.Tensor) -> torch.Tensor:
        return as_checkpoint_input(x, self.channels, self.input_size, self.interpolation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(self.prepared(x)), pre_logits=True)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(self.prepared(x), indices=self.stage_indices, intermediates_only=True)


def input_statistics(options: dict[str, Any]) -> dict[str, list[float]] | None:
    """The mean and std the weights were trained with: the run's normalization, instead of the data's own."""
    cfg = options.get("pretrained_cfg") or {}
    return {"mean": list(cfg["mean"]), "std": list(cfg["std"])} if "mean" in cfg and "std" in cfg else None


def resolve_data(data_options: dict[str, Any], weights: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """A data set that decodes files to a size decodes them as the weights' evaluation transform does: to the model's
    input size, resized with its interpolation to size / crop_pct and centre-cropped; what the config sets stays."""
    cfg = options.get("pretrained_cfg") or {}
    implied = {
        "image_size": _input_size(options),
        "interpolation": cfg.get("interpolation") if cfg.get("interpolation") in ("bilinear", "bicubic", "nearest") else None,
        "crop_fraction": cfg.get("crop_pct") if cfg.get("crop_mode", "center") == "center" else None,
    }
    return {k: v for k, v in implied.items() if v is not None and k not in data_options}


def _input_size(options: dict[str, Any]) -> int | None:
    if options.get("input_size"):
        return int(options["input_size"])
    shape = (options.get("pretrained_cfg") or {}).get("input_size")
    return int(shape[-1]) if shape else None


@MODELS.register(
    name="timm",
    modality="image",
    gives=("feature_maps",),
    resolve_options=resolve_options,
    resolve_data=resolve_data,
    read_weights=read_weights,
    published_weights=_published,
    input_statistics=input_statistics,
)
def timm_model(
    in_channels: int,
    arch: str | None = None,
    model_args: dict[str, Any] | None = None,
    pretrained_cfg: dict[str, Any] | None = None,
    input_size: int | None = None,
) -> TimmEncoder:
    """Any timm image model (model.arch), from its pretrained weights (model.weights: file, folder or hf-hub:ID)."""
    options = {"input_size": input_size, "pretrained_cfg": pretrained_cfg}
    interpolation = (pretrained_cfg or {}).get("interpolation", "bilinear")
    return TimmEncoder(_checked_arch(arch), dict(model_args or {}), in_channels, _input_size(options), interpolation)
