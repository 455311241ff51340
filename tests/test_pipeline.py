"""The memory and loader pipelines: same images, same order, seeded, resumable; both train."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from transferctl.components import load_components
from transferctl.config import DataConfig
from transferctl.data import load_split
from transferctl.data.augment import BatchAugment, simclr
from transferctl.data.pipeline import LoaderPipeline, MemoryPipeline, make_pipeline
from transferctl.errors import ConfigError
from transferctl.modalities import modality_named

IMAGE = modality_named("image")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from tests.conftest import make_mnist_root

    root = make_mnist_root(tmp_path_factory.mktemp("pipe"), 150, 10)
    return load_split(DataConfig(name="mnist", root=str(root)), train=True)


def pipelines(data, augment, **kw):
    common = dict(views=1, batch_size=32, seed=3, drop_last=False) | kw
    memory = MemoryPipeline(data, augment, IMAGE, **common)
    loader = LoaderPipeline(data, augment, IMAGE, device=torch.device("cpu"), num_workers=0, **common)
    return memory, loader


def test_both_pipelines_visit_the_same_images_in_the_same_order(digits):
    memory, loader = pipelines(digits, BatchAugment())
    for epoch in (0, 1):
        from_memory = list(memory.batches(epoch))
        from_loader = list(loader.batches(epoch))
        assert len(from_memory) == len(from_loader) == 5
        for m, b in zip(from_memory, from_loader, strict=True):
            assert torch.equal(m.targets, b.targets) and torch.equal(m.extras["index"], b.extras["index"])
            assert torch.allclose(m.inputs[0], b.inputs[0], atol=1e-6)
            assert torch.equal(m.targets, digits.targets[m.extras["index"]])  # the index names the samples
    first, second = (torch.cat([b.extras["index"] for b in memory.batches(e)]) for e in (0, 1))
    assert not torch.equal(first, second)  # a new order every epoch
    assert sorted(first.tolist()) == list(range(len(digits)))  # every image once


def test_loader_augmentation_is_seeded_per_image_and_resumable(digits):
    augment = simclr(hflip_default=False)
    _, loader = pipelines(digits, augment, views=2)
    full = list(loader.batches(epoch=1))
    again = list(loader.batches(epoch=1))
    tail = list(loader.batches(epoch=1, start_batch=3))
    assert torch.equal(full[0].inputs[0], again[0].inputs[0])
    assert not torch.equal(full[0].inputs[0], full[0].inputs[1])  # two different views of each image
    assert len(tail) == 2 and torch.equal(tail[0].inputs[1], full[3].inputs[1])


def test_memory_augmentation_state_restores(digits):
    memory, _ = pipelines(digits, simclr(hflip_default=False), views=2)
    state = memory.state()
    first = next(memory.batches(0)).inputs[0]
    memory.restore(state)
    assert torch.equal(next(memory.batches(0)).inputs[0], first)


def test_auto_picks_memory_within_the_budget_and_the_loader_beyond_it(digits):
    from dataclasses import replace

    common = dict(views=1, batch_size=32, seed=0, drop_last=False, device=torch.device("cpu"), num_workers=0, channels_last=False)
    assert isinstance(make_pipeline(digits, BatchAugment(), IMAGE, kind="auto", budget_mb=1, **common), MemoryPipeline)
    big = replace(digits, inputs=torch.zeros(3000, 1, 28, 28, dtype=torch.uint8), targets=torch.zeros(3000, dtype=torch.long))
    assert isinstance(make_pipeline(big, BatchAugment(), IMAGE, kind="auto", budget_mb=1, **common), LoaderPipeline)
    assert isinstance(make_pipeline(big, BatchAugment(), IMAGE, kind="memory", budget_mb=1, **common), MemoryPipeline)
    # a split past the budget goes to the loader, which does not cut batches: grouping them is refused there
    with pytest.raises(ConfigError, match=r"data\.group_by_length: .* the loader pipeline; set data\.pipeline=memory"):
        make_pipeline(big, BatchAugment(), IMAGE, kind="auto", budget_mb=1, by_length=True, **common)


def test_the_torchvision_twin_of_the_batched_augmentation():
    from torchvision.transforms import v2

    assert isinstance(BatchAugment().torchvision_transform(28, 1), v2.Identity)
    names = [type(t).__name__ for t in simclr(hflip_default=True, blur_p=0.5).torchvision_transform(32, 3).transforms]
    assert names == ["RandomResizedCrop", "RandomAffine", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale", "RandomApply"]


@pytest.mark.parametrize("pipeline", ["memory", "loader"])
def test_a_short_pretraining_lowers_the_loss_on_each_pipeline(cli, simclr_config, tmp_path, pipeline):
    result = cli(
        "pretrain",
        "-c",
        simclr_config,
        f"data.pipeline={pipeline}",
        "data.num_workers=1",
        "train.epochs=4",
        "--runs-dir",
        tmp_path / "runs",
        "--json",
    )
    assert result.code == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "runs" / result.json["run_id"] / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.1
    assert f"pipeline {pipeline.capitalize()}Pipeline" in (tmp_path / "runs" / result.json["run_id"] / "log.txt").read_text()


def test_bf16_autocast_trains_on_cpu_and_float16_needs_cuda(cli, simclr_config, tmp_path):
    result = cli("pretrain", "-c", simclr_config, "train.precision=bf16", "train.epochs=3", "--runs-dir", tmp_path / "runs", "--json")
    assert result.code == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "runs" / result.json["run_id"] / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    if not torch.cuda.is_available():
        refused = cli("pretrain", "-c", simclr_config, "train.precision=16", "--runs-dir", tmp_path / "runs")
        assert refused.code == 2 and "needs CUDA" in refused.stderr


def test_a_loader_run_leaves_the_process_thread_count_alone(cli, simclr_config, tmp_path):
    before = torch.get_num_threads()
    result = cli(
        "pretrain", "-c", simclr_config, "data.pipeline=loader", "data.num_workers=1", "train.max_steps=2", "--runs-dir", tmp_path / "runs"
    )
    assert result.code == 0, result.stderr
    assert torch.get_num_threads() == before


def test_glibc_is_set_up_to_reuse_freed_memory_only_when_asked(monkeypatch):
    """TRANSFERCTL_GLIBC_TUNING=1 raises glibc's mmap threshold for CPU training (activations reused between steps)."""
    import ctypes.util
    import platform

    from transferctl import allocator

    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("TRANSFERCTL_GLIBC_TUNING", "0")
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.delenv("TRANSFERCTL_GLIBC_TUNING")
    assert allocator.keep_freed_memory() is False  # the default: glibc's own settings
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("TRANSFERCTL_GLIBC_TUNING", "1")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c") is not None
    assert allocator.keep_freed_memory() is glibc


