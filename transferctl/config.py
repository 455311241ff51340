"""The config schema, YAML loading, `key=value` overrides and did-you-mean validation.

Data flows one way: YAML (+ overrides) -> `load_config` -> a validated, fully resolved `Config`
whose every component section names a registered component with all its options filled in.
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
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from transferctl.errors import ConfigError
from transferctl.registry import (
    AUGMENTATIONS,
    DATASETS,
    HEADS,
    LOSSES,
    METHODS,
    MODELS,
    OPTIMIZERS,
    SCHEDULERS,
    TASKS,
    Registry,
    did_you_mean,
    load_components,
    serves,
)

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

    # A .pt or .safetensors state dict of the encoder, or DEFAULT: the model's published weights (resnet18:
    # torchvision's ImageNet weights). Loaded before training; a fine-tune --from takes the source's instead.
    weights: str | None = None

    @pydantic.field_validator("weights")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """A path is stored absolute (like finetune.source), so the run's config still finds it from elsewhere."""
        if value is None or value.upper() == "DEFAULT":
            return None if value is None else "DEFAULT"
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


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: PositiveInt = 10
    max_steps: PositiveInt | None = None
    seed: Seed = 0
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    log_every: PositiveInt = 50
    val_every: PositiveInt = 1
    checkpoint_every: PositiveInt | None = None
    on_nan: Literal["stop", "skip"] = "stop"
    channels_last: Literal["auto", True, False] = "auto"
    precision: Literal["32", "bf16", "16"] = "32"
    compile: bool = False
    sync_batchnorm: bool = False
    tensorboard: bool = False  # event files in runs/<id>/tensorboard/ (the tensorboard extra)
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)  # > 0: validate, save and export a moving average of the weights

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
    align: bool = False  # distribution alignment: each batch's predictions reweighted to the labelled class shares
    propagate: bool = False  # predictions multiplied by label propagation over the starting encoder's features
    augment: Component | None = None  # the strong view; the weak one is data.augment


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str | None = None
    freeze_encoder: bool = False
    encoder_lr_scale: float = Field(1.0, ge=0.0)
    head_warmup_steps: Annotated[int, Field(ge=0)] = 0  # steps of linear probing (encoder frozen) before the encoder trains
    l2_sp: float = Field(0.0, ge=0.0)  # strength of the pull toward the pretrained encoder weights (L2-SP)
    unlabeled: UnlabeledConfig = UnlabeledConfig()


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # `last` by default: `best` is chosen with the validation split's labels, which a few-label budget does not have
    checkpoint: Literal["best", "last"] = "last"
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


def _component_names(data: dict[str, Any]) -> dict[str, Any]:
    """Name the default component of every component section that an override created without a name,
    so that `optimizer.lr=0.1` works on a config that never mentions the optimizer."""
    defaults = {key: Config.model_fields[key].default for key in ("model", "optimizer", "scheduler")}
    chosen = _defaults_for(data)
    sections = {**{k: v.name for k, v in defaults.items()}, **{k: chosen.get(k) for k in ("head", "loss", "task")}}
    for key, name in sections.items():
        if isinstance(data.get(key), dict) and "name" not in data[key] and name:
            data[key]["name"] = name
    for path, name in {"data.augment": chosen.get("augment"), **chosen.get("sections", {})}.items():
        section = _section(data, *path.split("."))
        if isinstance(section, dict) and "name" not in section and name:
            section["name"] = name
    return data


def _defaults_for(data: dict[str, Any]) -> dict[str, Any]:
    """The default components of the raw config's method, task and data set; {} while any is unknown
    (`resolve` then says which)."""
    load_components()
    method, dataset = component_name(data.get("method")), _section(data, "data", "name")
    if not isinstance(method, str) or method not in METHODS or not isinstance(dataset, str) or dataset not in DATASETS:
        return {}
    method_cls = METHODS.get(method).fn
    task = component_name(data.get("task")) or method_cls.default_task
    if method_cls.trains_task and not (isinstance(task, str) and task in TASKS):
        return {}
    return {**_defaults_of(method_cls, task, dataset)[1], "task": method_cls.default_task}


def _defaults_of(method: type, task: str | None, dataset: str) -> tuple[type | None, dict[str, Any]]:
    """The task class a method trains (the named task, else its default; None for a method that trains none)
    and the components a config gets unless it names them: the one place defaults are worked out."""
    from transferctl.methods import component_defaults
    from transferctl.modalities import dataset_modality, modality_named

    task_cls = TASKS.get(task or method.default_task, where="task").fn if method.trains_task else None
    return task_cls, component_defaults(method, task_cls, modality_named(dataset_modality(dataset)))


