"""Data sets (torchvision-backed, held in memory), splits, label subsets and batched augmentation."""

from transferctl.data.augment import BatchAugment, model_input, normalize, to_unit
from transferctl.data.datasets import (
    DATA_DIR_ENV,
    ImageData,
    data_root,
    default_root,
    iterate_batches,
    num_batches,
    load_split,
    load_training_data,
    load_unlabeled,
    NO_LABEL,
    split_train_val,
    stratified_subset,
)

__all__ = [
    "BatchAugment",
    "DATA_DIR_ENV",
    "ImageData",
    "data_root",
    "default_root",
    "iterate_batches",
    "load_split",
    "load_training_data",
    "load_unlabeled",
    "NO_LABEL",
    "model_input",
    "to_unit",
    "normalize",
    "num_batches",
    "split_train_val",
    "stratified_subset",
]
