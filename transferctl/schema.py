"""The config schema, YAML loading and `key=value` overrides: what a config file says, read without the registries.

`transferctl.config` resolves a raw config against the registries (the method's, task's and modality's
defaults, every component's options) and re-exports everything here, so callers import from there.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, PrivateAttr

from transferctl.errors import ConfigError, did_you_mean

SHORTHAND_SECTIONS = ("method", "task")  # `method: simclr` is short for `method: {name: simclr}`


class Component(BaseModel):
    """A registered component: `name` plus that component's keyword arguments."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelConfig(Component):
    """The encoder: a registered model, its options, and optionally the weights it starts from."""

    # A .pt or .safetensors state dict of the encoder, a model folder, a hub id (hf-hub:ORG/NAME), or DEFAULT: the
    # model's published weights (resnet18: torchvision's ImageNet weights). Loaded before training; a fine-tune
    # --from takes the source's instead.
    weights: str | None = None

    @pydantic.field_validator("weights")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """A path is stored absolute (like finetune.source), so the run's config still finds it from elsewhere."""
        if value is None or value.upper() == "DEFAULT":
            return None if value is None else "DEFAULT"
        if value.startswith("hf-hub:"):  # a hub id, read from the local cache (models/hub.py), not a path
            return value
        return str(Path(value).expanduser().resolve())


Seed = Annotated[int, Field(ge=0, lt=2**31)]


class DataConfig(BaseModel):
    """The data set (`name` plus its options) and how it is split, subset and batched."""

    model_config = ConfigDict(extra="allow")
    name: str
    root: str | None = None  # None: $TRANSFERCTL_DATA_DIR, else a per-user data folder
    download: bool = False
    batch_size: PositiveInt = 256
    eval_batch_size: PositiveInt = 1024
    labels_per_class: PositiveInt | None = None  # a seeded subset of that many labelled samples of every class
    labeled_samples: PositiveInt | None = None  # a seeded subset of that many labelled samples, whatever their targets
    # a long-tailed training split: class i keeps n_max * imbalance^(-i / (C - 1)) of its samples (seeded; CIFAR-LT)
    imbalance: float | None = Field(None, ge=1.0)
    sampler: Literal["random", "balanced"] = "random"  # balanced: each class drawn equally often (with replacement)
    # texts: batches of texts of like lengths, each cut to its longest (little padding: faster; recordings always are)
    group_by_length: bool = False
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: Seed = 0
    augment: Component | None = None
    pipeline: Literal["auto", "memory", "loader", "stream"] = "auto"  # auto: memory, or stream/loader past the budget
    memory_budget_mb: PositiveInt = 4096
    num_workers: Annotated[int, Field(ge=0, le=64)] = 2
    on_bad_sample: Literal["replace", "stop"] = "replace"  # streamed data: a sample that cannot be read
    rebuild_manifest: bool = False  # streamed image folders: list the folder again even if it looks unchanged

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"


class EarlyStopConfig(BaseModel):
    """Stop training once a validation metric has not improved for `patience` validations in a row."""

    model_config = ConfigDict(extra="forbid")
    metric: str | None = None  # a validation metric of the run's method or task (val_...); None: the one that picks best.pt
    patience: PositiveInt = 5  # validations (every train.val_every epochs and train.val_every_steps steps)
    min_delta: float = Field(0.0, ge=0.0)  # a smaller change is no improvement
    # > 0: once patience runs out, anneal the learning rate linearly to zero over this fraction of the steps trained
    # so far, then stop (a warmup-stable-decay schedule that decays where validation levels off)
    cooldown: float = Field(0.0, ge=0.0, le=1.0)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: PositiveInt = 10
    max_steps: PositiveInt | None = None
    seed: Seed = 0
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    log_every: PositiveInt = 50
    val_every: PositiveInt = 1  # epochs
    val_every_steps: PositiveInt | None = None  # also validate every that many optimizer steps (inside epochs too)
    early_stop: EarlyStopConfig | None = None
    checkpoint_every: PositiveInt | None = None
    on_nan: Literal["stop", "skip"] = "stop"
    channels_last: Literal["auto", True, False] = "auto"
    precision: Literal["32", "bf16", "16"] = "32"
    compile: bool = False
    sync_batchnorm: bool = False
    loggers: list[str] = []  # experiment trackers the run also reports to: tensorboard, mlflow, wandb (trackers.py)
    tensorboard: bool = False  # the same as loggers: [tensorboard] (what runs of transferctl 0.13 and before say)
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)  # > 0: validate, save and export a moving average of the weights
    grad_clip_norm: PositiveFloat | None = None  # the gradients' global L2 norm is scaled down to at most this before each step

    @pydantic.field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class UnlabeledConfig(BaseModel):
    """Fine-tuning that also learns from the training images without their labels (FixMatch-style
    pseudo-labels): a confident prediction on a weakly augmented image is the target for a strongly
    augmented view of it. Off while `weight` is 0, and then the unlabeled images are never loaded."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(0.0, ge=0.0)
    batch_size: PositiveInt = 256
    threshold: float = Field(0.95, ge=0.0, le=1.0)
    warmup_steps: Annotated[int, Field(ge=0)] = 0  # steps of labels alone before pseudo-labels count
    align: bool = False  # distribution alignment: each batch's predictions reweighted to the labelled class shares
    propagate: bool = False  # predictions multiplied by label propagation over the starting encoder's features
    augment: Component | None = None  # the strong view; the weak one is data.augment
    check: bool = True  # at the end, compare with a labels-only head (summary.json's unlabeled_check; a warning if worse)


class LoraConfig(BaseModel):
    """LoRA (models/lora.py): rank-`r` adapters, scaled by alpha / r, beside the encoder's `target_modules` (module
    names or name suffixes, or "all-linear"); the encoder's own weights stay fixed."""

    model_config = ConfigDict(extra="forbid")
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = "all-linear"


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str | None = None
    freeze_encoder: bool = False
    encoder_lr_scale: float = Field(1.0, ge=0.0)
    head_warmup_steps: Annotated[int, Field(ge=0)] = 0  # steps of linear probing (encoder frozen) before the encoder trains
    l2_sp: float = Field(0.0, ge=0.0)  # strength of the pull toward the pretrained encoder weights (L2-SP)
    unlabeled: UnlabeledConfig = UnlabeledConfig()
    lora: LoraConfig | None = None  # train low-rank adapters (and the head), not the encoder's weights
    # each layer's learning rate times layer_decay ** (its depth below the top): ViT-style fine-tuning (optim.py)
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # auto: last.pt, or best.pt for a run that stopped early. Not `best` by default: it is chosen with the validation
    # split's labels, which a few-label budget does not have
    checkpoint: Literal["auto", "best", "last"] = "auto"
    knn_k: PositiveInt = 20
    knn_temperature: float = Field(0.07, gt=0.0)
    knn_bank: PositiveInt = 10_000  # a streamed training split: a seeded sample of this many is the k-NN bank


