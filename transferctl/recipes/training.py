"""The `pretrain` and `finetune` recipes: config -> components -> engine -> runs/<id>/."""

from __future__ import annotations

import copy
import signal
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from transferctl import build, events, plots
from transferctl.config import PRETRAIN_METHODS, Config, load_config, merge, read_yaml
from transferctl.data import BatchAugment, ImageData, data_root, load_training_data
from transferctl.data.pipeline import UnlabeledStream
from transferctl.engine.evaluate import embed
from transferctl.engine.finetuning import PseudoLabels, WeightAnchor
from transferctl.engine.propagation import propagate_labels
from transferctl.registry import AUGMENTATIONS
from transferctl.engine import (
    ClassificationObjective,
    ContrastiveObjective,
    Reporter,
    SilentReporter,
    fit,
    pick_device,
)
from transferctl.engine.signals import StopOnSignal
from transferctl.data.pipeline import Pipeline
from transferctl.distributed import world
from transferctl.engine.train import Position, Settings, drops_last_batch, half_precision, total_steps
from transferctl.errors import ConfigError, Interrupted, RunFailed, UsageError
from transferctl.models import Network
from transferctl.runs import DEFAULT_RUNS_DIR, Run, create_run, load_checkpoint, read_trained_run, recording


@dataclass
class RunResult:
    """What a command reports: the run, its status and flat metrics."""

    run_id: str
    run_dir: Path
    status: str
    metrics: dict[str, Any]
    parent: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "status": self.status, "parent": self.parent, "metrics": self.metrics, **self.extra}


def recipe_path(name: str) -> Path:
    """A YAML recipe shipped inside the package (used when no -c is given)."""
    return Path(str(resources.files("transferctl.recipes") / f"{name}.yaml"))


# --------------------------------------------------------------------------- pretrain

def pretrain(
    config: str | Path | Config,
    overrides: list[str] | None = None,
    *,
    runs_dir: Path = DEFAULT_RUNS_DIR,
    reporter: Reporter | None = None,
) -> RunResult:
    """Pretrain an encoder (SimCLR or supervised) and write a new run."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides, command="pretrain")
    if cfg.method not in PRETRAIN_METHODS:
        raise ConfigError(f"method: '{cfg.method}' is run by `transferctl finetune`, not `transferctl pretrain`")
    return train_run(cfg, runs_dir=runs_dir, command="pretrain", reporter=reporter)


# --------------------------------------------------------------------------- finetune

def finetune_config(
    source: str | None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    runs_dir: Path = DEFAULT_RUNS_DIR,
) -> Config:
    """The fine-tune config: the shipped recipe (or `config`), the source run's encoder and data set, overrides.

    Without a source the encoder starts from random weights: the from-scratch baseline.
    """
    if source is None and config is None:
        raise UsageError("finetune needs --from RUN (a pretraining run) or -c CONFIG (to train from scratch)")
    base = read_yaml(recipe_path("finetune"))
    user = read_yaml(config) if config is not None else {}
    if source is not None:
        record = read_trained_run(source, runs_dir)
        src = record.config
        if "model" in user and not isinstance(user["model"], dict):
            raise ConfigError(f"{config}: model: expected a section (name: ... and options), got {user['model']!r}")
        for key, value in (user.get("model") or {}).items():
            if src["model"].get(key) != value:
                raise ConfigError(
                    f"{config}: model.{key}={value!r} differs from the source run's encoder "
                    f"({key}={src['model'].get(key)!r}); drop the model section to use the source's"
                )
        inherited_data = {k: v for k, v in src["data"].items() if k not in ("batch_size", "labels_per_class", "augment", "eval_batch_size")}
        base["model"] = {k: v for k, v in src["model"].items() if k != "weights"}  # the encoder comes from the source run
        base["data"] = {**inherited_data, **base["data"]}
        base["train"] = {**base.get("train", {}), "seed": src["train"]["seed"], "device": src["train"]["device"]}
        base["finetune"] = {**base.get("finetune", {}), "source": str(record.path.resolve())}
        user.pop("model", None)
    merged = merge(base, user)
    try:
        return load_config(None, overrides, base=merged, command="finetune")
    except ConfigError as exc:  # attribute errors to the user's file, when there is one
        message = str(exc)
        if config is not None and message.startswith("config: "):
            message = f"{config}: " + message.removeprefix("config: ")
        raise ConfigError(message) from None


def finetune(
    source: str | None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    runs_dir: Path = DEFAULT_RUNS_DIR,
    reporter: Reporter | None = None,
) -> RunResult:
    """Fine-tune (or linear-probe) a pretrained encoder with a new classifier; a new run."""
    cfg = finetune_config(source, config, overrides, runs_dir=runs_dir)
    return train_run(cfg, runs_dir=runs_dir, command="finetune", reporter=reporter)


def has_pretrained_encoder(cfg: Config) -> bool:
    """Whether fine-tuning starts from pretrained weights: a source run's, or a weights file's (model.weights)."""
    return bool(cfg.finetune.source or cfg.model.weights)


def pretrained_encoder_state(cfg: Config, channels: int, image_size: int) -> dict[str, torch.Tensor]:
    """The encoder weights fine-tuning started from, read again (a resumed run needs them for L2-SP)."""
    if cfg.finetune.source:
        return source_encoder_state(cfg)
    encoder = build.build_encoder(cfg, channels, image_size)
    build.load_model_weights(encoder, cfg)
    return encoder.state_dict()


def source_encoder_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The encoder's weights (not the head's) from the source run's last checkpoint."""
    state = load_checkpoint(Path(cfg.finetune.source) / "checkpoints" / "last.pt")["model"]
    return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}


