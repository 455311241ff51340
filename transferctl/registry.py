"""One registry mechanism for every kind of component.

Components register themselves with a decorator; configs refer to them by name and pass their
keyword arguments. Arguments that a kind's builder supplies from context (the data set's channel
count, the number of classes, the model's parameters, ...) are not settable from a config; each registry
names them where it is made, below.

This module is a leaf, as timm's `_registry.py` is: it imports no component. Each package imports its own
modules (their decorators fill the registries), and `transferctl.components.load_components` imports the
packages, then the installed plugins.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic

from transferctl.errors import ConfigError, did_you_mean
from transferctl.plugins import origin


@dataclass
class Entry:
    name: str
    fn: Callable[..., Any]
    context: frozenset[str] = field(default_factory=frozenset)  # arguments the builder supplies, never a config (the registry's)
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = "builtin"  # or 'plugin:<module>' for a component a plugin registered

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n")[0]

    def options(self) -> dict[str, inspect.Parameter]:
        """The keyword arguments a config may set, with their defaults."""
        params = inspect.signature(self.fn, eval_str=True).parameters.values()
        return {p.name: p for p in params if p.name not in self.context and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def _schema(self) -> type[pydantic.BaseModel]:
        fields: dict[str, Any] = {}
        for name, p in self.options().items():
            annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[name] = (annotation, default)
        config = pydantic.ConfigDict(extra="forbid", strict=False, arbitrary_types_allowed=True)
        return pydantic.create_model(f"{self.name}_options", __config__=config, **fields)

    def validate(self, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
        """Check `kwargs` against the signature; return them with defaults filled in."""
        options = list(self.options())
        for key in kwargs:
            if key not in options:
                allowed = ", ".join(options) or "none"
                raise ConfigError(
                    f"{where}.{key}: unknown option for {where} '{self.name}'{did_you_mean(key, options)} (options: {allowed})"
                )
        try:
            model = self._schema().model_validate(kwargs)
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(part) for part in err["loc"])
            raise ConfigError(f"{where}.{key}: {err['msg']} (got {err.get('input')!r})") from None
        return model.model_dump()


class Registry:
    """Named components of one kind (models, losses, ...), filled by `@registry.register()`."""

    def __init__(self, kind: str, context: tuple[str, ...] = ()):
        self.kind = kind
        self.context = frozenset(context)  # every entry's: the arguments its builder supplies
        self._entries: dict[str, Entry] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._entries[key] = Entry(key, fn, self.context, meta, origin(fn.__module__))
            return fn

        return decorator

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def names_with(self, key: str, value: Any) -> list[str]:
        """The names whose registration says `key=value`, or `key=(..., value, ...)`: `MODELS.names_with("gives",
        "feature_maps")` are the encoders with stage feature maps."""

        def says(said: Any) -> bool:
            return said == value or (isinstance(said, tuple | list | set | frozenset) and value in said)

        return [e.name for e in self if says(e.meta.get(key))]

    def get(self, name: str, where: str | None = None) -> Entry:
        if name not in self._entries:
            names = self.names()
            prefix = f"{where}.name: " if where else ""
            raise ConfigError(f"{prefix}unknown {self.kind} '{name}'{did_you_mean(name, names)} (registered: {', '.join(names)})")
        return self._entries[name]

    def add_context(self, *names: str) -> None:
        """More arguments the builder supplies, for a plugin's modality whose context names others than the built-in
        ones (those are declared where each registry is made, below); every entry, registered or to come, gets them."""
        self.context = self.context | frozenset(names)
        for entry in self._entries.values():
            entry.context = self.context

    def build(self, name: str, options: dict[str, Any], **context: Any) -> Any:
        """Call the component with its config options plus the context it needs."""
        entry = self.get(name)
        wanted = inspect.signature(entry.fn).parameters
        return entry.fn(**options, **{k: v for k, v in context.items() if k in wanted})

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries[n] for n in self.names())


# Each kind names the arguments its builder supplies from context (data shape, parameters, ...), every modality's
# among them: a model's, a head's and an augmentation's come from the data's modality (`Modality.model_context`,
# `head_context`, `augment_context`).
METHODS = Registry("method", context=("task",))
TASKS = Registry("task")
MODALITIES = Registry("modality")
MODELS = Registry(
    "model",
    context=(
        *("in_channels", "image_size"),  # images
        "sequence_features",  # audio: the mel bins, for an encoder over frames (gru, conv1d)
        *("vocab_size", "pad_id", "max_length", "vocabulary"),  # text: a model over token ids
    ),
)
HEADS = Registry(
    "head",
    context=(
        *("feature_dim", "num_outputs", "stage_channels", "stage_shapes", "sample_shape"),
        *("vocab_size", "word_embedding"),  # text: a head that predicts tokens (masked language modelling; tied to the table)
        "pad_id",  # text: which tokens are padding (a tagger's CRF runs over the real ones)
    ),
)
# the head it trains (a CRF's transitions, which score whole tag sequences); the training split's count of each class
LOSSES = Registry("loss", context=("head", "class_counts"))
TRACKERS = Registry("tracker")  # experiment trackers a run reports to (`train.loggers`)
OPTIMIZERS = Registry("optimizer", context=("params",))
SCHEDULERS = Registry("scheduler", context=("optimizer", "total_steps"))
# a data set may also take the target kind its task trains on (`target_kind`: masks, boxes or the digits of a scene from
# one composition) and, when it registers `validation=True`, give its own validation split (`validation`)
DATASETS = Registry("dataset", context=("root", "download", "train", "fitted", "stream", "target_kind", "validation"))
AUGMENTATIONS = Registry("augmentation", context=("hflip_default", "clip_samples", "special_ids"))  # of images, audio, text
TARGET_KINDS = Registry("target kind")

REGISTRIES: dict[str, Registry] = {
    "methods": METHODS,
    "tasks": TASKS,
    "modalities": MODALITIES,
    "models": MODELS,
    "heads": HEADS,
    "losses": LOSSES,
    "optimizers": OPTIMIZERS,
    "schedulers": SCHEDULERS,
    "datasets": DATASETS,
    "augmentations": AUGMENTATIONS,
    "target_kinds": TARGET_KINDS,
    "trackers": TRACKERS,
}


def serves(entry: Entry) -> tuple[str, ...]:
    """The kinds of objective a head or loss serves (`register(serves=("classification",))`): a method or task
    names the one it needs, so `mse` can serve regression and reconstruction alike."""
    return tuple(entry.meta.get("serves", ()))
