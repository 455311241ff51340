"""An encoder's starting weights: a weights file or published weights (`model.weights`), or a source run's
encoder (`finetune.source`, set by `finetune --from`)."""

from __future__ import annotations

import io
from contextlib import redirect_stderr
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transferctl import checkpoints
from transferctl.errors import ConfigError, UsageError
from transferctl.models import lora
from transferctl.registry import MODELS, Entry

if TYPE_CHECKING:
    from transferctl.config import Config


def has_pretrained_encoder(cfg: Config) -> bool:
    """Whether training starts from pretrained weights: a source run's, or a weights file's (model.weights)."""
    return bool(cfg.finetune.source or cfg.model.weights)


def load_starting_weights(encoder: nn.Module, cfg: Config) -> None:
    """Load the source run's encoder or `model.weights` into `encoder`, if the config names either."""
    if cfg.finetune.source:
        load_source_encoder(encoder, cfg)
        return
    if cfg.model.weights:
        load_model_weights(encoder, cfg)
    if hasattr(encoder, "load_word_vectors"):  # model.embeddings: word2vec/GloVe vectors for the token table
        encoder.load_word_vectors()


def starting_encoder_state(cfg: Config, fresh_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The pretrained weights training started from, read again (a resumed run needs them for L2-SP and label
    propagation); `fresh_encoder` is an encoder of the configured model to load `model.weights` into."""
    if cfg.finetune.source:
        return source_encoder_state(cfg)
    load_model_weights(fresh_encoder, cfg)
    return fresh_encoder.state_dict()


def source_encoder_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The encoder's weights (not the head's) from the source run's last checkpoint; a LoRA run's adapters merged."""
    source = checkpoints.read(Path(cfg.finetune.source) / "checkpoints" / "last.pt")
    return lora.merged(source.encoder(), (source.config.get("finetune") or {}).get("lora"))


def load_source_encoder(encoder: nn.Module, cfg: Config) -> None:
    try:
        encoder.load_state_dict(source_encoder_state(cfg))
    except RuntimeError:
        raise UsageError(
            f"finetune.source {cfg.finetune.source}: its encoder weights do not fit model '{cfg.model.name}' with {cfg.model.options}; "
            f"the run was made with a different architecture"
        ) from None


def load_model_weights(encoder: nn.Module, cfg: Config) -> None:
    """`model.weights`: the encoder's starting weights, from a .pt (torch.save of a state dict; loaded with
    weights_only) or .safetensors file, or DEFAULT: the model's published weights. A file may also hold a
    whole network (`encoder.` keys) or a transferctl checkpoint; a model can accept foreign layouts
    (resnet18: torchvision's)."""
    entry = MODELS.get(cfg.model.name)
    where = f"model.weights {cfg.model.weights}"
    if cfg.model.weights == "DEFAULT":
        state = _published_weights(entry, cfg)
    elif "read_weights" in entry.meta:  # a model with weights of its own format (hf: a checkpoint folder)
        state = entry.meta["read_weights"](cfg.model.weights, cfg.model.options)
    else:
        state = read_state_file(Path(cfg.model.weights), where)
    state = entry.meta.get("adapt_weights", lambda s: s)(_encoder_part(state, where))
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} is {tuple(state[k].shape)} there, {tuple(v.shape)} here"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [f"{len(missing)} missing keys (first: {missing[0]})"] if missing else []
    problems += [f"{len(unexpected)} unexpected keys (first: {unexpected[0]})"] if unexpected else []
    problems += [f"{len(mismatched)} of other shapes (first: {mismatched[0]})"] if mismatched else []
    if problems:
        raise ConfigError(f"{where}: does not fit model '{cfg.model.name}' with {cfg.model.options}: {'; '.join(problems)}")
    encoder.load_state_dict(state)


def _published_weights(entry: Entry, cfg: Config) -> dict[str, Any]:
    fetch = entry.meta.get("published_weights")
    if fetch is None:
        raise ConfigError(f"model.weights: DEFAULT: model '{cfg.model.name}' has no published weights; give a .pt or .safetensors file")
    try:
        with redirect_stderr(io.StringIO()):  # torch.hub's "Downloading: ..." line: errors stay one line
            return fetch(**cfg.model.options)
    except UsageError:  # said in one line already (a hub id not in the cache, offline)
        raise
    except Exception as exc:  # offline: URLError; a proxy or a bad cache: many others
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise UsageError(
            f"model.weights: DEFAULT: downloading the published weights of '{cfg.model.name}' failed ({reason}); "
            f"offline, use a local file: model.weights=PATH (a .pt or .safetensors state dict)"
        ) from None


def read_state_file(path: Path, where: str) -> Any:
    """A .pt/.pth/.bin (torch.save, read with weights_only) or .safetensors file's contents, or a one-line error."""
    if not path.is_file():
        raise ConfigError(f"{where}: no such file; give a .pt or .safetensors state dict of the encoder (or DEFAULT)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for foreign or truncated files
        raise ConfigError(
            f"{where}: not a readable state dict ({type(exc).__name__}); write one with torch.save(encoder.state_dict(), path)"
        ) from None


def _encoder_part(state: Any, where: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors: from a transferctl checkpoint ('model'), a {'state_dict': ...} wrapper, a whole
    network ('encoder.' keys), or a plain state dict."""
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{where}: not a state dict (a mapping of parameter names to tensors)")
    if any(k.startswith("encoder.") for k in state):
        state = checkpoints.encoder_part(state)
    return state
