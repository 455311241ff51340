"""Streamed image data: folders and tar shards read batch by batch, the same views as the memory pipeline,
every sample once per epoch over ranks, exact resume without reading skipped samples, bad samples, `data pack`,
and evaluation sharded over two Gloo processes."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from tests.conftest import read_sample, write_config
from tests.test_distributed import free_port
from tests.test_resume import final_state
from transferctl.config import DataConfig
from transferctl.data import shards as shards_module
from transferctl.data import stream
from transferctl.data.datasets import load_split
from transferctl.data.pipeline import StreamPipeline, make_pipeline
from transferctl.data.samples import iterate_batches
from transferctl.data.shards import pack
from transferctl.data.stream import is_streamed
from transferctl.errors import ConfigError, UsageError
from transferctl.modalities import modality_of
from transferctl.registry import AUGMENTATIONS

CLASSES = ("d0", "d1", "d2")  # sorted, as a folder lists them


def digit_folder(root: Path, per_class: int = 16, test_per_class: int = 4) -> Path:
    """Real MNIST digits of three classes as PNG and JPEG files in <root>/{train,test}/<class>/."""
    images, labels = read_sample("train")
    for split, count, offset in (("train", per_class, 0), ("test", test_per_class, 200)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            members = (labels == label).nonzero()[0][offset : offset + count]
            for i, index in enumerate(members):
                Image.fromarray(images[index]).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return digit_folder(tmp_path / "digits")


def split(root: Path, pipeline: str, train: bool = True, name: str = "image_folder", **options):
    return load_split(DataConfig(name=name, root=str(root), image_size=16, channels=1, pipeline=pipeline, num_workers=0, **options), train)


def pipelines(memory, streamed, **overrides):
    augment = AUGMENTATIONS.build("simclr", {}, hflip_default=False)
    kw = dict(views=2, batch_size=8, seed=3, drop_last=True, device=torch.device("cpu"), num_workers=0, budget_mb=64, channels_last=False)
    kw.update(overrides)
    modality = modality_of(memory)
    return make_pipeline(memory, augment, modality, kind="memory", **kw), make_pipeline(streamed, augment, modality, kind="stream", **kw)


def test_stream_and_memory_give_the_same_images_labels_and_views(folder):
    memory, streamed = split(folder, "memory"), split(folder, "stream")
    assert is_streamed(streamed) and not is_streamed(memory)
    assert torch.equal(streamed.inputs[:], memory.inputs) and torch.equal(streamed.targets, memory.targets)
    assert (streamed.classes, streamed.mean, streamed.std) == (memory.classes, memory.mean, memory.std)
    by_memory, by_stream = pipelines(memory, streamed)
    assert isinstance(by_stream, StreamPipeline)
    for epoch in (0, 1):
        batches = list(zip(by_memory.batches(epoch), by_stream.batches(epoch), strict=True))
        assert len(batches) == len(memory) // 8
        for a, b in batches:
            assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs, strict=True))
            assert torch.equal(a.targets, b.targets) and torch.equal(a.extras["index"], b.extras["index"])


def shard_keys(root: Path, split_name: str = "train") -> torch.Tensor:
    """Each shard sample's place in the folder's listing, in shard order (the manifest's keys)."""
    manifest = json.loads((root / "manifest.json").read_text())
    return torch.tensor([key for shard in manifest["splits"][split_name]["shards"] for key in shard["keys"]])


def test_shards_hold_the_folder_shuffled_and_stream_it_shard_by_shard(folder, tmp_path):
    packed = pack(folder, tmp_path / "shards", shard_size=10)
    assert (packed.images, packed.shards) == (60, 5 + 2)
    memory = split(folder, "memory")
    in_memory = split(tmp_path / "shards", "memory", name="shards")
    keys = shard_keys(tmp_path / "shards")
    assert sorted(keys.tolist()) == list(range(48)) and keys.tolist() != list(range(48))  # shuffled before sharding
    assert torch.equal(in_memory.inputs, memory.inputs[keys]) and torch.equal(in_memory.targets, memory.targets[keys])
    assert in_memory.classes == CLASSES
    streamed = split(tmp_path / "shards", "stream", name="shards", shuffle_buffer=10)
    assert torch.equal(streamed.inputs[:], in_memory.inputs)
    order = streamed.inputs.epoch_order(seed=0, epoch=0)
    shard_of = streamed.inputs.source.shard_of[order]
    assert sorted(order.tolist()) == list(range(48))
    # shards one after another (a window of 10 spans at most two), shuffled within each window
    assert all(len(set(window.tolist())) <= 2 for window in shard_of.split(10))
    assert any(not torch.equal(window, window.sort().values) for window in order.split(10))
    assert not torch.equal(order, streamed.inputs.epoch_order(seed=0, epoch=1))
    assert all(len(set(streamed.targets[batch].tolist())) >= 2 for batch in order.split(8))  # batches mix classes
    pattern = str(tmp_path / "shards" / "test-{000000..000001}.tar")
    assert len(split(tmp_path, "stream", train=False, name="shards", test_urls=pattern)) == 12


def test_every_rank_reads_its_own_slice_and_two_ranks_augment_as_one(folder):
    memory, streamed = split(folder, "memory"), split(folder, "stream")
    one = pipelines(memory, streamed)[1]
    ranks = [pipelines(memory, streamed, rank=r, world=2)[1] for r in (0, 1)]
    stream.DECODES["count"] = 0
    for whole, *halves in zip(one.batches(0), *(r.batches(0) for r in ranks), strict=True):
        for view in range(2):
            assert torch.equal(whole.inputs[view], torch.cat([h.inputs[view] for h in halves]))
    assert stream.DECODES["count"] == 2 * 48  # the single process and the two ranks together: each sample once
    seen = torch.cat([b.extras["index"] for r in ranks for b in r.batches(1)])
    assert sorted(seen.tolist()) == list(range(48))  # an epoch covers the split exactly once over the ranks


def test_workers_read_each_batch_once_and_in_order(folder):
    streamed = split(folder, "stream")
    batches = list(torch.arange(len(streamed)).split(7))
    reads = list(streamed.inputs.iterate(batches, num_workers=2))
    assert torch.equal(torch.cat([r.images for r in reads]), streamed.inputs[:])
    assert sum(r.decoded for r in reads) == len(streamed)  # decoded in the workers, each sample once


STREAMED_FINETUNE = """\
method: finetune
model: {{name: cnn, widths: [8, 16]}}
head: {{name: linear, dropout: 0.5}}
scheduler: {{name: constant}}
data: {{name: image_folder, root: {root}, image_size: 16, channels: 1, batch_size: 8, val_fraction: 0.0, labels_per_class: 16,
        pipeline: stream, num_workers: 0}}
train: {{device: cpu, epochs: 10}}
"""


def test_a_stopped_stream_run_resumes_bit_exactly_without_reading_what_it_skipped(folder, tmp_path):
    """48 images, batch 8: 6 steps an epoch. Stopped at step 9 (inside epoch 2) and extended to 14, it must
    equal a 14-step run, and the two parts together decode exactly what the whole run decodes."""
    from transferctl.recipes import finetune, resume

    config = write_config(tmp_path / "ft.yaml", STREAMED_FINETUNE.format(root=folder / ""))
    split(folder, "stream")  # the manifest and statistics, measured once

    def decodes(job) -> tuple[Path, int]:
        stream.DECODES["count"] = 0
        run_dir = job()
        return run_dir, stream.DECODES["count"]

    whole, whole_reads = decodes(lambda: finetune(None, config, ["train.max_steps=14"], runs_dir=tmp_path / "whole").run_dir)
    part, first_reads = decodes(lambda: finetune(None, config, ["train.max_steps=9"], runs_dir=tmp_path / "part").run_dir)
    assert final_state(part)["position"]["batch_in_epoch"] == 3
    _, resumed_reads = decodes(lambda: resume(str(part), ["train.max_steps=14"], command="finetune", runs_dir=tmp_path / "part"))
    assert first_reads + resumed_reads == whole_reads == 14 * 8
    a, b = final_state(whole), final_state(part)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_killed_stream_run_with_workers_resumes_bit_exactly(folder, tmp_path):
    """SIGKILL after the first checkpoint (every 2 steps, inside epoch 2), then --resume: the weights of a run
    left alone, bit for bit, with the default 2 workers reading."""
    from tests.test_resume import killed_and_resumed

    config = write_config(tmp_path / "ft.yaml", STREAMED_FINETUNE.format(root=folder).replace("num_workers: 0", "num_workers: 2"))
    whole, resumed = killed_and_resumed("finetune", config, ["train.max_steps=10", "train.checkpoint_every=2"], tmp_path)
    assert resumed["training"]["position"]["step"] == 10
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


PRETRAIN = """\
method: simclr
model: {{name: cnn, widths: [8, 16]}}
head: {{name: projection, hidden_dim: 16, out_dim: 8}}
data: {{name: image_folder, root: {root}, image_size: 16, channels: 1, batch_size: 8, pipeline: stream, num_workers: 1}}
train: {{epochs: 2, device: cpu}}
"""


def test_a_corrupt_image_is_replaced_named_and_counted_or_stops_the_run(cli, folder, tmp_path):
    corrupt = folder / "train" / "d1" / "003.png"
    corrupt.write_bytes(b"not an image")
    config = write_config(tmp_path / "p.yaml", PRETRAIN.format(root=folder))
    done = cli("pretrain", "-c", config, "data.val_fraction=0", "--runs-dir", tmp_path / "runs", "--json")
    assert done.code == 0, done.stderr
    assert done.json["metrics"]["bad_samples_replaced"] == 2  # read once in each of the 2 epochs
    assert f"bad sample replaced: {corrupt}" in (Path(done.json["run_dir"]) / "log.txt").read_text()
    stopped = cli("pretrain", "-c", config, "data.on_bad_sample=stop", "--runs-dir", tmp_path / "runs")
    assert stopped.code == 1  # a failure while running: the run exists, marked failed
    assert f"cannot read {corrupt}" in stopped.stderr and "Traceback" not in stopped.stderr
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "on_bad_sample=replace" in errors[0]


def test_an_unreadable_shard_member_is_replaced_and_a_truncated_shard_keeps_the_rest(folder, tmp_path):
    pack(folder, tmp_path / "shards", shard_size=100)
    shard = tmp_path / "shards" / "train-000000.tar"
    entry = json.loads((tmp_path / "shards" / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    with open(shard, "r+b") as f:  # the last member's bytes overwritten in place: the same size, not an image
        f.seek(entry["offsets"][-1])
        f.write(b"\0" * entry["sizes"][-1])
    streamed = split(tmp_path / "shards", "stream", name="shards")
    read = streamed.inputs.read(torch.tensor([46, 47]))
    assert len(read.bad) == 1 and "train-000000.tar" in read.bad[0][0]
    assert read.positions.tolist() == [46, 0]  # the last sample's place: the next readable of the split, cyclically
    assert torch.equal(read.images[1], streamed.inputs[0])
    batch = next(iter(streamed.inputs.iterate([torch.tensor([47])])))
    assert batch.positions.tolist() == [0]  # a one-sample read is still replaced, as with any number of ranks
    (inputs, targets), *_ = iterate_batches(streamed, batch_size=4, order=torch.tensor([47]))
    assert torch.equal(inputs[0], streamed.inputs[0]) and targets.tolist() == [streamed.targets[0].item()]
    os.truncate(shard, entry["offsets"][-1] + 10)
    assert len(split(tmp_path / "shards", "stream", name="shards")) == 47  # indexed from the tar, up to the damage


def test_empty_sources_exit_2_with_one_line(cli, tmp_path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    config = write_config(tmp_path / "p.yaml", PRETRAIN.format(root=tmp_path / "empty"))
    result = cli("pretrain", "-c", config, "--runs-dir", tmp_path / "runs")
    assert result.code == 2 and "no images under" in result.stderr
    result = cli("pretrain", "-c", config, "data.name=shards", "data.urls=/nowhere/train-{000..009}.tar", "--runs-dir", tmp_path / "runs")
    assert result.code == 2 and "names no existing shard" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_manifest_is_listed_once_and_again_when_the_folder_changes(folder, monkeypatch):
    walks = []
    real_walk = stream._walk
    monkeypatch.setattr(stream, "_walk", lambda top: walks.append(top) or real_walk(top))
    assert len(split(folder, "stream")) == 48 and len(walks) == 3
    assert len(split(folder, "stream")) == 48 and len(walks) == 3  # reused: no listing
    Image.fromarray(read_sample("train")[0][0]).save(folder / "train" / "d2" / "new.png")
    assert len(split(folder, "stream")) == 49 and len(walks) == 6
    split(folder, "stream", rebuild_manifest=True)
    assert len(walks) == 9


def test_auto_streams_past_the_budget_and_stream_needs_a_data_set_that_streams(folder, digits_root):
    assert not is_streamed(split(folder, "auto"))
    assert is_streamed(split(folder, "auto", memory_budget_mb=1)) is False  # 48 images of 16 px are far below 1 MB
    tiny = load_split(DataConfig(name="image_folder", root=str(folder), image_size=160, pipeline="auto", memory_budget_mb=1), True)
    assert is_streamed(tiny)  # 48 x 3 x 160 x 160 bytes is 3.5 MB
    with pytest.raises(ConfigError, match="data set 'mnist' is read into memory"):
        load_split(DataConfig(name="mnist", root=str(digits_root), pipeline="stream"), True)


def test_pack_writes_a_manifest_that_matches_its_shards(folder, tmp_path):
    pack(folder, tmp_path / "shards", shard_size=16, image_size=12, channels=1)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["classes"] == list(CLASSES) and manifest["splits"]["train"]["count"] == 48
    for split_name, expected in (("train", [16, 16, 16]), ("test", [12])):
        entries = manifest["splits"][split_name]["shards"]
        assert [e["count"] for e in entries] == expected
        for entry in entries:
            data = (tmp_path / "shards" / entry["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
            with tarfile.open(tmp_path / "shards" / entry["file"]) as tar:
                images = [m for m in tar.getmembers() if m.name.endswith(".png")]
                labels = [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
            assert [m.offset_data for m in images] == entry["offsets"] and labels == entry["labels"]
            with tarfile.open(tmp_path / "shards" / entry["file"]) as tar, Image.open(tar.extractfile(images[0].name)) as image:
                assert image.size == (12, 12)


def test_an_interrupted_pack_resumes_where_it_stopped(folder, tmp_path, monkeypatch):
    real_write, written = shards_module._write_shard, []

    def dies_after_two(path, members):
        if len(written) == 2:
            list(members)
            path.with_name(f".{path.name}.partial").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        written.append(path.name)
        return real_write(path, members)

    monkeypatch.setattr(shards_module, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        pack(folder, tmp_path / "shards", shard_size=10)
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    first_mtime = (tmp_path / "shards" / "train-000000.tar").stat().st_mtime_ns
    monkeypatch.setattr(shards_module, "_write_shard", real_write)
    resumed = pack(folder, tmp_path / "shards", shard_size=10)
    assert (resumed.shards, resumed.reused_shards) == (7, 2)
    assert (tmp_path / "shards" / "train-000000.tar").stat().st_mtime_ns == first_mtime
    fresh = pack(folder, tmp_path / "fresh", shard_size=10)
    assert fresh.reused_shards == 0
    strip = lambda m: {**m, "plan": {**m["plan"], "source": None}}
    read = lambda d: strip(json.loads((d / "manifest.json").read_text()))
    assert read(tmp_path / "shards") == read(tmp_path / "fresh")  # the same bytes, checksums and offsets
    with pytest.raises(UsageError, match="holds shards of another pack"):
        pack(folder, tmp_path / "shards", shard_size=12)
    (tmp_path / "shards" / "train-000002.tar").unlink()  # lost from the middle: train packed again from there (test kept)
    again = pack(folder, tmp_path / "shards", shard_size=10)
    assert (again.shards, again.reused_shards) == (7, 4) and read(tmp_path / "shards") == read(tmp_path / "fresh")


def test_label_propagation_refuses_a_streamed_pool(cli, folder, tmp_path):
    config = write_config(tmp_path / "ft.yaml", STREAMED_FINETUNE.format(root=folder))
    result = cli("finetune", "-c", config, "finetune.unlabeled.weight=1", "finetune.unlabeled.propagate=true", "--runs-dir", tmp_path / "r")
    assert result.code == 2 and "label propagation needs every sample's features" in result.stderr


DISTRIBUTED = """\
method: simclr
model: {{name: mlp, hidden_dim: 32}}
head: {{name: projection, hidden_dim: 32, out_dim: 16, batch_norm: false}}
optimizer: {{name: sgd, lr: 0.1}}
data: {{name: image_folder, root: {root}, image_size: 12, channels: 1, batch_size: 16, pipeline: stream, num_workers: 1}}
train: {{max_steps: 4, log_every: 1, device: cpu}}
"""


def test_a_streamed_run_on_two_processes_equals_one(folder, tmp_path):
    """Under torchrun each rank reads half of every batch from the files; the losses and weights are one process's."""
    from tests.test_distributed import step_losses, transferctl, weights

    config = write_config(tmp_path / "d.yaml", DISTRIBUTED.format(root=folder))
    split(folder, "stream")  # the manifest, listed once, before two processes would race to write it
    results = {n: transferctl("pretrain", "-c", config, "--runs-dir", tmp_path / f"r{n}", "--json", nproc=n) for n in (1, 2)}
    for result in results.values():
        assert result.returncode == 0, result.stderr
    assert step_losses(results[1].stderr) == pytest.approx(step_losses(results[2].stderr), abs=2e-4)
    assert len(step_losses(results[1].stderr)) == 4
    w1, w2 = (weights(json.loads(results[n].stdout)["run_dir"]) for n in (1, 2))
    assert all(torch.allclose(w1[key], w2[key], atol=1e-5) for key in w1)


# --------------------------------------------------------------------------- sharded evaluation


def _evaluation_data():
    from transferctl.modalities.image import ImageData

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8, generator=generator)
    targets = torch.randint(0, 3, (37,), generator=generator)
    return ImageData(inputs=images, targets=targets, classes=CLASSES, mean=(0.5,), std=(0.25,), hflip=False)


def _evaluations(folder: Path) -> dict:
    """Every sharded protocol on in-memory data, on a streamed folder, and on one sample (fewer than the ranks);
    `seen` counts the samples the model saw in each, which a rank's share bounds."""
    from transferctl.engine.evaluate import knn_accuracy, predict
    from transferctl.tasks.classification import classify
    from transferctl.tasks.segmentation import segment

    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    per_pixel = torch.nn.Conv2d(1, 3, 3, padding=1)
    data = _evaluation_data()
    masks = type(data)(**{**data.__dict__, "targets": data.inputs[:, 0].long() % 3, "target_kind": "class_per_pixel"})
    streamed = load_split(
        DataConfig(name="image_folder", root=str(folder), image_size=8, channels=1, pipeline="stream", num_workers=0), True
    )
    seen: list[int] = []
    classifier.register_forward_hook(lambda module, args, output: seen.append(len(output)))

    def counted(job):
        seen.clear()
        result = job()
        return result, sum(seen)

    classified = lambda d: (lambda r: (r.accuracy, r.loss, r.confusion))(classify(classifier, d, batch_size=5))
    return {
        "classify": counted(lambda: classified(data)),
        "streamed": counted(lambda: classified(streamed)),
        "one": counted(lambda: classified(data.subset(torch.arange(1)))),
        "predict": counted(lambda: predict(classifier, data, batch_size=5)),
        "knn": counted(lambda: knn_accuracy(classifier, data, data.subset(torch.arange(11)), k=4, temperature=0.1, batch_size=5)),
        "segment": segment(per_pixel, masks, batch_size=5),
    }


def _sharded(rank: int, world: int, port: int, folder: Path, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = _evaluations(folder)
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_on_two_processes_equals_one(folder):
    expected = _evaluations(folder)
    results = mp.Manager().dict()
    mp.spawn(_sharded, args=(2, free_port(), folder, results), nprocs=2, join=True)
    shares = {"classify": (37, 18, 19), "streamed": (48, 24, 24), "one": (1, 1, 1), "predict": (37, 18, 19), "knn": (48, 18 + 5, 19 + 6)}
    for key, (alone, *ranks) in shares.items():  # each rank ran the model on its share only (one sample: both on it)
        assert expected[key][1] == alone and [results[r][key][1] for r in (0, 1)] == ranks, key
    for rank in (0, 1):
        got = results[rank]
        for key in ("classify", "streamed", "one"):
            (accuracy, loss, confusion), (accuracy_1, loss_1, confusion_1) = got[key][0], expected[key][0]
            assert (accuracy, confusion) == (accuracy_1, confusion_1) and loss == pytest.approx(loss_1, rel=1e-6), key
        assert torch.allclose(got["predict"][0], expected["predict"][0], atol=1e-6) and got["knn"][0] == expected["knn"][0]
        assert torch.equal(got["segment"][0], expected["segment"][0])
        assert got["segment"][1] == pytest.approx(expected["segment"][1], rel=1e-6)
