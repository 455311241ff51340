"""`hf`: a BERT-family encoder from a local Hugging Face checkpoint folder (`model.weights: path/to/folder`),
through `transformers` (the `hf` extra). The folder's `config.json` is copied into the run's config when the
config is resolved (`model.architecture`), so a run rebuilds its encoder without the folder; the folder's weights
are the starting weights, and its tokenizer is the run's tokenizer unless data.tokenizer.path names another.
With network access, a hub model's cached folder works the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from transferctl.errors import ConfigError, UsageError
from transferctl.models.sequence import mean_pool
from transferctl.registry import MODELS

INSTALL_HINT = 'pip install "transferctl[hf]"'


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
    try:
        return build(source, add_pooling_layer=False)
    except TypeError:  # a model without a pooler (DistilBERT) takes no such argument
        return build(source)


def _folder(weights: str | None) -> Path:
    if not weights or weights == "DEFAULT":
        raise ConfigError("model.weights: model 'hf' starts from a Hugging Face checkpoint folder; set model.weights=path/to/folder")
    folder = Path(weights)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.weights {weights}: no config.json there; give a Hugging Face checkpoint folder (save_pretrained writes one)"
        )
    return folder


def resolve_options(options: dict[str, Any], weights: str | None) -> dict[str, Any]:
    """The folder's config.json as `architecture`, unless the options already hold one (a run's own config)."""
    if options.get("architecture"):
        return options
    return {**options, "architecture": json.loads((_folder(weights) / "config.json").read_text())}


def read_weights(weights: str, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The folder's weights as the encoder's state dict (`model.` + the transformers model's names)."""
    folder = _folder(weights)
    try:
        model = _auto_model(str(folder), pretrained=True)
    except Exception as exc:  # transformers raises many types for foreign or broken folders
        raise ConfigError(f"model.weights {weights}: not a readable Hugging Face checkpoint ({' '.join(str(exc).split())[:160]})") from None
    return {f"model.{k}": v for k, v in model.state_dict().items()}


class HuggingFaceEncoder(nn.Module):
    """A transformers encoder on token ids (N, length), right-padded with `pad_id` -> pooled features (N, hidden_size)."""

    def __init__(self, architecture: dict[str, Any], pad_id: int, pooling: str):
        super().__init__()
        config = transformers().AutoConfig.for_model(**architecture)
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
        return steps[:, 0] if self.pooling == "cls" else mean_pool(steps, mask)


def resolve_data(data_options: dict[str, Any], weights: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The data options a checkpoint folder implies: its tokenizer is the run's, unless data.tokenizer.path names one."""
    tokenizer = dict(data_options.get("tokenizer") or {})
    if not weights or tokenizer.get("path"):
        return {}
    return {"tokenizer": {**tokenizer, "path": weights}}


@MODELS.register(
    modality="text",
    channels_last=False,
    gives=("token_features",),
    resolve_options=resolve_options,
    resolve_data=resolve_data,
    read_weights=read_weights,
)
def hf(
    vocab_size: int, pad_id: int, max_length: int, architecture: dict[str, Any] | None = None, pooling: Literal["cls", "mean"] = "cls"
) -> HuggingFaceEncoder:
    """A BERT-family encoder from a Hugging Face checkpoint folder (model.weights), [CLS]- or mean-pooled."""
    if not architecture:
        raise ConfigError("model.weights: model 'hf' starts from a Hugging Face checkpoint folder; set model.weights=path/to/folder")
    if architecture.get("vocab_size", vocab_size) < vocab_size:  # a larger table (padded for speed) is fine
        raise ConfigError(
            f"data.tokenizer: a vocabulary of {vocab_size} tokens, and the checkpoint's embeddings hold {architecture['vocab_size']}; "
            f"use the checkpoint's own tokenizer (drop data.tokenizer.path)"
        )
    positions = architecture.get("max_position_embeddings")
    if positions is not None and max_length > positions:
        raise ConfigError(f"data.tokenizer.max_length: {max_length} tokens, and the checkpoint has {positions} positions; lower max_length")
    return HuggingFaceEncoder(architecture, pad_id, pooling)
