"""LoRA (`finetune.lora`): low-rank adapters beside an encoder's linear (or convolution) layers, through `peft` (the
`peft` extra), trained while the encoder's own weights stay fixed.

A run's checkpoints keep the adapters apart (`X.base_layer.weight`, `X.lora_A.default.weight`, `X.lora_B.default.weight`),
so a resume continues them; whatever reads a finished run (evaluate, predict, export, `finetune --from`) reads the
merged weights, `W + alpha / r * B @ A`, into the plain encoder (`merged`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transferctl.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from transferctl.schema import LoraConfig

INSTALL_HINT = 'pip install "transferctl[peft]"'
ADAPTER = "default"  # peft's name for a model's one adapter
_A, _B = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


def add_adapters(encoder: nn.Module, lora: LoraConfig, where: str = "finetune.lora") -> None:
    """LoRA adapters beside the encoder's `target_modules`, in place; every other encoder weight frozen."""
    try:
        import peft
    except ImportError:
        raise UsageError(f"{where}: LoRA needs peft: {INSTALL_HINT}") from None
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    try:
        peft.inject_adapter_in_model(config, encoder)
    except ValueError as exc:  # no layer matches, or a layer peft cannot adapt
        names = sorted({n.rpartition(".")[2] for n, m in encoder.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)})
        reason = " ".join(str(exc).split())[:160]
        raise ConfigError(
            f"{where}.target_modules: {targets!r} adapts no layer of this encoder ({reason}); name some of its linear or "
            f"convolution layers, e.g. [{', '.join(names[:6])}]"
        ) from None


def has_adapters(state: dict[str, torch.Tensor]) -> bool:
    return any(key.endswith(_A) for key in state)


def merged(state: dict[str, torch.Tensor], lora: dict[str, Any] | LoraConfig | None) -> dict[str, torch.Tensor]:
    """A state dict with LoRA adapters as the plain layers' state dict: each adapted weight `W + alpha / r * B @ A`
    (for a convolution, the same product over its kernel), its bias as it was; a state without adapters as it is."""
    if not has_adapters(state):
        return state
    if lora is None:
        raise UsageError("the checkpoint holds LoRA adapters, and its config no finetune.lora section to merge them with")
    r, alpha = (lora["r"], lora["alpha"]) if isinstance(lora, dict) else (lora.r, lora.alpha)
    scale = alpha / r
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        layer, base, name = key.rpartition(".base_layer.")
        if not base:
            out[key] = value
            continue
        if name == "weight" and f"{layer}{_A}" in state:
            down, up = state[f"{layer}{_A}"].float(), state[f"{layer}{_B}"].float()
            delta = (up.flatten(1) @ down.flatten(1)).view(value.shape)
            value = (value.float() + scale * delta).to(value.dtype)
        out[f"{layer}.{name}"] = value
    leftover = [k for k in state if ".lora_" in k and not k.endswith((_A, _B))]
    if leftover:
        raise UsageError(f"LoRA adapter {leftover[0]}: only linear and convolution layers' adapters can be merged; retrain without it")
    return out
