"""Where `load_safetensors` (documented: rebuild an exported model from its .safetensors file alone) and the export
recipe were first published; the recipe lives in `transferctl/recipes/export.py` beside the other verbs'."""

from transferctl.recipes.export import ExportResult, export_run, load_safetensors

__all__ = ["ExportResult", "export_run", "load_safetensors"]