def load_encoder_weights(model: Network, cfg: Config) -> None:
    """Copy the source run's encoder into `model`."""
    try:
        model.encoder.load_state_dict(source_encoder_state(cfg))
    except RuntimeError:
        raise UsageError(
            f"finetune.source {cfg.finetune.source}: its encoder weights do not fit model '{cfg.model.name}' with {cfg.model.options}; "
            f"the run was made with a different architecture"
        ) from None


# --------------------------------------------------------------------------- the shared training run

@dataclass
class Prepared:
    """Everything a training run needs, built before its directory exists (so bad input writes nothing)."""

    cfg: Config
    device: torch.device
    train: ImageData
    val: ImageData
    model: Network
    unlabeled: ImageData | None = None  # the pseudo-label pool, when finetune.unlabeled is on


def prepare(cfg: Config, load_source: bool = True) -> Prepared:
    """Data, model and device, every check that can fail on bad input done before anything is written."""
    device = pick_device(cfg.train.device)
    if cfg.train.precision == "16" and device.type != "cuda":
        raise ConfigError(f"train.precision: 16 (float16 with a gradient scaler) needs CUDA, not {device.type}; use bf16 or 32")
    ranks = world()
    if cfg.data.batch_size % ranks.size:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} (the global batch) does not split evenly over {ranks.size} processes")
    if cfg.train.sync_batchnorm and ranks.distributed and device.type != "cuda":
        raise ConfigError("train.sync_batchnorm: PyTorch's SyncBatchNorm needs CUDA; set it to false on CPU")
    _check_finetune_options(cfg)
    events.check_available(cfg.train.tensorboard)
    torch.manual_seed(cfg.train.seed)
    pseudo_labelling = cfg.method == "finetune" and cfg.finetune.unlabeled.weight > 0
    train, val, unlabeled = load_training_data(cfg.data, labelled_subset=cfg.is_classifier, unlabeled=pseudo_labelling)
    total_steps(settings_of(cfg), len(train), not cfg.is_classifier)  # refuses a batch larger than the data
    model = build.build_network(cfg, train.channels, train.image_size, train.num_classes)
    _check_fits(model, cfg, train)
    if cfg.finetune.source and load_source:  # a resume takes every weight from its own checkpoint
        load_encoder_weights(model, cfg)
    elif cfg.model.weights and load_source:
        build.load_model_weights(model.encoder, cfg)
    return Prepared(cfg, device, train, val.to(device), model.to(device), unlabeled)


def _check_finetune_options(cfg: Config) -> None:
    options = cfg.finetune
    if cfg.method != "finetune":
        return
    ranks = world().size
    if options.unlabeled.weight and options.unlabeled.batch_size % ranks:
        raise ConfigError(
            f"finetune.unlabeled.batch_size: {options.unlabeled.batch_size} does not split evenly over {ranks} processes; "
            f"make it a multiple of {ranks}"
        )
    if options.l2_sp and not has_pretrained_encoder(cfg):
        raise ConfigError(
            "finetune.l2_sp pulls the encoder toward pretrained weights, and this run has none; "
            "use --from RUN (or model.weights) or set it to 0"
        )


