"""Turn a validated Config into components, through the registries."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from transferctl.config import Config
from transferctl.data import BatchAugment, ImageData
from transferctl.data.pipeline import LoaderPipeline, Pipeline, make_pipeline
from transferctl.distributed import world
from transferctl.models import Network
from transferctl.registry import AUGMENTATIONS, HEADS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS


def build_encoder(cfg: Config, channels: int, image_size: int) -> nn.Module:
    return MODELS.build(cfg.model.name, cfg.model.options, in_channels=channels, image_size=image_size)


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


def training_forward(cfg: Config, network: Network, device: torch.device) -> nn.Module:
    """What training calls: the network, in DDP across ranks (SyncBatchNorm if asked), compiled if asked."""
    forward: nn.Module = network
    if world().distributed:
        from torch.nn.parallel import DistributedDataParallel

        if cfg.train.sync_batchnorm:
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        ft = cfg.finetune
        warmup = cfg.method == "finetune" and ft.head_warmup_steps > 0 and ft.source is not None and not ft.freeze_encoder  # the frozen encoder gets no gradients then
        forward = DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=warmup
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
