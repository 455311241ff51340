"""Data sets through torchvision, held-out splits, stratified label subsets, batching."""

from __future__ import annotations

import pytest
import torch

from transferctl.config import DataConfig
from transferctl.data import iterate_batches, load_split, load_training_data, split_train_val, stratified_subset
from transferctl.errors import UsageError


def test_mnist_idx_files_load_through_torchvision(digits_root):
    train = load_split(DataConfig(name="mnist", root=str(digits_root)), train=True)
    assert train.inputs.shape == (600, 1, 28, 28) and train.inputs.dtype == torch.uint8
    assert train.targets.shape == (600,) and train.num_classes == 10
    assert not train.hflip  # flipping a digit changes its meaning
    assert len(load_split(DataConfig(name="mnist", root=str(digits_root)), train=False)) == 200


def test_data_root_defaults_to_the_environment_variable(digits_root, monkeypatch):
    monkeypatch.setenv("TRANSFERCTL_DATA_DIR", str(digits_root))
    assert len(load_split(DataConfig(name="mnist"), train=True)) == 600


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path):
    with pytest.raises(UsageError) as info:
        load_split(DataConfig(name="fashion_mnist", root=str(tmp_path)), train=True)
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "data.root" in message and "TRANSFERCTL_DATA_DIR" in message


def test_shipped_sample_loads_offline():
    train = load_split(DataConfig(name="mnist_sample"), train=True)
    test = load_split(DataConfig(name="mnist_sample"), train=False)
    assert (len(train), len(test)) == (2500, 500)
    assert set(train.targets.tolist()) == set(range(10))


def test_split_is_disjoint_seeded_and_complete():
    train, val = split_train_val(100, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert torch.equal(split_train_val(100, 0.2, seed=3)[1], val)
    assert not torch.equal(split_train_val(100, 0.2, seed=4)[1], val)


def test_stratified_subset_is_balanced_and_reproducible():
    labels = torch.arange(10).repeat_interleave(30)
    subset = stratified_subset(labels, 7, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [7] * 10
    assert torch.equal(subset, stratified_subset(labels, 7, seed=0))
    assert not torch.equal(subset, stratified_subset(labels, 7, seed=1))


def test_labels_per_class_larger_than_a_class_is_a_usage_error():
    labels = torch.tensor([0] * 5 + [1] * 3)
    with pytest.raises(UsageError, match="labels_per_class=4 is larger than class 1's 3 training images"):
        stratified_subset(labels, 4, seed=0)


def test_training_data_never_overlaps_validation_and_subsets_only_train(digits_root):
    cfg = DataConfig(name="mnist", root=str(digits_root), labels_per_class=5, val_fraction=0.2, seed=0)
    train, val, _ = load_training_data(cfg, labelled_subset=True)
    assert len(train) == 50 and len(val) == 120
    assert torch.bincount(train.targets, minlength=10).tolist() == [5] * 10
    train_set = {bytes(img.numpy()) for img in train.inputs}
    assert train_set.isdisjoint({bytes(img.numpy()) for img in val.inputs})
    unlabelled = load_training_data(cfg, labelled_subset=False).train
    assert len(unlabelled) == 480


def test_batches_cover_every_image_once_per_epoch(digits_root):
    data = load_split(DataConfig(name="mnist", root=str(digits_root)), train=False)
    seen = torch.cat([labels for _, labels in iterate_batches(data, 64, order=torch.randperm(len(data)))])
    assert sorted(seen.tolist()) == sorted(data.targets.tolist())
    assert len(list(iterate_batches(data, 64, drop_last=True))) == 200 // 64


def test_image_folder_loads_your_own_images(tmp_path):
    from PIL import Image

    for split, per_class in (("train", 4), ("test", 2)):
        for cls, colour in (("cats", (250, 10, 10)), ("dogs", (10, 10, 250))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40 + i, 30), colour).save(folder / f"{i}.png")
    cfg = DataConfig(name="image_folder", root=str(tmp_path), image_size=16)
    train = load_split(cfg, train=True)
    assert train.inputs.shape == (8, 3, 16, 16) and train.classes == ("cats", "dogs")
    assert train.targets.tolist() == [0] * 4 + [1] * 4
    assert train.inputs[0, 0].float().mean() > 200 and train.inputs[-1, 2].float().mean() > 200
    grey = load_split(DataConfig(name="image_folder", root=str(tmp_path), image_size=16, channels=1), train=False)
    assert grey.inputs.shape == (4, 1, 16, 16)


def test_image_folder_decodes_once_and_notices_changed_files(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    for split in ("train", "test"):
        (folder / split / "a").mkdir(parents=True)
        Image.new("RGB", (20, 20), (200, 0, 0)).save(folder / split / "a" / "0.png")
    cfg = DataConfig(name="image_folder", root=str(folder), image_size=8)
    first = load_split(cfg, train=True)
    cached = list((tmp_path / "cache" / "transferctl" / "decoded").glob("*.pt"))
    assert len(cached) == 1
    assert torch.equal(load_split(cfg, train=True).inputs, first.inputs)  # read back from the cache
    Image.new("RGB", (20, 20), (0, 0, 200)).save(folder / "train" / "a" / "0.png")
    changed = load_split(cfg, train=True)
    assert changed.inputs[0, 2].float().mean() > 150  # decoded anew: now blue
    assert len(list((tmp_path / "cache" / "transferctl" / "decoded").glob("*.pt"))) == 2


def test_knn_weights_do_not_overflow_at_small_temperatures():
    from transferctl.engine import knn_accuracy
    from transferctl.modalities import ImageData

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 1, 4, 4, generator=generator) * 3
    labels = torch.arange(3).repeat_interleave(20)
    images = centres[labels] + torch.randn(60, 1, 4, 4, generator=generator) * 0.3
    pixels = ((images - images.min()) / (images.max() - images.min()) * 255).round().to(torch.uint8)
    data = ImageData(pixels, labels, ("a", "b", "c"), (0.0,), (1.0,), False)
    encoder = torch.nn.Flatten()
    for temperature in (0.07, 0.001):
        assert knn_accuracy(encoder, data, data, k=5, temperature=temperature, batch_size=16) == 1.0


def test_evaluation_reads_test_images_as_trained():
    from transferctl.build import as_trained
    from transferctl.checkpoints import Checkpoint
    from transferctl.modalities import ImageData, modality_named

    test = ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ("a", "b"), (0.9,), (0.9,), False)
    checkpoint = Checkpoint(config={}, model={}, data={"classes": ["a", "b"], "mean": [0.5], "std": [0.25]}, epoch=1, step=1)
    assert as_trained(test, checkpoint, modality_named("image"), "run").mean == (0.5,)
    checkpoint.data["classes"] = ["a", "c"]
    with pytest.raises(UsageError, match="differ from the trained classes"):
        as_trained(test, checkpoint, modality_named("image"), "run")