def _check_fits(model: Network, cfg: Config, data: ImageData) -> None:
    """One eval-mode forward pass (no statistics change, no randomness drawn): an encoder that cannot
    take the data set's image size fails here, as a config error, not mid-run."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, data.channels, data.image_size, data.image_size))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"model: '{cfg.model.name}' does not fit {data.channels}x{data.image_size}x{data.image_size} images "
            f"of data set '{cfg.data.name}' ({reason}); change model options or the image size"
        ) from None


def train_run(cfg: Config, *, runs_dir: Path, command: str, reporter: Reporter | None = None) -> RunResult:
    """Train `cfg` into a new run directory; the run records success, failure or interruption."""
    prepared = prepare(cfg)
    parent = Path(cfg.finetune.source).name if cfg.finetune.source else None
    environment = {"device": str(prepared.device), "seed": cfg.train.seed, "data_root": str(data_root(cfg.data))}
    run = create_run(runs_dir, f"{cfg.method}-{cfg.data.name}", cfg.to_dict(), parent, command, environment)
    run.log(f"{command} {cfg.method} on {cfg.data.name}: {len(prepared.train)} train / {len(prepared.val)} val images, device {prepared.device}")
    with recording(run, command) as outcome:
        outcome["metrics"] = fit_run(prepared, run, command, reporter or SilentReporter())
    return RunResult(run.id, run.path, "completed", run.summary["metrics"], parent)


def settings_of(cfg: Config) -> Settings:
    t = cfg.train
    return Settings(
        batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size, epochs=t.epochs, max_steps=t.max_steps,
        seed=t.seed, log_every=t.log_every, val_every=t.val_every, checkpoint_every=t.checkpoint_every, on_nan=t.on_nan,
        precision=t.precision, ema_decay=t.ema_decay,
    )


@dataclass
class Training:
    """The components one training run steps through."""

    objective: ClassificationObjective | ContrastiveObjective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pipeline: Pipeline
    settings: Settings
    steps: int


def build_training(p: Prepared) -> Training:
    """Objective, optimizer, schedule and batch pipeline for a prepared run (also used by the benchmarks)."""
    cfg = p.cfg
    if cfg.method == "finetune" and cfg.finetune.freeze_encoder:
        p.model.freeze_encoder()
    if build.use_channels_last(cfg, p.device):
        p.model.to(memory_format=torch.channels_last)  # before DDP, whose gradient buckets take the strides
    warmup_steps = _head_warmup_steps(cfg) if cfg.method == "finetune" else 0
    forward = build.training_forward(cfg, p.model, p.device, warmup_steps > 0)  # before the optimizer: SyncBatchNorm swaps modules
    finetuning = cfg.method == "finetune"
    # The encoder LR scale and the head warm-up protect pretrained features; a randomly initialised
    # encoder (the from-scratch baseline) has none, so it trains at the full rate from the first step.
    pretrained = finetuning and has_pretrained_encoder(cfg)
    groups = build.parameter_groups(
        p.model, cfg.finetune.encoder_lr_scale if pretrained else 1.0,
        encoder_weight_decay=0.0 if pretrained and cfg.finetune.l2_sp else None,  # L2-SP replaces the pull toward zero
    )
    optimizer = build.build_optimizer(cfg, groups)
    criterion = build.build_loss(cfg)
    augment = build.build_augment(cfg, p.train)
    if finetuning:
        objective: ClassificationObjective | ContrastiveObjective = ClassificationObjective(
            p.model, criterion, forward, head_warmup_steps=warmup_steps,
            anchor=_weight_anchor(p), pseudo_labels=_pseudo_labels(p, augment),
        )
    elif cfg.is_classifier:
        objective = ClassificationObjective(p.model, criterion, forward)
    else:
        objective = ContrastiveObjective(p.model, criterion, augment, forward, gather=world().distributed)
    settings = settings_of(cfg)
    _, steps = total_steps(settings, len(p.train), objective.contrastive)
    scheduler = build.build_scheduler(cfg, optimizer, steps)
    drop_last = drops_last_batch(settings, len(p.train), objective.contrastive)
    pipeline = build.build_pipeline(cfg, p.train, augment, p.device, views=objective.views, drop_last=drop_last)
    return Training(objective, optimizer, scheduler, pipeline, settings, steps)


def _head_warmup_steps(cfg: Config) -> int:
    """A frozen encoder (linear probe) is frozen throughout; a random one has nothing to protect."""
    return cfg.finetune.head_warmup_steps if has_pretrained_encoder(cfg) and not cfg.finetune.freeze_encoder else 0


def _weight_anchor(p: Prepared) -> WeightAnchor | None:
    """L2-SP's anchor: the pretrained encoder (read again, so a resumed run anchors where the first one did)."""
    strength = p.cfg.finetune.l2_sp
    if not strength:
        return None
    return WeightAnchor.toward(p.model.encoder, pretrained_encoder_state(p.cfg, p.train.channels, p.train.image_size), strength)


def _pseudo_labels(p: Prepared, weak: BatchAugment) -> PseudoLabels | None:
    options = p.cfg.finetune.unlabeled
    if p.unlabeled is None:
        return None  # finetune.unlabeled is off: the images were not even kept
    strong = AUGMENTATIONS.build(options.augment.name, options.augment.options, hflip_default=p.train.hflip)
    ranks = world()
    pool = p.unlabeled.to(p.device)  # once: the stream and the propagation share it
    stream = UnlabeledStream(
        pool, weak, strong, batch_size=options.batch_size, seed=p.cfg.train.seed,
        channels_last=build.use_channels_last(p.cfg, p.device), rank=ranks.rank, world=ranks.size,
    )
    shares = None
    if options.align:
        counts = torch.bincount(p.train.labels, minlength=p.train.num_classes).float()
        shares = (counts / counts.sum()).to(p.device)  # once here, not every step
    prior = _propagated_labels(p, pool) if options.propagate else None
    return PseudoLabels(stream, options.weight, options.threshold, class_shares=shares, prior=prior)


