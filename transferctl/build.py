"""Turn a validated Config into components, through the registries."""

from __future__ import annotations

import io
import os
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from transferctl.config import Config
from transferctl.data import BatchAugment, ImageData
from transferctl.data.pipeline import LoaderPipeline, Pipeline, make_pipeline
from transferctl.distributed import world
from transferctl.models import Network
from transferctl.errors import ConfigError, UsageError
from transferctl.registry import AUGMENTATIONS, HEADS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS, Entry


def build_encoder(cfg: Config, channels: int, image_size: int) -> nn.Module:
    return MODELS.build(cfg.model.name, cfg.model.options, in_channels=channels, image_size=image_size)


def load_model_weights(encoder: nn.Module, cfg: Config) -> None:
    """`model.weights`: the encoder's starting weights, from a .pt (torch.save of a state dict; loaded with
    weights_only) or .safetensors file, or DEFAULT: the model's published weights. A file may also hold a
    whole network (`encoder.` keys) or a transferctl checkpoint; a model can accept foreign layouts
    (resnet18: torchvision's)."""
    entry = MODELS.get(cfg.model.name)
    where = f"model.weights {cfg.model.weights}"
    if cfg.model.weights == "DEFAULT":
        state = _published_weights(entry, cfg)
    else:
        state = _read_weights(Path(cfg.model.weights), where)
    state = entry.meta.get("adapt_weights", lambda s: s)(_encoder_part(state, where))
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} is {tuple(state[k].shape)} there, {tuple(v.shape)} here" for k, v in expected.items() if k in state and state[k].shape != v.shape]
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
    except ConfigError:
        raise
    except Exception as exc:  # offline: URLError; a proxy or a bad cache: many others
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise UsageError(
            f"model.weights: DEFAULT: downloading the published weights of '{cfg.model.name}' failed ({reason}); "
            f"offline, use a local file: model.weights=PATH (a .pt or .safetensors state dict)"
        ) from None


def _read_weights(path: Path, where: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{where}: no such file; give a .pt or .safetensors state dict of the encoder (or DEFAULT)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for foreign or truncated files
        raise ConfigError(f"{where}: not a readable state dict ({type(exc).__name__}); write one with torch.save(encoder.state_dict(), path)") from None


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
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return state


def build_network(cfg: Config, channels: int, image_size: int, num_classes: int) -> Network:
    encoder = build_encoder(cfg, channels, image_size)
    head = HEADS.build(cfg.head.name, cfg.head.options, feature_dim=encoder.feature_dim, num_classes=num_classes)
    return Network(encoder, head)


def build_loss(cfg: Config) -> nn.Module:
    return LOSSES.build(cfg.loss.name, cfg.loss.options)


def build_augment(cfg: Config, data: ImageData) -> BatchAugment:
    augment = cfg.data.augment
    return AUGMENTATIONS.build(augment.name, augment.options, hflip_default=data.hflip)


def parameter_groups(model: Network, encoder_lr_scale: float, encoder_weight_decay: float | None = None) -> list[dict[str, Any]]:
    """The encoder's parameters with their learning-rate scale (and, if given, their own weight decay), then the head's."""
    encoder: dict[str, Any] = {"params": list(model.encoder.parameters()), "lr_scale": encoder_lr_scale}
    if encoder_weight_decay is not None:
        encoder["weight_decay"] = encoder_weight_decay
    return [encoder, {"params": list(model.head.parameters()), "lr_scale": 1.0}]


def build_optimizer(cfg: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return OPTIMIZERS.build(cfg.optimizer.name, cfg.optimizer.options, params=groups)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    return SCHEDULERS.build(cfg.scheduler.name, cfg.scheduler.options, optimizer=optimizer, total_steps=total_steps)


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    """`auto`: channels_last for conv nets on CUDA, and on CPU with bf16 (where oneDNN's bf16 convolutions
    want it: measured 1.5x over bf16 alone on a 2-core CPU, but only +5% in float32)."""
    if cfg.train.channels_last == "auto":
        return cfg.model.name != "mlp" and (device.type == "cuda" or cfg.train.precision == "bf16")
    return bool(cfg.train.channels_last)


def build_pipeline(cfg: Config, train: ImageData, augment: BatchAugment, device: torch.device, *, views: int, drop_last: bool) -> Pipeline:
    ranks = world()
    return make_pipeline(
        train, augment, kind=cfg.data.pipeline, views=views, batch_size=cfg.data.batch_size, seed=cfg.train.seed,
        drop_last=drop_last, device=device, num_workers=cfg.data.num_workers, budget_mb=cfg.data.memory_budget_mb,
        channels_last=use_channels_last(cfg, device), rank=ranks.rank, world=ranks.size,
    )


def training_forward(cfg: Config, network: Network, device: torch.device, some_steps_frozen: bool = False) -> nn.Module:
    """What training calls: the network, in DDP across ranks (SyncBatchNorm if asked), compiled if asked.
    `some_steps_frozen`: the encoder gets no gradients on some steps (a head warm-up), which DDP must expect."""
    forward: nn.Module = network
    if world().distributed:
        from torch.nn.parallel import DistributedDataParallel

        if cfg.train.sync_batchnorm:
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        forward = DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=some_steps_frozen
        )
    if cfg.train.compile:
        forward = torch.compile(forward)
    return forward


def training_threads(cfg: Config, pipeline: Pipeline, device: torch.device) -> int:
    """Intra-op CPU threads for training: a CPU loader's workers get a core each, the model the rest."""
    threads = torch.get_num_threads()
    if isinstance(pipeline, LoaderPipeline) and device.type == "cpu" and cfg.data.num_workers:
        threads = max(1, (os.cpu_count() or 1) - cfg.data.num_workers)
    return threads


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """torch's thread count for the duration of a run only (it is process-wide state)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
