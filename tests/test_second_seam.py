"""The second seam: targets of any shape (a TargetList, collated by the task), targets that follow a geometric
transform as their kind says, side information about the inputs that batches and the network carry, a data set
that gives the targets its task asks for or its own validation split, and tasks that decode and compare their own
outputs. A plugin task whose target is a variable-length list runs finetune -> resume -> evaluate -> export."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import write_config
from transferctl.agreement import top1
from transferctl.data import load_training_data
from transferctl.data.augment import BatchAugment
from transferctl.data.pipeline import MemoryPipeline
from transferctl.data.samples import NO_LABEL, Samples
from transferctl.data.segmentation import compose_scenes
from transferctl.data.targets import IGNORE_INDEX, Geometry, TargetList, target_kind_named
from transferctl.models.heads import Network
from transferctl.predictions import inline
from transferctl.registry import DATASETS, TASKS

PLUGIN = Path(__file__).parent / "plugins" / "digits_in_order.py"

SCENES = """\
method: finetune
task: {{name: digits_in_order}}
model: {{name: cnn, widths: [8, 16]}}
head: {{name: digit_slots}}
optimizer: {{name: adamw, lr: 0.003}}
scheduler: {{name: constant}}
data:
  name: mnist_scenes
  root: {root}
  train_scenes: 240
  test_scenes: 60
  image_size: 32
  max_digits: 3
  batch_size: 32
  eval_batch_size: 64
  augment: {{name: none}}