def test_a_contrastive_method_gets_two_views_of_each_scene_whose_targets_are_masks(digits_root):
    # mnist_scenes gives masks by default, which move with a single view; SimCLR's two views must both be drawn (one
    # view would be chunked into two halves of different scenes as its "pairs", a loss nothing can lower)
    load_components()
    scenes = load_split(DataConfig(name="mnist_scenes", root=str(digits_root), train_scenes=40, test_scenes=10), True)
    assert scenes.target_kind == "class_per_pixel"
    (batch,) = MemoryPipeline(scenes, simclr(hflip_default=False), IMAGE, views=2, batch_size=40, seed=0, drop_last=True).batches(0)
    assert len(batch.inputs) == 2 and batch.inputs[0].shape == batch.inputs[1].shape == (40, 1, 64, 64)
    assert not torch.equal(batch.inputs[0], batch.inputs[1])
    # a scene's two views are alike: coarsely pooled, each is closer to its pair than to most other scenes' views
    pooled = [F.normalize(F.avg_pool2d(view, 8).flatten(1), dim=1) for view in batch.inputs]
    similarity = pooled[0] @ pooled[1].T
    assert (similarity.diag() > similarity.median(1).values).float().mean() > 0.7
    (single,) = MemoryPipeline(scenes, BatchAugment(), IMAGE, views=1, batch_size=40, seed=0, drop_last=True).batches(0)
    assert len(single.inputs) == 1 and single.targets.shape == (40, 64, 64)  # one view: its masks moved with it
    loader = LoaderPipeline(
        scenes,
        simclr(hflip_default=False),
        IMAGE,
        device=torch.device("cpu"),
        num_workers=0,
        views=2,
        batch_size=40,
        seed=0,
        drop_last=True,
    )  # the loader serves them too; one view it refuses (test_segmentation)
    assert len(next(iter(loader.batches(0))).inputs) == 2
