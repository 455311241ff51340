"""One registry mechanism for every kind of component.

Components register themselves with a decorator; configs refer to them by name and pass their
keyword arguments. Arguments that a kind's builder supplies from context (the data set's channel
count, the number of classes, the model's parameters, ...) are not settable from a config.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic

from transferctl.errors import ConfigError
from transferctl.plugins import load_entry_points, origin


def did_you_mean(word: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


@dataclass
class Entry:
    name: str
    fn: Callable[..., Any]
    context: set[str] = field(default_factory=set)  # arguments the builder supplies, never a config (the registry's set)
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
        self.context = set(context)  # shared with every entry, so a context name added later applies to all
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

    def get(self, name: str, where: str | None = None) -> Entry:
        if name not in self._entries:
            names = self.names()
            prefix = f"{where}.name: " if where else ""
            raise ConfigError(f"{prefix}unknown {self.kind} '{name}'{did_you_mean(name, names)} (registered: {', '.join(names)})")
        return self._entries[name]

    def add_context(self, *names: str) -> None:
        """More arguments the builder supplies (a modality's model context: images give in_channels and image_size)."""
        self.context.update(names)

    def build(self, name: str, options: dict[str, Any], **context: Any) -> Any:
        """Call the component with its config options plus the context it needs."""
        entry = self.get(name)
        wanted = inspect.signature(entry.fn).parameters
        return entry.fn(**options, **{k: v for k, v in context.items() if k in wanted})

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries[n] for n in self.names())


# Each kind names the arguments its builder supplies from context (data shape, parameters, ...); a modality adds
# the context of its data to MODELS and AUGMENTATIONS (images: in_channels, image_size; hflip_default).
METHODS = Registry("method", context=("task",))
TASKS = Registry("task")
MODALITIES = Registry("modality")
MODELS = Registry("model")
HEADS = Registry("head", context=("feature_dim", "num_outputs", "stage_channels", "stage_shapes", "sample_shape"))
LOSSES = Registry("loss")
OPTIMIZERS = Registry("optimizer", context=("params",))
SCHEDULERS = Registry("scheduler", context=("optimizer", "total_steps"))
DATASETS = Registry("dataset", context=("root", "download", "train", "fitted", "stream"))
AUGMENTATIONS = Registry("augmentation")

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
}


def serves(entry: Entry) -> tuple[str, ...]:
    """The kinds of objective a head or loss serves (`register(serves=("classification",))`): a method or task
    names the one it needs, so `mse` can serve regression and reconstruction alike."""
    return tuple(entry.meta.get("serves", ()))


def load_components() -> None:
    """Import the modules whose decorators fill the registries, then the installed plugins' (entry points)."""
    import transferctl.data.audio
    import transferctl.data.audio_augment
    import transferctl.data.augment
    import transferctl.data.datasets
    import transferctl.data.regression
    import transferctl.data.segmentation
    import transferctl.data.text
    import transferctl.data.text_augment
    import transferctl.losses
    import transferctl.methods
    import transferctl.modalities
    import transferctl.models
    import transferctl.optim
    import transferctl.tasks  # noqa: F401

    load_entry_points()