def component_name(section: Any) -> str | None:
    """The name of a component section as a stored config holds it: `simclr` or `{name: simclr}`."""
    return section.get("name") if isinstance(section, dict) else section


# transferctl 0.1.0 wrote no task section: its methods that trained a head trained a classifier.
TASKS_OF_0_1_METHODS = {"supervised": "classification", "finetune": "classification"}


def stored_task(config: dict[str, Any]) -> str | None:
    """The task a stored run config trains, also for a config of transferctl 0.1.0 (read without the registries)."""
    return component_name(config.get("task")) or TASKS_OF_0_1_METHODS.get(str(component_name(config.get("method"))))


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Component  # how the run trains (a registered method) and its options
    task: Component | None = None  # what a method that trains a head trains it for; default: classification
    model: ModelConfig = ModelConfig(name="cnn")
    head: Component | None = None
    loss: Component | None = None
    optimizer: Component = Component(name="adamw")
    scheduler: Component = Component(name="cosine")
    data: DataConfig
    train: TrainConfig = TrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    # What resolving did to the files' settings (a recipe option another data set does not take, dropped): shown and
    # logged by the run, never written to its config.
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @pydantic.field_validator(*SHORTHAND_SECTIONS, mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Safe-load a YAML mapping; errors name the file and, for syntax errors, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; check the path passed to -c") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (it is not UTF-8); pass a YAML config to -c") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: config is empty; start from one of the files in configs/")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config must be a mapping of sections, got {type(data).__name__}")
    return data


OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=3' -> (['train', 'epochs'], 3); the value parses as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not OVERRIDE_KEY.match(key):
        raise ConfigError(f"override '{text}': expected dotted.key=value, for example train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `data` with each `key=value` set at its dotted path."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if depth == 0 and part in SHORTHAND_SECTIONS and isinstance(child, str):
                child = node[part] = {"name": child}
            if not isinstance(child, dict):
                dotted = ".".join(path[: depth + 1])
                raise ConfigError(f"override '{text}': {dotted} is a value, not a section")
            node = child
        if path[-1] == "name" and path != ["data", "name"] and node.get("name", value) != value:
            node.clear()  # another component: the old one's options do not apply
        node[path[-1]] = value
    return data


def value_at(data: Any, *path: str) -> Any:
    """The raw config's value at `path` (`value_at(data, "data", "name")`), or None where a section is missing."""
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


# --------------------------------------------------------------------------- messages


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside `X`, `Optional[X]` or `X | None`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _unwrap_model(arg)
            if found:
                return found
    return None


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section at `loc` (a pydantic error location)."""
    model: type[BaseModel] | None = Config
    for part in loc:
        if model is None or part not in model.model_fields:
            return []
        model = _unwrap_model(model.model_fields[part].annotation)
    return list(model.model_fields) if model else []


def pydantic_message(err: dict[str, Any]) -> str:
    """A pydantic error as one line that names the dotted key (an unknown key: with a did-you-mean)."""
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        hint = did_you_mean(str(loc[-1]), known)
        return f"{dotted}: unknown key{hint or ' (allowed: ' + ', '.join(known) + ')'}"
    if err["type"] == "missing":
        return f"{dotted}: required key is missing"
    if err["type"] in ("model_type", "dict_type"):
        return f"{dotted}: expected a section (a mapping of keys), got {err.get('input')!r}"
    return f"{dotted}: {err['msg']} (got {err.get('input')!r})"


def with_origin(message: str, source: str, overrides: list[str]) -> str:
    """Prefix a message with the override that set its key (the most specific one: `method.mask_ratio=2` rather
    than `method=mae`), else the config file."""
    dotted = message.split(":", 1)[0]
    keys = {text: text.partition("=")[0] for text in overrides}
    matching = [t for t, k in keys.items() if k == dotted or k.startswith(dotted + ".") or dotted.startswith(k + ".")]
    if matching:
        text = max(matching, key=lambda t: (keys[t] == dotted, len(keys[t])))
        return f"override '{text}': {message}"
    return f"{source}: {message}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3}: the dotted keys that overrides and diffs use."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins. A component whose name changes is replaced whole
    (the `data` section is not a component: its batching and split keys carry over)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        old = out.get(key)
        renamed = isinstance(value, dict) and isinstance(old, dict) and "name" in value and old.get("name") != value["name"]
        if isinstance(value, dict) and isinstance(old, dict) and (key == "data" or not renamed):
            out[key] = merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out
