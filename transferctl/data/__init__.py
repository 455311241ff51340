"""Data: the split contract (`Samples`), data sets per modality, splits and label subsets, augmentation, batch pipelines."""

from transferctl.data.samples import NO_LABEL, Batch, Samples, TargetKind, batch_indices, iterate_batches, num_batches  # noqa: I001  (first: the rest builds on it)
from transferctl.data.augment import BatchAugment
from transferctl.data.datasets import (
    DATA_DIR_ENV,
    data_root,
    default_root,
    load_split,
    load_training_data,
    load_unlabeled,
    seeded_subset,
    split_train_val,
    stratified_subset,
)

__all__ = [
    "DATA_DIR_ENV",
    "NO_LABEL",
    "Batch",
    "BatchAugment",
    "Samples",
    "TargetKind",
    "batch_indices",
    "data_root",
    "default_root",
    "iterate_batches",
    "load_split",
    "load_training_data",
    "load_unlabeled",
    "num_batches",
    "seeded_subset",
    "split_train_val",
    "stratified_subset",
]
