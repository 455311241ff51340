"""`hf`: an encoder from a Hugging Face checkpoint (`model.weights`: a local folder as `save_pretrained` writes it, or
`hf-hub:ORG/NAME` from the local hub cache), through `transformers`' AutoModel (the `hf` extra), on the modality its
model class reads: token ids (BERT, DistilBERT, RoBERTa, DeBERTa-v2, ELECTRA, XLM-R, ModernBERT, ...), images (ViT,
DINOv2, ConvNeXt, Swin, ...) or waveforms (wav2vec 2.0, HuBERT, WavLM).

The folder's `config.json` is copied into the run's config when the config is resolved (`model.architecture`), and so
is what its processor says of the inputs (`model.preprocessing`: an image processor's mean, std and size; a feature
extractor's sample rate), so a run rebuilds its encoder and reads its data without the folder. The folder's weights
are the starting weights; its tokenizer is a text run's tokenizer unless data.tokenizer.path names another."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from transferctl.errors import ConfigError, UsageError
from transferctl.models import hub
from transferctl.models.encoders import as_checkpoint_input
from transferctl.models.sequence import length_mask, mean_pool
from transferctl.registry import MODELS

INSTALL_HINT = 'pip install "transferctl[hf]"'
# the input a transformers model class reads (its `main_input_name`) -> the modality it belongs to
MODALITY_OF_INPUT = {"input_ids": "text", "pixel_values": "image", "input_values": "audio"}
# models whose position ids start after the pad id (RoBERTa's `create_position_ids_from_input_ids`)
PADDING_OFFSET_POSITIONS = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "roberta-prelayernorm", "xmod"}
)
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # an image processor's `resample`, as PIL numbers them
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def transformers():
    """transformers, quiet (no progress bars or load reports on stderr), or a one-line error naming the extra."""
    try:
        import transformers as module
    except ImportError:
        raise UsageError(f"model 'hf' needs transformers: {INSTALL_HINT}") from None
    module.logging.set_verbosity_error()
    module.logging.disable_progress_bar()
    return module


def _auto_model(source: Any, pretrained: bool) -> nn.Module:
    """transformers' AutoModel of a folder (pretrained) or a config, without the model's own pooler where it has one
    (BERT's dense layer on [CLS], trained for next-sentence prediction): the head pools, and DDP wants no unused
    parameters."""
    auto = transformers().AutoModel
    build = auto.from_pretrained if pretrained else auto.from_config
    try:  # float32 whatever the checkpoint was saved in (hub copies are often bf16): the head and the data are float32
        return build(source, add_pooling_layer=False, dtype=torch.float32)
    except TypeError:  # a model without a pooler (DistilBERT) takes no such argument
        return build(source, dtype=torch.float32)


def _folder(weights: str | None) -> Path:
    if not weights or weights == "DEFAULT":
        raise ConfigError("model.weights: model 'hf' starts from a Hugging Face checkpoint folder; set model.weights=path/to/folder")
    folder = hub.local_path(weights)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.weights {weights}: no config.json there; give a Hugging Face checkpoint folder (save_pretrained writes one)"
        )
    return folder


def checkpoint_modality(architecture: dict[str, Any]) -> str:
    """The modality of the inputs the checkpoint's AutoModel class reads."""
    module = transformers()
    try:
        config = module.AutoConfig.for_model(**architecture)
        model_class = module.models.auto.modeling_auto.MODEL_MAPPING[type(config)]
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"model.architecture: AutoModel has no model for it ({' '.join(str(exc).split())[:120]})") from None
    return MODALITY_OF_INPUT.get(model_class.main_input_name, model_class.main_input_name)


