"""Data: the split contract (`Samples`), data sets per modality, splits and label subsets, augmentation, batch pipelines.

Two layers. Below `transferctl.modalities`: the contract (`samples`, `targets`) and the augmentations, which this
file imports. Above it: the data sets (`datasets`, `audio`, `speech`, `text`, `tagging`, `regression`,
`segmentation`, `detection`), which read their
splits into a modality's types (`ImageData`, ...) while every modality builds on `Samples`; imported here, they
would make `data` and `modalities` import each other. `load_datasets()` imports them (their decorators fill
DATASETS), and the data-set helpers below (`load_split`, ...) import them on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from transferctl.data import audio_augment, augment, text_augment  # noqa: F401  (registers)
from transferctl.data.augment import BatchAugment
from transferctl.data.samples import NO_LABEL, Batch, Samples, TargetKindName, batch_indices, iterate_batches, num_batches


def load_datasets() -> None:
    """Import the data-set modules: their decorators fill DATASETS."""
    from transferctl.data import audio, datasets, detection, regression, segmentation, speech, tagging, text  # noqa: F401  (registers)


_FROM_DATASETS = (  # transferctl.data.datasets' names, as `from transferctl.data import load_split` finds them
    "DATA_DIR_ENV",
    "data_root",
    "default_root",
    "load_split",
    "load_training_data",
    "load_unlabeled",
    "seeded_subset",
    "split_train_val",
    "stratified_subset",
)


def __getattr__(name: str) -> Any:
    if name in _FROM_DATASETS:
        return getattr(importlib.import_module("transferctl.data.datasets"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATA_DIR_ENV",
    "NO_LABEL",
    "Batch",
    "BatchAugment",
    "Samples",
    "TargetKindName",
    "batch_indices",
    "data_root",
    "default_root",
    "iterate_batches",
    "load_datasets",
    "load_split",
    "load_training_data",
    "load_unlabeled",
    "num_batches",
    "seeded_subset",
    "split_train_val",
    "stratified_subset",
]
