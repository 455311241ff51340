"""The one assembly layer: a validated config becomes everything a training run needs (`build_training`), and
a trained run's checkpoint becomes its model and data again (`load_trained`). Recipes, resume, `config check`,
export and the benchmarks all build through here, so steps, batches and weights are worked out in one place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferctl import checkpoints, trackers
from transferctl.checkpoints import Checkpoint
from transferctl.config import Config
from transferctl.data import BatchAugment, Samples, data_root, load_split, load_training_data
from transferctl.data.datasets import TrainingData
from transferctl.data.pipeline import LoaderPipeline, Pipeline, make_pipeline
from transferctl.distributed import world
from transferctl.engine.train import (
    EMULATED_BF16_NOTE,
    EarlyStop,
    Objective,
    Settings,
    Steps,
    pick_device,
    plan_steps,
    training_precision,
)
from transferctl.errors import ConfigError, UsageError, did_you_mean
from transferctl.methods import Method, Parts, method_of
from transferctl.modalities import Modality, dataset_modality, modality_named
from transferctl.models import Network, lora, weights
from transferctl.optim import layer_decayed
from transferctl.registry import AUGMENTATIONS, HEADS, LOSSES, METHODS, MODELS, OPTIMIZERS, SCHEDULERS
from transferctl.runs import RunRecord

# --------------------------------------------------------------------------- components


def modality_of_config(cfg: Config) -> Modality:
    return modality_named(dataset_modality(cfg.data.name))


def build_encoder(cfg: Config, context: dict[str, Any]) -> nn.Module:
    """The configured encoder for data described by `context` (the modality's `model_context`)."""
    return MODELS.build(cfg.model.name, cfg.model.options, **context)


def build_network(cfg: Config, sample_shape: tuple[int, ...], num_outputs: int, fitted: dict[str, Any] | None = None) -> Network:
    """The encoder for samples of `sample_shape` and the head on it (sized from the encoder: its pooled
    features, its stage feature maps or its token features, for a head that reads them). `fitted`: the training
    split's fitted state, which some modalities' models are sized from (text: the vocabulary)."""
    modality = modality_of_config(cfg)
    encoder = build_encoder(cfg, modality.model_context(tuple(sample_shape), fitted))
    reads = HEADS.get(cfg.head.name).meta.get("reads", "features")
    if reads == "feature_maps" and not getattr(encoder, "stage_channels", ()):
        raise ConfigError(
            f"head.name: head '{cfg.head.name}' reads an encoder's stage feature maps, and model '{cfg.model.name}' has none; "
            f"use an encoder with stages ({', '.join(MODELS.names_with('gives', 'feature_maps'))})"
        )
    if reads == "token_features" and not hasattr(encoder, "token_features"):
        raise ConfigError(
            f"head.name: head '{cfg.head.name}' reads an encoder's features at every token, and model '{cfg.model.name}' has none; "
            f"use a sequence encoder ({', '.join(MODELS.names_with('gives', 'token_features'))})"
        )
    head = HEADS.build(
        cfg.head.name,
        cfg.head.options,
        feature_dim=encoder.feature_dim,
        num_outputs=num_outputs,
        stage_channels=tuple(getattr(encoder, "stage_channels", ())),
        stage_shapes=_stage_shapes(encoder, sample_shape) if reads == "feature_maps" else (),
        sample_shape=tuple(sample_shape),
        word_embedding=getattr(encoder, "word_embedding", None),  # an encoder's token table, which a head may share
        **modality.head_context(fitted),
    )
    return Network(encoder, head, reads)


def _stage_shapes(encoder: nn.Module, sample_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """(channels, height, width) of each stage's map for one sample: a dry eval-mode pass (no statistics move)."""
    was_training = encoder.training
    with torch.no_grad():
        maps = encoder.eval().feature_maps(torch.zeros(1, *sample_shape))
    encoder.train(was_training)
    return tuple(tuple(m.shape[1:]) for m in maps)


def build_loss(cfg: Config, head: nn.Module | None = None, train: Samples | None = None) -> nn.Module:
    """The configured loss; `head`: the head it trains, for a loss that reads it (a CRF's transition scores); `train`:
    the training split, whose class counts a loss may weigh classes by."""
    return LOSSES.build(cfg.loss.name, cfg.loss.options, head=head, class_counts=class_counts(train) if train is not None else None)


def class_counts(data: Samples) -> torch.Tensor | None:
    """How many samples of each class a split holds (None for targets that are not a class per sample)."""
    if data.target_kind != "class" or not data.num_classes:
        return None
    return torch.bincount(data.targets.cpu(), minlength=data.num_classes)


def build_augment(cfg: Config, data: Samples, modality: Modality) -> BatchAugment:
    augment = cfg.data.augment
    return AUGMENTATIONS.build(augment.name, augment.options, **modality.augment_context(data))


def parameter_groups(
    model: Network, encoder_lr_scale: float, encoder_weight_decay: float | None = None, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """The encoder's parameters with their learning-rate scale (and, if given, their own weight decay; with
    `layer_decay`, a scale per depth), then the head's."""
    if layer_decay is not None:
        encoder_groups = layer_decayed(model.encoder, encoder_lr_scale, layer_decay, encoder_weight_decay)
    else:
        encoder_groups = [{"params": list(model.encoder.parameters()), "lr_scale": encoder_lr_scale}]
        encoder_groups[0] |= {"weight_decay": encoder_weight_decay} if encoder_weight_decay is not None else {}
    shared = {id(p) for group in encoder_groups for p in group["params"]}  # a head tied to the encoder's weights (mlm)
    return [*encoder_groups, {"params": [p for p in model.head.parameters() if id(p) not in shared], "lr_scale": 1.0}]


def build_optimizer(cfg: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return OPTIMIZERS.build(cfg.optimizer.name, cfg.optimizer.options, params=groups)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    return SCHEDULERS.build(cfg.scheduler.name, cfg.scheduler.options, optimizer=optimizer, total_steps=total_steps)


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    """`auto`: channels_last for conv nets on CUDA, and on CPU with bf16 (where oneDNN's bf16 convolutions
    want it, far more than float32 ones do). It applies where the modality's inputs are NCHW images; a model
    may opt out with `channels_last=False`."""
    if cfg.train.channels_last == "auto":
        wanted = MODELS.get(cfg.model.name).meta.get("channels_last", modality_of_config(cfg).channels_last)
        return wanted and (device.type == "cuda" or training_precision(cfg.train.precision, device) == "bf16")
    return bool(cfg.train.channels_last)


def build_pipeline(
    cfg: Config, train: Samples, augment: BatchAugment, modality: Modality, device: torch.device, *, views: int, drop_last: bool
) -> Pipeline:
    ranks = world()
    return make_pipeline(
        train,
        augment,
        modality,
        kind=cfg.data.pipeline,
        views=views,
        batch_size=cfg.data.batch_size,
        seed=cfg.train.seed,
        drop_last=drop_last,
        device=device,
        num_workers=cfg.data.num_workers,
        budget_mb=cfg.data.memory_budget_mb,
        channels_last=use_channels_last(cfg, device),
        rank=ranks.rank,
        world=ranks.size,
        balanced=cfg.data.sampler == "balanced",
        by_length=cfg.data.group_by_length,
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


def early_stop_of(cfg: Config, objective: Objective, val: Samples) -> EarlyStop | None:
    """`train.early_stop` on one of the validation metrics the objective declares (its direction from there)."""
    section = cfg.train.early_stop
    if section is None:
        return None
    if not len(val):
        raise ConfigError(
            "train.early_stop: stopping early needs a held-out split to validate on, and data.val_fraction is 0; set it above 0"
        )
    metrics = objective.validation_metrics
    metric = section.metric or objective.selection.metric
    if metric not in metrics:
        raise ConfigError(
            f"train.early_stop.metric: the run does not produce '{metric}'{did_you_mean(metric, list(metrics))} "
            f"(it validates: {', '.join(metrics)})"
        )
    return EarlyStop(metric, metrics[metric], section.patience, section.min_delta, section.cooldown)


def schedule_metric_of(
    cfg: Config, scheduler: Any, objective: Objective, val: Samples, early_stop: EarlyStop | None
) -> tuple[str, bool] | None:
    """What a schedule that follows validation (`observe` and `patience`: plateau) watches: early stopping's metric, else
    the one that picks best.pt."""
    if not hasattr(scheduler, "observe"):
        return None
    if not len(val):
        raise ConfigError(
            f"scheduler: '{cfg.scheduler.name}' lowers the learning rate when validation stops improving, and data.val_fraction "
            "is 0; set it above 0 or use scheduler.name=cosine"
        )
    if early_stop is None:
        return objective.selection.metric, objective.selection.higher_is_better
    if early_stop.patience <= scheduler.patience:
        raise ConfigError(
            f"train.early_stop.patience ({early_stop.patience}) is not above scheduler.patience ({scheduler.patience}): the run would "
            f"stop before its learning rate is cut; set train.early_stop.patience={scheduler.patience + 3} or lower scheduler.patience"
        )
    return early_stop.metric, early_stop.higher_is_better


def settings_of(
    cfg: Config, steps: Steps, device: torch.device, early_stop: EarlyStop | None = None, schedule_metric: tuple[str, bool] | None = None
) -> Settings:
    t = cfg.train
    return Settings(
        steps=steps,
        eval_batch_size=cfg.data.eval_batch_size,
        log_every=t.log_every,
        val_every=t.val_every,
        val_every_steps=t.val_every_steps,
        early_stop=early_stop,
        schedule_metric=schedule_metric,
        checkpoint_every=t.checkpoint_every,
        on_nan=t.on_nan,
        precision=training_precision(t.precision, device),
        ema_decay=t.ema_decay,
        grad_clip_norm=t.grad_clip_norm,
    )


# --------------------------------------------------------------------------- a training run


@dataclass
class Training:
    """Everything one training run steps through, built before its directory exists (bad input writes nothing)."""

    cfg: Config
    method: Method
    modality: Modality
    device: torch.device
    data: TrainingData
    val: Samples  # data.val, on the training device
    network: Network
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pipeline: Pipeline
    settings: Settings
    notes: list[str] = field(default_factory=list)  # options that have no effect as configured
    task_state: dict[str, Any] = field(default_factory=dict)  # what the task fitted on the training split
    data_root: Path = field(kw_only=True)  # the folder the data set was read from (data.root, else the default)

    @property
    def train(self) -> Samples:
        return self.data.train

    @property
    def steps(self) -> Steps:
        return self.settings.steps


def build_training(cfg: Config, *, load_weights: bool = True) -> Training:
    """A validated config -> data, network, objective, optimizer, scheduler, pipeline and steps, every check that
    can fail on bad input done first. `load_weights=False` (a resume) leaves the starting weights to the checkpoint."""
    device = pick_device(cfg.train.device)
    if cfg.train.precision == "16" and device.type != "cuda":
        raise ConfigError(f"train.precision: 16 (float16 with a gradient scaler) needs CUDA, not {device.type}; use bf16 or 32")
    ranks = world()
    if cfg.data.batch_size % ranks.size:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} (the global batch) does not split evenly over {ranks.size} processes")
    if cfg.train.sync_batchnorm and ranks.distributed and device.type != "cuda":
        raise ConfigError("train.sync_batchnorm: PyTorch's SyncBatchNorm needs CUDA; set it to false on CPU")
    method = method_of(cfg)
    method.check(cfg, ranks)
    trackers.check(cfg)
    torch.manual_seed(cfg.train.seed)
    modality = modality_of_config(cfg)
    data = load_training_data(
        cfg.data, labelled_subset=method.uses_labels, unlabeled=method.wants_unlabeled_pool(cfg), target_kind=task_target_kind(method)
    )
    data = _with_model_statistics(cfg, data, modality)
    notes = [*cfg.notes, *method.notes(cfg)]
    if cfg.finetune.source and modality.inherits_fitted_state:
        data, note = _read_as_source(data, modality, cfg.finetune.source)
        notes += [note] if note else []
    notes += modality.notes(data.train)
    notes += [EMULATED_BF16_NOTE] if training_precision(cfg.train.precision, device) != cfg.train.precision else []
    _check_targets(cfg, method, data.train)
    task_state = method.task.fit(data.train) if method.task is not None else {}
    steps = plan_steps(
        len(data.train), cfg.data.batch_size, cfg.train.epochs, cfg.train.max_steps, full_batches=method.full_batches, ranks=ranks.size
    )
    fitted = modality.fitted_state(data.train)
    context = modality.model_context(data.train.sample_shape, fitted)
    network = build_network(cfg, data.train.sample_shape, method.num_outputs(data.train), fitted)
    _check_fits(network, cfg, data.train, modality)
    augment = build_augment(cfg, data.train, modality)
    if method.task is not None:
        _check_augment_keeps_targets(cfg, method.task, augment)
        method.task.initialize(network)
    if load_weights:  # a resume takes every weight from its own checkpoint
        weights.load_starting_weights(network.encoder, cfg)
    network.to(device)
    val = data.val.to(device)

    method.prepare_network(network, cfg)
    channels_last = use_channels_last(cfg, device)
    if channels_last:
        network.to(memory_format=torch.channels_last)  # before DDP, whose gradient buckets take the strides
    forward = training_forward(cfg, network, device, method.some_steps_frozen(cfg))  # before the optimizer: SyncBatchNorm swaps modules
    lr_scale, encoder_decay = method.encoder_optimization(cfg)
    groups = parameter_groups(network, lr_scale, encoder_weight_decay=encoder_decay, layer_decay=method.encoder_layer_decay(cfg))
    optimizer = build_optimizer(cfg, groups)
    criterion = build_loss(cfg, network.head, data.train)
    if isinstance(criterion, nn.Module):
        criterion.to(device)  # its buffers (class weights) where the outputs are
    starting = (lambda: weights.starting_encoder_state(cfg, build_encoder(cfg, context))) if weights.has_pretrained_encoder(cfg) else None
    parts = Parts(
        cfg, device, modality, data.train, val, data.unlabeled, network, forward, criterion, augment, channels_last, steps.total, starting
    )
    objective = method.objective(parts)
    scheduler = build_scheduler(cfg, optimizer, steps.total)
    early_stop = early_stop_of(cfg, objective, val)
    pipeline = build_pipeline(cfg, data.train, augment, modality, device, views=method.views, drop_last=steps.drop_last)
    return Training(
        cfg,
        method,
        modality,
        device,
        data,
        val,
        network,
        objective,
        optimizer,
        scheduler,
        pipeline,
        settings_of(cfg, steps, device, early_stop, schedule_metric_of(cfg, scheduler, objective, val, early_stop)),
        notes,
        task_state,
        data_root=data_root(cfg.data),
    )


def _with_model_statistics(cfg: Config, data: TrainingData, modality: Modality) -> TrainingData:
    """The splits normalized as the model's pretrained weights expect (a timm model's `pretrained_cfg` mean and std),
    where its registration says (`input_statistics`); else with the data's own statistics."""
    statistics = MODELS.get(cfg.model.name).meta.get("input_statistics", lambda options: None)(cfg.model.options)
    if not statistics:
        return data
    unlabeled = modality.with_statistics(data.unlabeled, statistics) if data.unlabeled is not None else None
    return TrainingData(modality.with_statistics(data.train, statistics), modality.with_statistics(data.val, statistics), unlabeled)


def task_target_kind(method: Method) -> str | None:
    """The kind of target the method's task trains on (what a data set that can give several gives); None without a task."""
    return method.task.target_kind if method.task is not None else None


def _read_as_source(data: TrainingData, modality: Modality, source: str) -> tuple[TrainingData, str | None]:
    """The fine-tune's splits as its source run's encoder learnt to read them (`Modality.inherited`: audio keeps the
    source's front end and statistics), and a note on the data options that this makes moot."""
    fitted = checkpoints.read(Path(source) / "checkpoints" / "last.pt").data
    (train, note), (val, _) = modality.inherited(data.train, fitted), modality.inherited(data.val, fitted)
    unlabeled = modality.inherited(data.unlabeled, fitted)[0] if data.unlabeled is not None else None
    return TrainingData(train, val, unlabeled), note


def _check_targets(cfg: Config, method: Method, train: Samples) -> None:
    """A method that learns from labels needs some; balanced sampling needs a class per sample."""
    if cfg.data.sampler == "balanced" and class_counts(train) is None:
        raise ConfigError(f"data.sampler: balanced: data set '{cfg.data.name}' has no class per sample here to balance; drop it")
    if method.uses_labels and train.target_kind == "class" and not train.num_classes:
        raise ConfigError(
            f"method: '{cfg.method.name}' learns from labels, and data set '{cfg.data.name}' has none here (no label column); "
            f"set data.label_column, or pretrain with a method that uses no labels "
            f"({', '.join(e.name for e in METHODS if e.fn.command == 'pretrain' and not e.fn.uses_labels)})"
        )
    # the task's kind of target was asked of the data set and checked when it was read (`load_split`)


def _check_augment_keeps_targets(cfg: Config, task: Any, augment: BatchAugment) -> None:
    """An augmentation must leave the task's targets true (a rotation would corrupt angle targets)."""
    broken = sorted(augment.effects() & task.breaking_effects())
    if broken:
        settable = ", or set task.changed_by=[] if your targets do not change with them" if hasattr(task, "changed_by") else ""
        raise ConfigError(
            f"data.augment: '{cfg.data.augment.name}' would corrupt task '{cfg.task.name}''s targets "
            f"({', '.join(broken)}{': task.changed_by' if settable else ''}); "
            f"turn them off (e.g. data.augment.rotation=0 data.augment.hflip=false), use data.augment.name=none{settable}"
        )


def _check_fits(network: Network, cfg: Config, data: Samples, modality: Modality) -> None:
    """One eval-mode forward pass (no statistics change, no randomness drawn): an encoder that cannot take the
    data's shape fails here, as a config error, not mid-run."""
    network.eval()
    try:
        with torch.no_grad():
            network(modality.example_input(data, 2), **data.side_of(torch.arange(min(2, len(data)))))
    except (RuntimeError, TypeError) as exc:  # TypeError: a module that wants side information the data lacks
        reason = str(exc).strip().splitlines()[0]
        shape = "x".join(map(str, data.sample_shape))
        raise ConfigError(
            f"model: '{cfg.model.name}' does not fit {shape} inputs of data set '{cfg.data.name}' ({reason}); "
            f"change model options or the data's size"
        ) from None


# --------------------------------------------------------------------------- a trained run


@dataclass
class Trained:
    """A trained run read back: its config, checkpoint, method and network with the checkpoint's weights, its data
    splits read as the training split was (its classes, its fitted state), and `fitted`: the checkpoint's `data`
    (classes, target names, the modality's fitted state, with an older format's decoding filled in), what
    `Modality.read` decodes new inputs with."""

    record: RunRecord
    cfg: Config
    checkpoint: Checkpoint
    method: Method
    modality: Modality
    network: Network
    device: torch.device
    splits: dict[bool, Samples]
    fitted: dict[str, Any] = field(default_factory=dict)

    def split(self, train: bool) -> Samples:
        """The whole train or test split, as trained, on the run's device (read once)."""
        if train not in self.splits:
            self.splits[train] = as_trained(
                load_split(self.cfg.data, train=train, fitted=self.checkpoint.data, target_kind=task_target_kind(self.method)),
                self.checkpoint,
                self.modality,
                str(self.record.path),
            ).to(self.device)
        return self.splits[train]

    def served(self) -> nn.Module:
        """What an export holds and evaluation scores: the whole network, or its encoder alone."""
        if self.method.export().encoder_only:
            return self.network.encoder.eval()
        task = self.method.task
        return (task.served(self.network) if task is not None else self.network).eval()


def as_trained(data: Samples, checkpoint: Checkpoint, modality: Modality, where: str) -> Samples:
    """`data` read the way the model was trained: its classes in training order, the modality's fitted state."""
    trained = checkpoint.data
    if list(data.classes) != list(trained["classes"]):
        raise UsageError(f"{where}: the test split's classes {list(data.classes)} differ from the trained classes {trained['classes']}")
    if list(data.target_names) != list(trained.get("target_names", [])):
        raise UsageError(
            f"{where}: the test split's targets {list(data.target_names)} differ from the trained targets "
            f"{trained.get('target_names', [])}; give both splits the same target columns"
        )
    return modality.as_trained(data, trained)


def network_record(method: Method, train: Samples) -> dict[str, Any]:
    """What rebuilding a run's network needs beyond its config and fitted state (a checkpoint's `network`): the shape
    of one model input and the head's outputs."""
    return {"sample_shape": list(train.sample_shape), "num_outputs": method.num_outputs(train)}


def trained_fitted(checkpoint: Checkpoint, cfg: Config) -> dict[str, Any]:
    """A checkpoint's `data`; from a format before 3, with the decoding it did not record filled in as its data set
    decoded then (`Modality.completed_fitted`: from the data options and the data set's registration)."""
    if checkpoint.format >= 3:
        return dict(checkpoint.data)
    from transferctl.registry import DATASETS

    meta = DATASETS.get(cfg.data.name, where="data").meta
    return modality_of_config(cfg).completed_fitted(checkpoint.data, cfg.data.options, meta)


def recorded_sizes(checkpoint: Checkpoint, cfg: Config, fitted: dict[str, Any]) -> tuple[tuple[int, ...] | None, int]:
    """(shape of one model input, the head's outputs) as the checkpoint records them: format 3's `network`; before,
    the fitted state's shape (None where it says none: an image run's without a configured image size) and the
    method's outputs for the recorded classes or target names."""
    if checkpoint.network is not None:
        return tuple(checkpoint.network["sample_shape"]), int(checkpoint.network["num_outputs"])
    labels = Samples(
        torch.empty(0),
        torch.empty(0, dtype=torch.long),
        tuple(fitted.get("classes", ())),
        target_names=tuple(fitted.get("target_names", ())),
    )
    return modality_of_config(cfg).input_shape(fitted), method_of(cfg).num_outputs(labels)


def rebuild(
    checkpoint: Checkpoint, cfg: Config | None = None, *, sample_shape: tuple[int, ...] | None = None, where: str = "checkpoint"
) -> Network:
    """A checkpoint's network with its weights, on the CPU in eval mode, sized from what the checkpoint records (no
    data set read): format 3's `network`, or an older format's fitted state and classes. `cfg`: the run's config as
    read now (its overrides applied; default: the checkpoint's own). `sample_shape`: the input shape of an older
    image checkpoint that records none (`load_trained` gives its test split's); without it, a one-line error."""
    from transferctl.config import load_config

    cfg = cfg or load_config(None, base=checkpoint.config)
    fitted = trained_fitted(checkpoint, cfg)
    shape, num_outputs = recorded_sizes(checkpoint, cfg, fitted)
    shape = shape or sample_shape
    if shape is None:
        raise UsageError(
            f"{where}: its checkpoint (format {checkpoint.format}) records no input shape and data.image_size is not set; "
            f"evaluate or export the run with its data set, whose test split gives the shape"
        )
    network = build_network(cfg, tuple(shape), num_outputs, fitted)
    try:
        network.load_state_dict(lora.merged(checkpoint.model, cfg.finetune.lora))  # a LoRA run's adapters, merged
    except RuntimeError:
        raise UsageError(f"{where}: its checkpoint does not fit model '{cfg.model.name}' as configured; drop model overrides") from None
    return network.eval()


def load_trained(
    record: RunRecord,
    cfg: Config,
    *,
    checkpoint: str | None = None,
    device: torch.device | None = None,
    splits: tuple[str, ...] | None = None,
) -> Trained:
    """A run's `checkpoint` (default: `eval.checkpoint`) with its network (`rebuild`: sized without reading data),
    and its `splits` (default: those its method evaluates on; `()`: none), all read before anything is written. A
    checkpoint from before format 3 whose input shape neither it nor its config says is sized by its test split."""
    saved = checkpoints.read(record.checkpoint_path(checkpoint or cfg.eval.checkpoint))
    method, modality = method_of(cfg), modality_of_config(cfg)
    if method.task is not None:
        method.task.load_fitted(saved.task)
    device = device or pick_device(cfg.train.device)
    where, wanted = str(record.path), method.evaluation_splits if splits is None else splits
    fitted = trained_fitted(saved, cfg)
    shape = recorded_sizes(saved, cfg, fitted)[0]
    read: dict[bool, Samples] = {}
    if "test" in wanted or shape is None:  # before the network, as ever: a data error comes first
        try:
            read[False] = as_trained(
                load_split(cfg.data, train=False, fitted=saved.data, target_kind=task_target_kind(method)), saved, modality, where
            )
        except UsageError as exc:
            if shape is not None:
                raise
            raise UsageError(
                f"{where}: its checkpoint (format {saved.format}) records no input shape, which its test split gives: {exc}"
            ) from None
        if shape is None:
            fitted = {**modality.fitted_state(read[False]), **fitted}
    test_shape = read[False].sample_shape if False in read else None
    network = rebuild(saved, cfg, sample_shape=test_shape, where=where)
    splits_read = {train: data.to(device) for train, data in read.items()}
    trained = Trained(record, cfg, saved, method, modality, network.to(device).eval(), device, splits_read, fitted)
    for split in wanted:
        trained.split(train=split == "train")
    return trained
