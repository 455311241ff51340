"""Modalities: what each kind of data (images, audio, text) tells the rest of transferctl."""

from __future__ import annotations

from functools import cache

from transferctl.data.samples import Samples
from transferctl.modalities.audio import AudioData, AudioModality
from transferctl.modalities.base import Modality
from transferctl.modalities.image import ImageData, ImageModality
from transferctl.modalities.text import TextData, TextModality
from transferctl.registry import DATASETS, MODALITIES, Entry

DEFAULT_MODALITY = "image"  # of a data set that does not declare one (`DATASETS.register(modality=...)`)


@cache
def modality_named(name: str) -> Modality:
    return MODALITIES.build(name, {})


def modality_of(data: Samples) -> Modality:
    """The modality that reads `data`'s inputs."""
    return modality_named(data.modality)


def fits_modality(entry: Entry, modality: str, default: str | None = DEFAULT_MODALITY) -> bool:
    """Whether a registered model, data set or augmentation takes `modality`'s data: it declares one modality
    (`modality="image"`) or several (`modality=("audio", "text")`); None (the augmentations' default) fits all."""
    declared = entry.meta.get("modality", default)
    return declared is None or modality in ((declared,) if isinstance(declared, str) else tuple(declared))


def dataset_modality(dataset: str) -> str:
    """The modality a registered data set declares."""
    return DATASETS.get(dataset, where="data").meta.get("modality", DEFAULT_MODALITY)


__all__ = [
    "DEFAULT_MODALITY",
    "AudioData",
    "AudioModality",
    "ImageData",
    "ImageModality",
    "Modality",
    "TextData",
    "TextModality",
    "dataset_modality",
    "fits_modality",
    "modality_named",
    "modality_of",
]