def _processor(folder: Path) -> dict[str, Any]:
    """What the folder's image processor or feature extractor says of the inputs (their statistics, size and rate)."""
    found = next((folder / name for name in PROCESSOR_FILES if (folder / name).is_file()), None)
    if found is None:
        return {}
    said = json.loads(found.read_text())
    said = said.get("image_processor", said.get("feature_extractor", said))  # a processor_config.json nests them
    chosen: dict[str, Any] = {}
    if said.get("do_normalize", True) and "image_mean" in said:
        chosen["mean"], chosen["std"] = list(said["image_mean"]), list(said["image_std"])
    size, crop = said.get("size") or {}, said.get("crop_size") if said.get("do_center_crop") else None
    size = size if isinstance(size, dict) else {"height": size}
    if crop:  # DINOv2's: the shorter side resized to 256, the centre 224 kept
        chosen["image_size"] = int(crop["height"])
        if size.get("shortest_edge"):
            chosen["crop_fraction"] = crop["height"] / size["shortest_edge"]
    elif size.get("height") or size.get("shortest_edge"):
        chosen["image_size"] = int(size.get("height") or size["shortest_edge"])
        if said.get("crop_pct") and size.get("shortest_edge", 384) < 384:  # ConvNeXt's: to size / crop_pct, then the centre
            chosen["crop_fraction"] = float(said["crop_pct"])
    if said.get("resample") in PIL_RESAMPLE and "image_mean" in said:
        chosen["interpolation"] = PIL_RESAMPLE[said["resample"]]
    if "sampling_rate" in said:
        chosen["sample_rate"] = int(said["sampling_rate"])
    if "do_normalize" in said and "sampling_rate" in said:
        chosen["normalize_waveform"] = bool(said["do_normalize"])
    return chosen


def resolve_options(options: dict[str, Any], weights: str | None) -> dict[str, Any]:
    """The folder's config.json as `architecture` and its processor's settings as `preprocessing`, unless the options
    already hold them (a run's own config)."""
    if options.get("architecture"):
        return options
    folder = _folder(weights)
    return {**options, "architecture": json.loads((folder / "config.json").read_text()), "preprocessing": _processor(folder)}


