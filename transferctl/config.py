"""A config resolved against the registries: `load_config` and what it fills in.

Data flows one way: YAML (+ overrides) -> `load_config` -> a validated, fully resolved `Config` whose every
component section names a registered component with all its options filled in: the method's, task's and
modality's defaults, each component's options checked against its signature. The schema, YAML loading and
overrides themselves are `transferctl.schema` (which asks no registry); everything there is importable from here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pydantic

from transferctl.components import load_components
from transferctl.errors import ConfigError
from transferctl.registry import AUGMENTATIONS, DATASETS, HEADS, LOSSES, METHODS, MODELS, OPTIMIZERS, SCHEDULERS, TASKS, Registry, serves
from transferctl.schema import (
    DEVICE_PATTERN,
    OVERRIDE_KEY,
    SHORTHAND_SECTIONS,
    TASKS_OF_0_1_METHODS,
    Component,
    Config,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    ModelConfig,
    Seed,
    TrainConfig,
    UnlabeledConfig,
    apply_overrides,
    component_name,
    flatten,
    merge,
    parse_override,
    pydantic_message,
    read_yaml,
    stored_task,
    value_at,
    with_origin,
)

__all__ = [
    "DEVICE_PATTERN",
    "OVERRIDE_KEY",
    "SHORTHAND_SECTIONS",
    "TASKS_OF_0_1_METHODS",
    "Component",
    "Config",
    "DataConfig",
    "EvalConfig",
    "FinetuneConfig",
    "ModelConfig",
    "Seed",
    "TrainConfig",
    "UnlabeledConfig",
    "apply_overrides",
    "component_name",
    "flatten",
    "load_config",
    "merge",
    "parse_override",
    "read_yaml",
    "resolve",
    "stored_task",
    "value_at",
]


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
        section = value_at(data, *path.split("."))
        if isinstance(section, dict) and "name" not in section and name:
            section["name"] = name
    return data


def _defaults_for(data: dict[str, Any]) -> dict[str, Any]:
    """The default components of the raw config's method, task and data set; {} while any is unknown
    (`resolve` then says which)."""
    load_components()
    method, dataset = component_name(data.get("method")), value_at(data, "data", "name")
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
        raise ConfigError(pydantic_message(exc.errors()[0])) from None
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
    _check_grouping(cfg.data, modality)
    owner = f"task '{cfg.task.name}'" if cfg.task is not None else f"method '{cfg.method.name}'"
    cfg.head = cfg.head or _default(defaults["head"], "head", f"{owner} has no default head")
    cfg.loss = cfg.loss or _default(defaults["loss"], "loss", f"{owner} has no default loss")
    augment_missing = f"the {modality} modality has no '{method.augmentation}' augmentation for method '{cfg.method.name}'"
    cfg.data.augment = cfg.data.augment or _default(defaults["augment"], "data.augment", augment_missing)

    cfg.method = _resolve_component(METHODS, cfg.method, "method")
    if cfg.task is not None:
        cfg.task = _resolve_component(TASKS, _with_data_defaults(cfg.task, cfg.data.name), "task")
    cfg.model = ModelConfig(weights=cfg.model.weights, **_resolve_component(MODELS, cfg.model, "model").model_dump())
    if cfg.model.weights and cfg.finetune.source:
        raise ConfigError("model.weights: a fine-tune --from RUN takes its encoder from RUN; drop model.weights (or --from)")
    _resolve_model_from_weights(cfg)
    _resolve_data_from_components(cfg, modality, task)
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


def _with_data_defaults(task: Component, dataset: str) -> Component:
    """The task's options, with those the config leaves unset that the data set's registration chooses
    (`task_defaults`: fsdd_sequences transcribes in words) where the task takes them."""
    chosen = DATASETS.get(dataset, where="data").meta.get("task_defaults", {})
    takes = TASKS.get(task.name, where="task").options()
    extra = {k: v for k, v in chosen.items() if k in takes and k not in task.options}
    return Component(name=task.name, **task.options, **extra) if extra else task


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
    balancing = {"data.imbalance": data.imbalance is not None, "data.sampler": data.sampler == "balanced"}
    for key in (k for k, asked in balancing.items() if asked):
        if data.labels_per_class:
            raise ConfigError(f"{key}: data.labels_per_class already gives every class the same count; set one of them")
        if data.pipeline == "stream":
            raise ConfigError(f"{key}: it draws from the whole split, which data.pipeline=stream does not hold; use another pipeline")
        if task is not None and task.target_kind != "class":
            raise ConfigError(f"{key}: task '{task_name}' has no class per sample to balance; drop it")


def _check_grouping(data: DataConfig, modality: str) -> None:
    """Batches grouped by length need samples that vary in length, held in memory (where batches are cut)."""
    from transferctl.modalities import modality_named

    if not data.group_by_length:
        return
    if not modality_named(modality).samples_vary_in_length:
        raise ConfigError(f"data.group_by_length: {modality} samples are all one size, with no lengths to group by; drop it")
    if data.pipeline in ("loader", "stream"):
        raise ConfigError("data.group_by_length: batches are grouped and cut in the memory pipeline; set data.pipeline=memory or drop it")


def _default(name: str | None, where: str, missing: str) -> Component:
    """The default component of a section, or a one-line error when there is none to take."""
    if name is None:
        raise ConfigError(f"{where}.name: {missing}; name one")
    return Component(name=name)


def _resolve_model_from_weights(cfg: Config) -> None:
    """What a model takes from its weights when the config is resolved: its options (`resolve_options`; `hf`: the
    checkpoint folder's architecture) and the data options it implies where the data set takes them (`resolve_data`;
    `hf`: the folder's tokenizer; `timm`: the size images are decoded at)."""
    entry = MODELS.get(cfg.model.name)
    resolve_options = entry.meta.get("resolve_options")
    if resolve_options is not None:
        options = resolve_options(cfg.model.options, cfg.model.weights)
        cfg.model = ModelConfig(name=cfg.model.name, weights=cfg.model.weights, **options)
    resolve_data = entry.meta.get("resolve_data")
    if resolve_data is not None:
        takes = DATASETS.get(cfg.data.name, where="data").options()
        for key, value in resolve_data(cfg.data.options, cfg.model.weights, cfg.model.options).items():
            if key in takes:
                setattr(cfg.data, key, value)


def _resolve_data_from_components(cfg: Config, modality: str, task: type | None) -> None:
    """The data options that follow the model (its registration meta) and the task unless the config sets them, as the
    data's modality says (`Modality.resolve_data`; audio: the front end a model takes, whole recordings for a task
    of inputs of any length)."""
    from transferctl.modalities import modality_named

    takes = DATASETS.get(cfg.data.name, where="data").options()  # a plugin data set may take none of them
    for key, value in modality_named(modality).resolve_data(cfg.data.options, MODELS.get(cfg.model.name), task).items():
        if key in takes:
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
    of_options = MODELS.get(cfg.model.name).meta.get("modality_of_options")  # hf: its checkpoint's model class says
    takes = of_options(cfg.model.options) if of_options is not None else None
    if takes is not None and takes != modality:
        raise ConfigError(
            f"model.weights {cfg.model.weights}: the checkpoint reads {takes} data, and data set '{cfg.data.name}' holds {modality} "
            f"data; give a checkpoint of a model for {modality} data"
        )
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
    data, note = _without_foreign_data_options(data, apply_overrides(data, overrides), overrides)
    data = _component_names(data)
    source = str(path) if path is not None else "config"
    try:
        cfg = resolve(data, command)
    except ConfigError as exc:
        raise ConfigError(with_origin(str(exc), source, overrides)) from None
    cfg.notes.extend([note] if note else [])
    return cfg


def _without_foreign_data_options(written: dict[str, Any], data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], str | None]:
    """A recipe pointed at another data set on the command line (`data.name=audio_folder`) drops the options its
    file (or source run) set for its own data set that the new one does not take, with a note; options given on the
    command line stay, for `resolve` to check strictly."""
    load_components()
    before, after = value_at(written, "data", "name"), value_at(data, "data", "name")
    if not isinstance(after, str) or after == before or after not in DATASETS:
        return data, None
    given = {path[1] for path, _ in map(parse_override, overrides) if len(path) > 1 and path[0] == "data"}
    takes = set(DataConfig.model_fields) | set(DATASETS.get(after).options()) | given
    dropped = [key for key in data["data"] if key not in takes]
    if not dropped:
        return data, None
    data["data"] = {k: v for k, v in data["data"].items() if k not in dropped}
    options = ", ".join(f"data.{key}" for key in dropped)
    return data, f"{options}: set for data set '{before}', which '{after}' does not take; dropped"