train: {{epochs: 1, max_steps: 6, log_every: 2, device: cpu}}
"""


@dataclass(frozen=True)
class Plain(Samples):
    modality = "image"


def test_a_target_list_indexes_subsets_and_batches_as_a_tensor_would():
    lists = TargetList([torch.arange(n) for n in range(5)])
    data = Plain(torch.arange(5.0).view(5, 1), lists, ("a",), target_kind="class_sequence", side={"lengths": torch.arange(5) + 10})
    part = data.subset(torch.tensor([4, 1]))
    assert [len(t) for t in part.targets] == [4, 1] and part.side["lengths"].tolist() == [14, 11]
    assert part.targets == TargetList([torch.arange(4), torch.arange(1)]) and part.targets != lists
    assert list(data.without_targets().targets) == [None] * 5  # no label, whatever the kind
    assert data.to(torch.device("cpu")).targets is lists
    assert Plain(torch.zeros(3, 1), torch.tensor([1, 2, 0]), ("a", "b", "c")).without_targets().targets.tolist() == [NO_LABEL] * 3

    class Identity:
        def decode(self, raw):
            return raw

        def normalize(self, x, data):
            return x

    pipeline = MemoryPipeline(data, BatchAugment(), Identity(), views=1, batch_size=2, seed=0, drop_last=False)
    for batch in pipeline.batches(epoch=0):
        index = batch.extras["index"]
        assert batch.targets == lists[index] and torch.equal(batch.side["lengths"], index + 10)
        assert torch.equal(batch.inputs[0][:, 0], index.float())


def test_side_information_reaches_the_modules_that_declare_it():
    class LengthAware(nn.Module):
        side_inputs = ("lengths",)
        feature_dim = 1

        def forward(self, x, lengths):
            return (x.flatten(1).sum(1, keepdim=True) + lengths.unsqueeze(1)).float()

    network = Network(LengthAware(), nn.Identity())
    x = torch.ones(2, 3)
    assert network(x, lengths=torch.tensor([1, 5])).flatten().tolist() == [4.0, 8.0]
    assert Network(nn.Flatten(), nn.Identity())(x, lengths=torch.tensor([1, 5])).shape == (2, 3)  # not declared: not given
    # evaluation hands a split's side information to the network, batch by batch, in order
    from transferctl.engine.evaluate import predict
    from transferctl.modalities.image import ImageData

    images = torch.zeros(5, 1, 1, 3, dtype=torch.uint8)
    data = ImageData(
        images, torch.zeros(5, dtype=torch.long), ("a",), mean=(0.0,), std=(1.0,), hflip=False, side={"lengths": torch.arange(5)}
    )
    assert predict(network, data, batch_size=2).flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    # an export takes the modality's inputs alone: a model that needs more is refused in one line, not traced wrong
    from transferctl.errors import UsageError
    from transferctl.recipes.export import _refuse_side_inputs

    with pytest.raises(UsageError, match=r"takes side information \(lengths\)"):
        _refuse_side_inputs(network, "length_aware")


def test_a_mask_follows_its_image_as_its_kind_says():
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[0, 2, 1] = 3
    shift = torch.tensor([[[1.0, 0.0, 0.25], [0.0, 1.0, 0.0]]])  # each output pixel reads one pixel to its right
    moved = target_kind_named("class_per_pixel").follow(masks, Geometry(shift, (8, 8)))
    assert moved[0, 2, 0] == 3 and moved[0, 2, 1] == 0 and (moved[0, :, 7] == IGNORE_INDEX).all()
    assert not target_kind_named("class").geometric and not target_kind_named("class_sequence").stacked


def test_scenes_give_masks_or_their_digits_in_reading_order_from_one_composition():
    digits = torch.zeros(3, 28, 28, dtype=torch.uint8)
    digits[:, 8:20, 12:16] = 255
    scenes = compose_scenes(digits, torch.tensor([4, 7, 9]), 30, 64, 4, torch.Generator().manual_seed(5))
    for mask, labels, boxes in zip(scenes.masks, scenes.labels, scenes.boxes, strict=True):
        # every masked pixel lies in the box of a digit of its class
        inside = torch.zeros_like(mask, dtype=torch.bool)
        for label, (x1, y1, x2, y2) in zip(labels.tolist(), boxes.tolist(), strict=True):
            inside[y1:y2, x1:x2] |= mask[y1:y2, x1:x2] == label + 1
        assert (inside == (mask > 0)).all()
        # the bar's box (4 x 12 pixels of 28, scaled by 0.7 to 1.5), not the pasted square's
        assert ((boxes[:, 2] - boxes[:, 0]) <= 8).all() and ((boxes[:, 3] - boxes[:, 1]) <= 20).all()
    ordered = scenes.reading_order()
    for labels, boxes, reading in zip(scenes.labels, scenes.boxes, ordered, strict=True):
        centres = list(zip((boxes[:, 0] + boxes[:, 2]).tolist(), (boxes[:, 1] + boxes[:, 3]).tolist(), strict=True))
        by_position = sorted(zip(centres, range(len(labels)), labels.tolist(), strict=True))  # left to right, then top down
        assert reading.tolist() == [label for *_, label in by_position]


def test_a_data_set_gives_the_target_kind_its_task_trains_on_or_says_which_it_has(cli, tmp_path, digits_root):
    config = write_config(tmp_path / "scenes.yaml", SCENES.format(root=digits_root))
    result = cli("finetune", "-c", config, "task.name=classification", "head.name=linear", "--runs-dir", tmp_path / "runs")
    assert result.code == 2 and "mnist_scenes" in result.stderr and "class_per_pixel" in result.stderr
    assert "class_sequence" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_data_set_may_give_its_own_validation_split(registries_restored, tmp_path):
    @DATASETS.register("with_dev", modality="image", validation=True)
    def with_dev(root: Path, download: bool, train: bool, validation: bool = False):
        first = 100 if validation else (0 if train else 200)
        inputs = torch.arange(first, first + 10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
        from transferctl.modalities.image import ImageData

        return ImageData(inputs, torch.arange(10) % 2, ("even", "odd"), mean=(0.5,), std=(0.2,), hflip=False)

    from transferctl.config import load_config

    cfg = load_config(None, base={"method": "supervised", "data": {"name": "with_dev", "root": str(tmp_path), "val_fraction": 0.5}})
    data = load_training_data(cfg.data, labelled_subset=True)
    assert data.train.inputs[:, 0, 0, 0].tolist() == list(range(10))  # all of train: nothing cut for validation
    assert data.val.inputs[:, 0, 0, 0].tolist() == list(range(100, 110))


def test_built_in_tasks_decode_their_outputs_into_records():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    records = TASKS.build("classification", {}).decode(logits, {"classes": ["a", "b", "c"]}, top_k=2)
    assert [r["label"] for r in records] == ["b", "a"] and records[0]["score"] == pytest.approx(logits.softmax(1)[0, 1].item())
    assert [t["label"] for t in records[0]["top_k"]] == ["b", "c"]
    regression = TASKS.build("regression", {})
    assert regression.decode(torch.tensor([[12.5]]), {"target_names": ["angle"]}) == [{"value": 12.5}]
    two = regression.decode(torch.tensor([[1.0, 2.0]]), {"target_names": ["x", "y"]})
    assert two == [{"values": {"x": 1.0, "y": 2.0}}]
    masks = torch.zeros(1, 3, 2, 2)
    masks[0, 2, 0, :] = 1.0
    segmented = [inline(r) for r in TASKS.build("segmentation", {}).decode(masks, {"classes": ["background", "x", "y"]})]
    assert segmented == [{"mask": [[2, 2], [0, 0]], "pixel_share": {"background": 0.5, "y": 0.5}}]
    # the comparisons count what their outputs mean: rows, pixels, nothing for values
    assert top1(logits, logits.flip(0)) == {"top1_agreement": (0, 2)}
    assert TASKS.build("segmentation", {}).compare(masks, masks) == {"pixel_agreement": (4, 4)}
    assert regression.compare(logits, logits) == {}


def _checkpoint(run_dir: str) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)


def test_a_plugin_task_with_variable_length_targets_runs_the_whole_chain(cli, registries_restored, tmp_path, digits_root):
    (tmp_path / PLUGIN.name).write_text(PLUGIN.read_text())  # in the current folder: imported once, by module name
    plugin, runs = ["--plugin", PLUGIN.stem], tmp_path / "runs"
    config = write_config(tmp_path / "scenes.yaml", SCENES.format(root=digits_root))

    def ok(*args: str) -> dict:
        result = cli(*plugin, *args, "--runs-dir", runs, "--json")
        assert result.code == 0, result.stderr
        return result.json

    whole = ok("finetune", "-c", config, "train.ema_decay=0.5")  # checkpoints hold averaged weights, the network the trained
    part = ok("finetune", "-c", config, "train.ema_decay=0.5", "train.max_steps=3")
    ok("finetune", "--resume", part["run_id"], "train.max_steps=6", "train.ema_decay=0.5")
    first, resumed = _checkpoint(whole["run_dir"]), _checkpoint(part["run_dir"])
    assert all(torch.equal(first["model"][k], resumed["model"][k]) for k in first["model"])
    assert first["model"]["head.linear.weight"].shape == (4 * 11, 16)
    # state the task fitted after training on the held-out split with the checkpoint's own (averaged) weights: what
    # validation scored them at, not the trained weights the network holds at the end
    best = torch.load(Path(whole["run_dir"]) / "checkpoints" / "best.pt", weights_only=True)
    assert best["task"] == first["task"] == {"end": 10, "held_out_loss": pytest.approx(whole["metrics"]["val_loss"], rel=1e-6)}

    evaluated = ok("evaluate", "--from", whole["run_id"])
    assert set(evaluated["metrics"]) >= {"sequence_accuracy", "loss"}
    exported = ok("export", "--from", whole["run_id"], "--format", "torchscript", "--format", "safetensors")
    for parity in exported["parity"].values():
        assert parity["passed"] and parity["sequence_agreement"] == 1.0 and parity["top1_agreement"] is None
    card = json.loads((Path(whole["run_dir"]) / "export" / "model_card.json").read_text())
    assert card["kind"] == "sequence_reader" and card["output"]["shape"] == ["batch", 11, 4]

    task = TASKS.build("digits_in_order", {})
    outputs = torch.full((2, 11, 4), -5.0)
    outputs[0, [3, 1, 10, 2], [0, 1, 2, 3]] = 5.0  # 3, 1, end, (ignored after the end)
    outputs[1, 10, :] = 5.0
    assert task.decode(outputs, {"classes": [str(d) for d in range(10)]}) == [{"digits": ["3", "1"]}, {"digits": []}]


def test_an_export_of_inputs_of_any_length_keeps_their_length_axes_dynamic(tmp_path):
    from transferctl.methods import Export
    from transferctl.recipes import export as export_module

    class MeanOfTokens(nn.Module):  # what a text model is to an export: ids and their mask in, one row per text out
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(20, 3)

        def forward(self, input_ids, attention_mask):
            weights = attention_mask.unsqueeze(-1).float()
            return (self.table(input_ids) * weights).sum(1) / weights.sum(1)

    module = MeanOfTokens().eval()
    example = (torch.randint(0, 20, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    spec = Export(False, "logits", "classifier", variable_length=True)
    axes = {"input_ids": 1, "attention_mask": 1}
    exported = export_module.Exported(module, example, spec, ("input_ids", "attention_mask"), {}, 3, (8,), {}, axes)
    export_module._save_onnx(exported, tmp_path / "model.onnx")
    run = export_module._load_onnx(tmp_path / "model.onnx")
    for length in (3, 13):
        ids, mask = torch.randint(0, 20, (4, length)), torch.ones(4, length, dtype=torch.long)
        mask[0, length // 2 :] = 0
        assert torch.allclose(run(ids, mask), module(ids, mask), atol=1e-5)


def test_texts_read_with_another_tokenizer_get_their_word_ids_again_and_keep_per_word_targets():
    from transferctl.data.text import TokenizerOptions, train_tokenizer
    from transferctl.errors import UsageError
    from transferctl.modalities.text import TextData, Tokenization, tokenized

    texts = ["the cat sat on the mat", "dogs ran home quickly", "a cat and a dog"] * 20
    whole = Tokenization(train_tokenizer(texts, TokenizerOptions(vocab_size=400)), max_length=32)
    letters = torch.randint(0, 26, (400, 6), generator=torch.Generator().manual_seed(0))
    noise = ["".join(chr(97 + c) for c in word) for word in letters.tolist()]  # random words: pieces of letters, few merges
    pieces = Tokenization(train_tokenizer(noise, TokenizerOptions(vocab_size=100)), max_length=32)
    ids, cut, encodings = whole.encode(texts[:3], with_encodings=True)
    tags = TargetList([torch.arange(len(t.split())) for t in texts[:3]])  # one label per word
    side = {"word_ids": torch.tensor([[-1 if w is None else w for w in e.word_ids] for e in encodings])}
    data = TextData(ids, tags, ("x",), texts=tuple(texts[:3]), tokenization=whole, cut=cut, target_kind="class_sequence", side=side)
    again = tokenized(data, pieces)
    assert again.targets is data.targets and not torch.equal(again.inputs, data.inputs)
    for text, before, after in zip(texts[:3], data.side["word_ids"], again.side["word_ids"], strict=True):
        words = list(range(len(text.split())))
        assert sorted(set(before.tolist()) - {-1}) == words == sorted(set(after.tolist()) - {-1})
        assert (after >= 0).sum() > (before >= 0).sum()  # more tokens per word: the word ids follow the new pieces
    with pytest.raises(UsageError, match="spans"):
        tokenized(replace(data, side={"spans": torch.zeros(3, 2)}), pieces)
