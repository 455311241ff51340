"""Plugins: user modules whose decorators add components (models, heads, losses, optimizers, schedulers,
data sets, augmentations) to the registries.

    transferctl --plugin my_models pretrain -c my.yaml          # a module on sys.path or in the current folder
    transferctl --plugin ./my_models.py pretrain -c my.yaml     # or a file

Installed packages can declare theirs in the `transferctl.plugins` entry-point group; those load
automatically, with the built-in components. Configs still name only registered components: a plugin is
code the user chose to run, never an import path inside a config.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from transferctl.errors import UsageError

ENTRY_POINT_GROUP = "transferctl.plugins"
_entry_points_loaded = False
_FILE_PLUGINS: dict[str, str] = {}  # private module name of a plugin file -> the file's stem, as users know it


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _import_file(path: Path) -> ModuleType:
    name = f"transferctl_plugin_{path.stem}_{abs(hash(str(path))):x}"  # never shadows an installed module
    _FILE_PLUGINS[name] = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so the components' __module__ names a loaded module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_plugin(ref: str) -> ModuleType:
    """Import one plugin: a dotted module name (the current folder is searched too) or a .py file."""
    from transferctl.components import load_components

    load_components()  # built-ins first: a plugin that reuses a built-in name is refused, not the built-in
    is_file = ref.endswith(".py") or os.sep in ref
    if is_file and not Path(ref).is_file():
        raise UsageError(f"--plugin {ref}: no such file")
    if not is_file and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # like `python -m`: a plugin beside the configs needs no install
    try:
        return _import_file(Path(ref).resolve()) if is_file else importlib.import_module(ref)
    except Exception as exc:
        raise UsageError(f"--plugin {ref}: cannot load it ({_reason(exc)}); check the name and that it imports on its own") from None


def load_plugins(refs: list[str]) -> None:
    for ref in refs:
        load_plugin(ref)


def load_entry_points() -> None:
    """Import every module declared in the `transferctl.plugins` entry-point group (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:
            package = f" of package {entry.dist.name}" if getattr(entry, "dist", None) else ""
            raise UsageError(
                f"plugin '{entry.name}'{package} (entry point {entry.value} in {ENTRY_POINT_GROUP}) cannot be loaded "
                f"({_reason(exc)}); fix or uninstall it"
            ) from None
    _entry_points_loaded = True


def origin(module: str) -> str:
    """'builtin' for transferctl's own components, else 'plugin:<module>'."""
    if module == "transferctl" or module.startswith("transferctl."):
        return "builtin"
    return f"plugin:{_FILE_PLUGINS.get(module, module)}"
