"""Where a public model's files are: a local file or folder, or a Hugging Face hub id (`hf-hub:org/name`) read from
the local hub cache, and downloaded only when the machine is online (HF_HUB_OFFLINE unset).

Offline, a model that is not in the cache is one line naming the id and the way round it (a local folder), not a
network time-out."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transferctl.errors import ConfigError, UsageError

HUB_PREFIX = "hf-hub:"
# what a model folder needs; not the TF, Flax or ONNX copies a hub repository may also hold
_IGNORED = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "*.mlmodel", "onnx/*", "flax_model*", "tf_model*"]


def is_hub_id(weights: str | None) -> bool:
    return bool(weights) and weights.startswith(HUB_PREFIX)


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now: read at each call, as a test or a shell may set it late."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().lower() in ("1", "on", "yes", "true")


def local_path(weights: str, where: str = "model.weights") -> Path:
    """`weights` as a local path: itself, or the hub cache's folder of a hub id (`hf-hub:org/name[@revision]`)."""
    if not is_hub_id(weights):
        return Path(weights)
    repo, _, revision = weights[len(HUB_PREFIX) :].partition("@")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError), or a malformed id (HFValidationError)
        pass
    hint = f"put it in the cache on a machine online (hf download {repo}) or give a local folder: model.weights=path/to/folder"
    if offline():
        raise UsageError(f"{where} {weights}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    try:
        return Path(snapshot_download(repo, revision=revision or None, ignore_patterns=_IGNORED))
    except Exception as exc:  # no network, no such repository, a gated one: many types
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        raise UsageError(f"{where} {weights}: not in the local Hugging Face cache, and downloading it failed ({reason}); {hint}") from None


def folder_config(folder: Path, where: str) -> dict[str, Any]:
    """A model folder's config.json."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{where}: no config.json in {folder}; give a model folder as the hub holds it (save_pretrained writes one)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{where}: {path} is not JSON; give a model folder as the hub holds it") from None


def read_state_dict(path: Path, where: str) -> dict[str, Any]:
    """A state dict from a `.safetensors`, `.pth`, `.pt` or `.bin` file, or from a model folder's weights file."""
    if path.is_dir():
        candidates = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
        found = next((path / name for name in candidates if (path / name).is_file()), None)
        if found is None:
            raise ConfigError(f"{where}: no weights file in {path} (looked for {', '.join(candidates)})")
        path = found
    if not path.is_file():
        raise ConfigError(f"{where}: no such file or folder; give a weights file (.safetensors, .pth, .bin), a folder or hf-hub:ORG/NAME")
    from transferctl.models.weights import read_state_file  # the same reader as every model's weights file

    state = read_state_file(path, where)
    for wrapper in ("state_dict", "model", "state_dict_ema"):  # a training checkpoint around the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            return state[wrapper]
    return state