def read_weights(weights: str, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The folder's weights as the encoder's state dict (`model.` + the transformers model's names)."""
    folder = _folder(weights)
    try:
        model = _auto_model(str(folder), pretrained=True)
    except Exception as exc:  # transformers raises many types for foreign or broken folders
        raise ConfigError(f"model.weights {weights}: not a readable Hugging Face checkpoint ({' '.join(str(exc).split())[:160]})") from None
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def _config(architecture: dict[str, Any]):
    return transformers().AutoConfig.for_model(**architecture)


class HuggingFaceEncoder(nn.Module):
    """A transformers encoder on token ids (N, length), right-padded with `pad_id` -> pooled features (N, hidden_size)."""

    def __init__(self, architecture: dict[str, Any], pad_id: int, pooling: str):
        super().__init__()
        config = _config(architecture)
        self.model = _auto_model(config, pretrained=False)
        self.pad_id, self.pooling, self.feature_dim = pad_id, pooling, config.hidden_size

    @property
    def word_embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def token_features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = ids != self.pad_id
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state, mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        steps, mask = self.token_features(ids)
        return mean_pool(steps, mask) if self.pooling == "mean" else steps[:, 0]


class HuggingFaceImageEncoder(nn.Module):
    """A transformers vision model on normalized images (N, C, H, W) -> pooled features: the model's own pooled output
    where it has one (ConvNeXt's normed average, DINOv2's normed [CLS]), else [CLS] for a model with one (ViT), else
    the mean over its patches (Swin). Images are resized to `input_size` and grey ones repeated to three channels first."""

    def __init__(self, architecture: dict[str, Any], input_size: int | None, pooling: str):
        super().__init__()
        config = _config(architecture)
        self.model = _auto_model(config, pretrained=False)
        self.channels = int(getattr(config, "num_channels", 3))
        self.input_size = input_size
        self.pooling = pooling
        self.feature_dim = int((getattr(config, "hidden_sizes", None) or [config.hidden_size])[-1])
        self.has_cls = getattr(getattr(self.model, "embeddings", None), "cls_token", None) is not None
        self.stage_indices, self.stage_channels = _stages(config)
        self.prefix_tokens = int(self.has_cls) + int(getattr(config, "num_register_tokens", 0) or 0)  # before the patches

    def prepared(self, x: torch.Tensor) -> torch.Tensor:
        return as_checkpoint_input(x, self.channels, self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.prepared(x))
        steps = out.last_hidden_state
        if self.pooling == "auto" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output.flatten(1)
        if steps.dim() == 4:  # (N, C, H, W) maps of a conv net
            return steps.mean(dim=(2, 3))
        if self.pooling == "cls" or (self.pooling == "auto" and self.has_cls):
            return steps[:, 0]
        return steps.mean(dim=1)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage maps (N, C, H, W), shallow to deep: a hierarchical model's stages (ConvNeXt, Swin), or four evenly
        spaced blocks of a plain ViT, their patch tokens laid out on the patch grid."""
        out = self.model(pixel_values=self.prepared(x), output_hidden_states=True)
        states = getattr(out, "reshaped_hidden_states", None) or out.hidden_states
        maps = []
        for index in self.stage_indices:
            state = states[index]
            if state.dim() == 3:  # (N, tokens, C): the patches after the [CLS] and register tokens, row by row
                patches = state[:, self.prefix_tokens :]
                side = math.isqrt(patches.shape[1])
                state = patches.transpose(1, 2).reshape(state.shape[0], state.shape[2], side, side)
            maps.append(state)
        return maps


def _stages(config: Any) -> tuple[list[int], tuple[int, ...]]:
    """Which of `hidden_states` are stage maps (index 0 is the embeddings' output), and their channels."""
    if getattr(config, "hidden_sizes", None):  # ConvNeXt: one state per stage
        return list(range(1, len(config.hidden_sizes) + 1)), tuple(config.hidden_sizes)
    if getattr(config, "depths", None) and getattr(config, "embed_dim", None):  # Swin: each stage doubles the channels
        stages = len(config.depths)
        return list(range(1, stages + 1)), tuple(config.embed_dim * 2 ** min(i + 1, stages - 1) for i in range(stages))
    layers = config.num_hidden_layers
    chosen = sorted({layers - i * max(1, layers // 4) for i in range(min(4, layers))})
    return chosen, tuple(config.hidden_size for _ in chosen)


class HuggingFaceAudioEncoder(nn.Module):
    """A transformers speech model (wav2vec 2.0, HuBERT, WavLM) on standardized waveforms (N, samples) and their
    `lengths` -> mean-pooled frame features; `token_features` gives the frames (about 50 per second) and their mask."""

    side_inputs = ("lengths",)

    def __init__(self, architecture: dict[str, Any]):
        super().__init__()
        config = _config(architecture)
        self.model = _auto_model(config, pretrained=False)
        self.feature_dim = int(config.hidden_size)
        # models whose convolutions end in group norm were trained on zero-padded batches without a mask
        self.masks_padding = getattr(config, "feat_extract_norm", "layer") == "layer"
        self.frame_stride = math.prod(getattr(config, "conv_stride", (1,)))  # input samples per output frame

    def token_features(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.flatten(1)
        mask = length_mask(lengths, x.shape[1]).long() if lengths is not None else None
        steps = self.model(input_values=x, attention_mask=mask if self.masks_padding else None).last_hidden_state
        if lengths is None:
            return steps, None
        return steps, length_mask(self.frame_lengths(lengths).clamp(max=steps.shape[1]), steps.shape[1])

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """The frames its convolutions make of recordings of `lengths` samples (what CTC aligns transcripts to)."""
        return self.model._get_feat_extract_output_lengths(lengths)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        steps, mask = self.token_features(x, lengths)
        return mean_pool(steps, mask) if mask is not None else steps.mean(dim=1)


def resolve_data(data_options: dict[str, Any], weights: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The data options a checkpoint implies where the config sets none: its tokenizer (text, unless data.tokenizer.path
    names one), its image size (images), its sample rate (audio: recordings resampled to it once, when read)."""
    preprocessing = options.get("preprocessing") or {}
    chosen: dict[str, Any] = {}
    tokenizer = dict(data_options.get("tokenizer") or {})
    if weights and not tokenizer.get("path"):
        chosen["tokenizer"] = {**tokenizer, "path": str(hub.local_path(weights))}
    for key in ("image_size", "interpolation", "crop_fraction"):  # how image files are decoded, unless the config says
        if key in preprocessing and key not in data_options:
            chosen[key] = preprocessing[key]
    if preprocessing.get("normalize_waveform") is False and "front_end" not in data_options:  # do_normalize: false
        chosen["front_end"] = "raw_waveform"
    if "sample_rate" in preprocessing:
        rate = data_options.get("sample_rate", preprocessing["sample_rate"])
        if rate != preprocessing["sample_rate"]:
            raise ConfigError(
                f"data.sample_rate: {rate} Hz, and the checkpoint was trained at {preprocessing['sample_rate']} Hz; drop data.sample_rate"
            )
        chosen["sample_rate"] = rate
    return chosen


def input_statistics(options: dict[str, Any]) -> dict[str, list[float]] | None:
    """An image checkpoint's processor's mean and std: the run's normalization, instead of the data's own."""
    preprocessing = options.get("preprocessing") or {}
    return {"mean": preprocessing["mean"], "std": preprocessing["std"]} if "mean" in preprocessing else None


def modality_of_options(options: dict[str, Any]) -> str | None:
    return checkpoint_modality(options["architecture"]) if options.get("architecture") else None


@MODELS.register(
    modality=("text", "image", "audio"),
    modality_of_options=modality_of_options,
    channels_last=False,
    gives=("token_features", "feature_maps"),  # text and speech checkpoints: token (frame) features; images: stage maps
    front_end=("waveform", "raw_waveform"),
    resolve_options=resolve_options,
    resolve_data=resolve_data,
    read_weights=read_weights,
    input_statistics=input_statistics,
)
def hf(
    vocab_size: int = 0,
    pad_id: int = 0,
    max_length: int = 0,
    architecture: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    pooling: Literal["auto", "cls", "mean"] = "auto",
) -> nn.Module:
    """A Hugging Face encoder (text, image or speech) from a checkpoint folder or hf-hub:ID (model.weights)."""
    if not architecture:
        raise ConfigError("model.weights: model 'hf' starts from a Hugging Face checkpoint folder; set model.weights=path/to/folder")
    modality = checkpoint_modality(architecture)
    if modality == "image":
        size = (preprocessing or {}).get("image_size") or architecture.get("image_size")  # the processor's, else the config's
        return HuggingFaceImageEncoder(architecture, int(size) if isinstance(size, int) else None, pooling)
    if modality == "audio":
        return HuggingFaceAudioEncoder(architecture)
    if architecture.get("vocab_size", vocab_size) < vocab_size:  # a larger table (padded for speed) is fine
        raise ConfigError(
            f"data.tokenizer: a vocabulary of {vocab_size} tokens, and the checkpoint's embeddings hold {architecture['vocab_size']}; "
            f"use the checkpoint's own tokenizer (drop data.tokenizer.path)"
        )
    positions = architecture.get("max_position_embeddings")
    if positions is not None and architecture.get("model_type") in PADDING_OFFSET_POSITIONS:
        positions -= architecture.get("pad_token_id", 1) + 1  # positions count from the pad id on: roberta-base has 512 of 514
    if positions is not None and max_length > positions:
        raise ConfigError(f"data.tokenizer.max_length: {max_length} tokens, and the checkpoint has {positions} positions; lower max_length")
    return HuggingFaceEncoder(architecture, pad_id, "cls" if pooling == "auto" else pooling)