def _propagated_labels(p: Prepared, pool: ImageData) -> torch.Tensor:
    """Each pool image's class distribution by label propagation over the starting encoder's features:
    the pretrained one (read again, so a resumed run propagates as the first one did) or, from scratch,
    the seeded random one."""
    encoder = copy.deepcopy(p.model.encoder)
    if has_pretrained_encoder(p.cfg):
        encoder.load_state_dict(pretrained_encoder_state(p.cfg, p.train.channels, p.train.image_size))
    encoder.to(p.device)
    batch = p.cfg.data.eval_batch_size
    half = half_precision(p.cfg.train.precision)
    with torch.autocast(p.device.type, dtype=half, enabled=half is not None):
        labelled, unlabeled = embed(encoder, p.train.to(p.device), batch), embed(encoder, pool, batch)
    return propagate_labels(labelled, p.train.labels.to(p.device), unlabeled, p.train.num_classes)


def fit_run(p: Prepared, run: Run, command: str, reporter: Reporter, resume_from: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = p.cfg
    t = build_training(p)
    threads = build.training_threads(cfg, t.pipeline, p.device)
    run.log(f"pipeline {type(t.pipeline).__name__}, {threads} CPU threads")
    ft = cfg.finetune
    if cfg.method == "finetune" and not has_pretrained_encoder(cfg) and (ft.encoder_lr_scale != 1.0 or ft.head_warmup_steps):
        run.log("random initial encoder: finetune.encoder_lr_scale and head_warmup_steps do not apply (nothing pretrained to protect)")
    config = cfg.to_dict()
    # What evaluate and export need to feed the model as it was trained, whatever the test split holds.
    data_info = {"mean": list(p.train.mean), "std": list(p.train.std), "classes": list(p.train.classes)}

    def save(state: dict[str, Any], row: dict[str, Any] | None, is_best: bool) -> None:
        position = state["position"]
        where = {"config": config, "data": data_info, "epoch": position["epoch"], "step": position["step"]}
        if row is not None:
            run.log_metrics(row)
            run.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if is_best:  # before last.pt, whose position.best must never name weights best.pt lacks
            run.save_checkpoint("best", {"model": state["model"], "metrics": row, **where})
        run.save_checkpoint("last", {**state, **where, "world_size": world().size, "device_type": p.device.type})

    # SimCLR's first batch of a fresh run is kept for views.png: the views as the model saw them
    pipeline = plots.FirstBatch(t.pipeline) if not cfg.is_classifier and resume_from is None and run.writer and plots.available() else t.pipeline
    if cfg.train.tensorboard and run.writer:
        resume_step = resume_from["position"]["step"] if resume_from else None
        reporter = events.TensorBoardReporter(reporter, run.tensorboard_dir, resume_step)

    with StopOnSignal() as stop, build.cpu_threads(threads):
        try:
            result = fit(
                t.objective, p.model, t.optimizer, t.scheduler, pipeline, p.val, t.settings,
                save=save, reporter=reporter, resume=resume_from, should_stop=stop.requested,
            )
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise RunFailed(
                f"out of memory ({type(exc).__name__}); lower data.batch_size (now {cfg.data.batch_size}) "
                f"or data.eval_batch_size (now {cfg.data.eval_batch_size})"
            ) from None
        finally:
            if isinstance(reporter, events.TensorBoardReporter):
                reporter.close()
    if result.stopped:  # by a signal here or on another rank
        signum = stop.signum or signal.SIGTERM
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} at step {result.position.step} of {t.steps}, checkpoint saved; "
            f"continue with `transferctl {command} --resume {run.path}`",
            signum,
        )
    plots.write_curves(run)
    if isinstance(pipeline, plots.FirstBatch) and pipeline.views is not None:
        plots.write_view_pairs(run, pipeline.views, p.train.mean, p.train.std)
    metrics = final_metrics(result.position, result.images_per_s)
    if p.device.type == "cuda":
        metrics["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(p.device) / 2**20, 1)
    return metrics


def final_metrics(position: Position, images_per_s: float) -> dict[str, Any]:
    """The run's flat metrics: its last row, its throughput and its best validation scores."""
    metrics = {k: v for k, v in position.last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics["images_per_s"] = round(images_per_s, 1)
    for key in ("val_accuracy", "val_loss"):
        if key in position.best:
            metrics[f"best_{key}"] = position.best[key]
    return metrics
