"""What fills the registries: the built-in components, then the installed plugins' (entry points).

`registry.py` is a leaf that imports no component, and each package lists its own modules (its `__init__` imports
them, so importing the package registers them; the data sets load through `transferctl.data.load_datasets`).
This is the one place that names the packages.
"""

from __future__ import annotations

from transferctl.plugins import load_entry_points


def load_components() -> None:
    """Import the built-in component packages, whose decorators fill the registries, then the installed plugins."""
    import transferctl.data  # importing a package registers its modules
    import transferctl.losses
    import transferctl.methods
    import transferctl.modalities
    import transferctl.models
    import transferctl.optim
    import transferctl.tasks
    import transferctl.trackers

    transferctl.data.load_datasets()
    load_entry_points()