def _section(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


# --------------------------------------------------------------------------- validation


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


def _pydantic_message(err: dict[str, Any]) -> str:
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


def _origin(message: str, source: str, overrides: list[str]) -> str:
    """Prefix a message with the override that set its key (the most specific one: `method.mask_ratio=2` rather
    than `method=mae`), else the config file."""
    dotted = message.split(":", 1)[0]
    keys = {text: text.partition("=")[0] for text in overrides}
    matching = [t for t, k in keys.items() if k == dotted or k.startswith(dotted + ".") or dotted.startswith(k + ".")]
    if matching:
        text = max(matching, key=lambda t: (keys[t] == dotted, len(keys[t])))
        return f"override '{text}': {message}"
    return f"{source}: {message}"


def _resolve_component(registry: Registry, component: Component, where: str) -> Component:
    entry = registry.get(component.name, where=where)
    options = entry.validate(component.options, where=where)
    return Component(name=component.name, **options)


def resolve(data: dict[str, Any], command: str | None = None) -> Config:
    """Validate a raw config dict and fill in the method's defaults and every component option.

    With `command`, a method that belongs to another command is refused first, naming that command.
    """
    from transferctl.modalities import dataset_modality

    load_components()
    raw_method = component_name(data.get("method"))
    if (
        data.get("task") is not None
        and isinstance(raw_method, str)
        and raw_method in METHODS
        and not METHODS.get(raw_method).fn.trains_task
    ):
        raise ConfigError(
            f"task: method '{raw_method}' trains no task head; drop the task section (fine-tuning and supervised pretraining take one)"
        )
    try:
        cfg = Config.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(_pydantic_message(exc.errors()[0])) from None
    if not data.get("model"):  # no model named: the data's modality's default encoder (images and audio: cnn)
        from transferctl.modalities import modality_named

        cfg.model = ModelConfig(name=modality_named(dataset_modality(cfg.data.name)).default_model)
    method = METHODS.get(cfg.method.name, where="method").fn
    if command is not None and method.command != command:
        raise ConfigError(f"method: '{cfg.method.name}' is run by `transferctl {method.command}`, not `transferctl {command}`")
    if method.trains_task and cfg.task is None and method.default_task is None:
        raise ConfigError(
            f"task: method '{cfg.method.name}' trains a task head and has no default task; set task.name ({', '.join(TASKS.names())})"
        )
    task, defaults = _defaults_of(method, cfg.task.name if cfg.task is not None else None, cfg.data.name)
    _check_label_budget(cfg.data, task, cfg.task.name if cfg.task is not None else method.default_task)
    if task is not None:
        cfg.task = cfg.task or Component(name=method.default_task)
    modality = dataset_modality(cfg.data.name)
    owner = f"task '{cfg.task.name}'" if cfg.task is not None else f"method '{cfg.method.name}'"
    cfg.head = cfg.head or _default(defaults["head"], "head", f"{owner} has no default head")
    cfg.loss = cfg.loss or _default(defaults["loss"], "loss", f"{owner} has no default loss")
    augment_missing = f"the {modality} modality has no '{method.augmentation}' augmentation for method '{cfg.method.name}'"
    cfg.data.augment = cfg.data.augment or _default(defaults["augment"], "data.augment", augment_missing)

    cfg.method = _resolve_component(METHODS, cfg.method, "method")
    if cfg.task is not None:
        cfg.task = _resolve_component(TASKS, cfg.task, "task")
    cfg.model = ModelConfig(weights=cfg.model.weights, **_resolve_component(MODELS, cfg.model, "model").model_dump())
    if cfg.model.weights and cfg.finetune.source:
        raise ConfigError("model.weights: a fine-tune --from RUN takes its encoder from RUN; drop model.weights (or --from)")
    _resolve_model_from_weights(cfg)
    cfg.head = _resolve_component(HEADS, cfg.head, "head")
    cfg.loss = _resolve_component(LOSSES, cfg.loss, "loss")
    cfg.optimizer = _resolve_component(OPTIMIZERS, cfg.optimizer, "optimizer")
    cfg.scheduler = _resolve_component(SCHEDULERS, cfg.scheduler, "scheduler")
    augments = {"data.augment": cfg.data.augment}
    cfg.data.augment = _resolve_component(AUGMENTATIONS, cfg.data.augment, "data.augment")
    for path, name in defaults["sections"].items():  # the method's own augmentation sections
        *parents, key = path.split(".")
        section = _attribute(cfg, parents)
        chosen = getattr(section, key) or _default(name, path, f"the {modality} modality has no augmentation for it")
        setattr(section, key, _resolve_component(AUGMENTATIONS, chosen, path))
        augments[path] = getattr(section, key)
    dataset_options = DATASETS.get(cfg.data.name, where="data").validate(cfg.data.options, where="data")
    cfg.data = DataConfig(**{**cfg.data.model_dump(exclude=set(cfg.data.options)), **dataset_options})
    _check_fits(cfg, defaults["serves"], modality, augments)
    return cfg


def _check_label_budget(data: DataConfig, task: type | None, task_name: str | None) -> None:
    """One way of choosing the labelled samples; labels per class only where a sample has one class."""
    if data.labels_per_class and data.labeled_samples:
        raise ConfigError(
            "data.labels_per_class and data.labeled_samples both choose the labelled samples; set one of them (the other to null)"
        )
    if data.labels_per_class and task is not None and task.target_kind != "class":
        raise ConfigError(
            f"data.labels_per_class: task '{task_name}' has no class per sample; set it to null and use data.labeled_samples "
            f"(a seeded subset of that many labelled samples) instead"
        )


def _default(name: str | None, where: str, missing: str) -> Component:
    """The default component of a section, or a one-line error when there is none to take."""
    if name is None:
        raise ConfigError(f"{where}.name: {missing}; name one")
    return Component(name=name)


def _resolve_model_from_weights(cfg: Config) -> None:
    """What a model takes from its weights when the config is resolved: its options (`resolve_options`; `hf`: the
    checkpoint folder's architecture) and data options (`resolve_data`; `hf`: the folder's tokenizer)."""
    entry = MODELS.get(cfg.model.name)
    resolve_options = entry.meta.get("resolve_options")
    if resolve_options is not None:
        options = resolve_options(cfg.model.options, cfg.model.weights)
        cfg.model = ModelConfig(name=cfg.model.name, weights=cfg.model.weights, **options)
    resolve_data = entry.meta.get("resolve_data")
    if resolve_data is not None:
        for key, value in resolve_data(cfg.data.options, cfg.model.weights).items():
            setattr(cfg.data, key, value)


def _attribute(obj: Any, path: list[str]) -> Any:
    for part in path:
        obj = getattr(obj, part)
    return obj


def _check_fits(cfg: Config, kind: str, modality: str, augments: dict[str, Component]) -> None:
    """The head and loss serve the method's (or task's) kind; the model and augmentations take the data's modality."""
    owner = f"task '{cfg.task.name}'" if cfg.task is not None else f"method '{cfg.method.name}'"
    for section, registry in (("loss", LOSSES), ("head", HEADS)):
        name = getattr(cfg, section).name
        if kind not in serves(registry.get(name)):
            fitting = [e.name for e in registry if kind in serves(e)]
            raise ConfigError(f"{section}.name: {registry.kind} '{name}' does not fit {owner}; use one of: {', '.join(fitting)}")
    from transferctl.modalities import fits_modality

    if not fits_modality(MODELS.get(cfg.model.name), modality):
        fitting = [e.name for e in MODELS if fits_modality(e, modality)]
        where = f"model.name: model '{cfg.model.name}' does not take {modality} data (data set '{cfg.data.name}')"
        raise ConfigError(f"{where}; use one of: {', '.join(fitting)}")
    for path, component in augments.items():
        if not fits_modality(AUGMENTATIONS.get(component.name), modality, default=None):
            fitting = [e.name for e in AUGMENTATIONS if fits_modality(e, modality, default=None)]
            raise ConfigError(f"{path}.name: augmentation '{component.name}' is not for {modality} data; use one of: {', '.join(fitting)}")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    command: str | None = None,
) -> Config:
    """Read `path` (over `base`, if given), apply overrides, validate and resolve."""
    overrides = list(overrides or [])
    data = copy.deepcopy(base or {})
    if path is not None:
        data = merge(data, read_yaml(path))
    data = _component_names(apply_overrides(data, overrides))
    source = str(path) if path is not None else "config"
    try:
        return resolve(data, command)
    except ConfigError as exc:
        raise ConfigError(_origin(str(exc), source, overrides)) from None


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
