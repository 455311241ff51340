"""Modalities: what each kind of data (images; audio and text next) tells the rest of transferctl."""

from __future__ import annotations

from functools import cache

from transferctl.data.samples import Samples
from transferctl.modalities.base import Modality
from transferctl.modalities.image import ImageData, ImageModality
from transferctl.registry import DATASETS, MODALITIES

DEFAULT_MODALITY = "image"  # of a data set that does not declare one (`DATASETS.register(modality=...)`)


@cache
def modality_named(name: str) -> Modality:
    return MODALITIES.build(name, {})


def modality_of(data: Samples) -> Modality:
    """The modality that reads `data`'s inputs."""
    return modality_named(data.modality)


def dataset_modality(dataset: str) -> str:
    """The modality a registered data set declares."""
    return DATASETS.get(dataset, where="data").meta.get("modality", DEFAULT_MODALITY)


__all__ = ["DEFAULT_MODALITY", "ImageData", "ImageModality", "Modality", "dataset_modality", "modality_named", "modality_of"]
