"""predict and embed: a trained model applied to new files, from its run and from its export folder alone.

One small run of each modality and task (the format-2 fixture's configs, trained here with today's code) and their
exports are shared by the module. Each agrees with its evaluation on its own test split, read back from files.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_mnist_root
from transferctl import recipes
from transferctl.build import load_trained
from transferctl.config import load_config
from transferctl.data.targets import IGNORE_INDEX
from transferctl.engine.evaluate import embed as knn_features
from transferctl.engine.evaluate import predict as evaluated_outputs
from transferctl.modalities.image import ImageDecoding
from transferctl.recipes.export import export_run
from transferctl.runs import read_trained_run
from transferctl.tasks.classification import classify
from transferctl.tasks.segmentation import iou_metrics, mask_on_input, segment

FIXTURES = Path(__file__).parent / "fixtures"
FORMAT2 = FIXTURES / "format2"
MADE_IN = "/tmp/format2/data"  # where the format-2 configs name their data
KINDS = ("image", "audio", "text", "regression", "segmentation")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: models this small run fastest on one thread


class Trained:
    def __init__(self, root: Path):
        self.root, self.runs, self.data = root, root / "runs", root / "data"
        self.run: dict[str, Path] = {}
        self.export: dict[str, Path] = {}

    def loaded(self, kind: str):
        record = read_trained_run(str(self.run[kind]), self.runs)
        return load_trained(record, load_config(None, base=record.config), device=torch.device("cpu"))


def _config(root: Path, name: str, data: Path) -> Path:
    path = root / f"{name}.yaml"
    path.write_text((FORMAT2 / f"{name}.yaml").read_text().replace(MADE_IN, str(data)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """A SimCLR run and a fine-tune from it (images), and a fine-tune each of audio, text, regression and
    segmentation, each exported (TorchScript; ONNX too for images and texts)."""
    t = Trained(tmp_path_factory.mktemp("predict"))
    shutil.copytree(FORMAT2 / "data", t.data)
    make_mnist_root(t.data / "mnist", 200, 100)
    pretrain = recipes.pretrain(_config(t.root, "image_pretrain", t.data), runs_dir=t.runs)
    t.run["simclr"] = pretrain.run_dir
    overrides = ["data.labels_per_class=2", "data.batch_size=10", "train.max_steps=3", "train.device=cpu"]
    t.run["image"] = recipes.finetune(str(pretrain.run_dir), None, overrides, runs_dir=t.runs).run_dir
    for kind in KINDS[1:]:
        t.run[kind] = recipes.finetune(None, _config(t.root, kind, t.data), runs_dir=t.runs).run_dir
    for kind in KINDS:
        formats = ["torchscript", "onnx"] if kind in ("image", "text") else ["torchscript"]
        t.export[kind] = export_run(str(t.run[kind]), formats, output=t.root / "exports" / kind, runs_dir=t.runs).export_dir
    return t


def _write_images(folder: Path, images: torch.Tensor, names: list[str]) -> list[Path]:
    """uint8 (N, 1, H, W) images as PNGs at `folder/<name>`, in order."""
    paths = []
    for image, name in zip(images, names, strict=True):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(path)
        paths.append(path)
    return paths


def _test_files(t: Trained, kind: str) -> tuple[list[Path], object]:
    """The run's test split as files in split order, and the split."""
    test = t.loaded(kind).split(train=False)
    if kind == "audio":
        return sorted((t.data / "audio" / "test").rglob("*.wav")), test
    if kind == "text":
        return [t.data / "text" / "test.csv"], test
    names = [f"{i:04d}.png" for i in range(len(test))]
    return _write_images(t.root / f"{kind}-files", test.inputs.cpu(), names), test


@pytest.mark.parametrize("kind", KINDS)
def test_predict_from_a_run_and_from_its_export_agree_with_evaluate(trained, kind):
    files, test = _test_files(trained, kind)
    loaded = trained.loaded(kind)
    masks = trained.root / f"masks-{kind}"
    from_run = recipes.predict(str(trained.run[kind]), files, runs_dir=trained.runs, masks=masks / "run")
    from_export = recipes.predict(trained.export[kind], files, masks=masks / "export")
    assert len(from_run) == len(from_export) == len(test) and not any("error" in r for r in from_run + from_export)
    if kind in ("image", "audio", "text"):
        if kind == "audio":  # the folder's sorted order is the split's: class folders, then file names
            assert [Path(r["input"]).parent.name for r in from_run] == [test.classes[i] for i in test.targets.tolist()]
        truth = [test.classes[i] for i in test.targets.tolist()]
        accuracy = sum(r["label"] == label for r, label in zip(from_run, truth, strict=True)) / len(truth)
        assert accuracy == classify(loaded.network, test, 64).accuracy
        assert [r["label"] for r in from_export] == [r["label"] for r in from_run]
        assert [r["score"] for r in from_export] == pytest.approx([r["score"] for r in from_run], abs=1e-4)
    elif kind == "regression":
        values = torch.tensor([r["value"] for r in from_run])
        expected = evaluated_outputs(loaded.network, test, 64)[:, 0]
        assert values == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-5)
        assert [r["value"] for r in from_export] == pytest.approx(values.tolist(), rel=1e-4, abs=1e-4)
    else:
        confusion, _ = segment(loaded.network, test, 64)
        predicted = torch.stack([torch.from_numpy(np.array(Image.open(r["mask"]))).long() for r in from_run])
        truth = test.targets.cpu().long()
        counted = truth != IGNORE_INDEX
        accuracy = (predicted[counted] == truth[counted]).double().mean().item()
        assert accuracy == pytest.approx(iou_metrics(confusion)["pixel_accuracy"], abs=1e-12)
        exported = torch.stack([torch.from_numpy(np.array(Image.open(r["mask"]))).long() for r in from_export])
        assert (exported == predicted).double().mean().item() >= 0.999
        image = Image.open(from_run[0]["mask"])
        assert image.mode == "P" and image.size == (32, 32)  # indexed palette, class ids as values, the input's pixels
        assert sum(from_run[0]["pixel_share"].values()) == pytest.approx(1.0)


def test_embed_normalized_equals_the_features_of_evaluates_knn(trained, tmp_path, cli):
    loaded = trained.loaded("simclr")
    test = loaded.split(train=False)
    files = _write_images(tmp_path / "digits", test.inputs.cpu(), [f"{i:04d}.png" for i in range(len(test))])
    ids, features = recipes.embed(str(trained.run["simclr"]), files, normalize=True, runs_dir=trained.runs)
    assert ids == [str(f) for f in files]
    expected = knn_features(loaded.served(), test, 256).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)
    # the command line: every format, the same rows
    for name in ("emb.npy", "emb.safetensors", "emb.csv"):
        result = cli("embed", "--from", trained.run["simclr"], tmp_path / "digits", "-o", tmp_path / name, "--normalize", "--json")
        assert result.code == 0, result.stderr
        assert result.json["embedded"] == len(test) and result.json["dim"] == features.shape[1]
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), features, atol=1e-6)
    index = [json.loads(line) for line in (tmp_path / "emb.jsonl").read_text().splitlines()]
    assert [i["input"] for i in index] == ids
    from safetensors import safe_open

    with safe_open(str(tmp_path / "emb.safetensors"), framework="np") as f:
        np.testing.assert_allclose(f.get_tensor("embeddings"), features, atol=1e-6)
        assert json.loads(f.metadata()["ids"])[0]["input"] == ids[0]
    header = (tmp_path / "emb.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["filename", "embedding_0"] and len(header) == features.shape[1] + 1
    # a fine-tuned run's encoder embeds too
    ids, tuned = recipes.embed(str(trained.run["image"]), files[:5], runs_dir=trained.runs)
    assert tuned.shape[0] == 5 and not np.allclose(np.linalg.norm(tuned, axis=1), 1.0)


def test_inputs_from_nested_folders_lists_stdin_patterns_and_shards(trained, tmp_path, cli, monkeypatch):
    loaded = trained.loaded("image")
    test = loaded.split(train=False)
    names = [f"{'a/b' if i % 2 else 'c'}/{i:04d}.png" for i in range(12)]
    files = _write_images(tmp_path / "nested", test.inputs[:12].cpu(), names)
    (tmp_path / "nested" / "c" / "notes.txt").write_text("not an image")  # skipped: not the modality's file type
    export = trained.export["image"]
    folder = cli("predict", "--from", export, tmp_path / "nested")
    assert folder.code == 0, folder.stderr
    records = [json.loads(line) for line in folder.stdout.splitlines()]
    expected_order = sorted(str(f.relative_to(tmp_path / "nested")) for f in files)
    assert [str(Path(r["input"]).relative_to(tmp_path / "nested")) for r in records] == expected_order
    by_input = {r["input"]: r["label"] for r in records}
    # a --list file and standard input, one path a line
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(map(str, files[:4])) + "\n")
    from_list = cli("predict", "--from", export, "--list", listed, "-o", tmp_path / "p.csv")
    assert from_list.code == 0 and from_list.stdout == ""
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["input", "label", "score"] and len(rows) == 5
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(map(str, files[4:6])) + "\n"))
    piped = cli("predict", "--from", export, "-", "--top-k", "3")
    piped_records = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [r["label"] for r in piped_records] == [by_input[str(f)] for f in files[4:6]]
    assert len(piped_records[0]["top_k"]) == 3 and piped_records[0]["top_k"][0]["label"] == piped_records[0]["label"]
    # a glob pattern, and a tar shard read member by member
    pattern = cli("predict", "--from", export, str(tmp_path / "nested" / "a" / "**" / "*.png"))
    assert len(pattern.stdout.splitlines()) == 6
    everything = cli("predict", "--from", export, str(tmp_path / "nested" / "**"))  # folders and their files: each once
    assert sorted(json.loads(line)["input"] for line in everything.stdout.splitlines()) == sorted(map(str, files))
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, f in enumerate(files[:3]):
            tar.add(f, arcname=f"{i:06d}.png")
            info = tarfile.TarInfo(f"{i:06d}.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"0"))
    from_shard = [json.loads(line) for line in cli("predict", "--from", export, shard).stdout.splitlines()]
    assert [r["input"] for r in from_shard] == [f"{shard}:{i:06d}.png" for i in range(3)]
    assert [r["label"] for r in from_shard] == [by_input[str(f)] for f in files[:3]]


def test_texts_from_options_stdin_and_files_and_the_record_says_when_one_was_cut(trained, tmp_path, cli, monkeypatch):
    export, run = trained.export["text"], trained.run["text"]
    long_text = " ".join(["market stock price bank"] * 20)  # far past the run's 16 tokens
    given = cli("predict", "--from", run, "--runs-dir", trained.runs, "--text", "the team won the match", "--text", long_text)
    records = [json.loads(line) for line in given.stdout.splitlines()]
    assert [r["input"] for r in records] == ["the team won the match", long_text]
    assert [r["cut"] for r in records] == [False, True] and [r["line"] for r in records] == [1, 2]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"the team won the match\n\n{long_text}\n"))
    piped = [json.loads(line) for line in cli("predict", "--from", export, "-").stdout.splitlines()]
    assert [(r["label"], r["line"]) for r in piped] == [(records[0]["label"], 1), (records[1]["label"], 3)]
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text(json.dumps({"id": 7, "text": "the team won the match"}) + "\n")
    from_file = [json.loads(line) for line in cli("predict", "--from", export, jsonl).stdout.splitlines()]
    assert len(from_file) == 1 and (from_file[0]["file"], from_file[0]["line"]) == (str(jsonl), 1)
    assert from_file[0]["label"] == records[0]["label"] and from_file[0]["input"] == "the team won the match"
    folder = tmp_path / "texts"
    (folder / ".checkpoints").mkdir(parents=True)
    (folder / "a.txt").write_text("the team won the match\n\nstocks fell\n")
    (folder / ".checkpoints" / "a.txt").write_text("a hidden copy\n")  # hidden folders are skipped
    from_folder = [json.loads(line) for line in cli("predict", "--from", export, folder).stdout.splitlines()]
    assert [(r["input"], r["line"]) for r in from_folder] == [("the team won the match", 1), ("stocks fell", 3)]
    no_column = tmp_path / "other.csv"
    no_column.write_text("body\nsome words\n")
    refused = cli("predict", "--from", export, no_column)
    assert refused.code == 2 and "no column 'text'" in refused.stderr


def test_audio_in_stereo_reads_as_its_mono_recording(trained, tmp_path):
    mono = sorted((trained.data / "audio" / "test").rglob("*.wav"))[0]
    rate, samples = _read_wav(mono)
    stereo = tmp_path / "stereo.wav"
    _write_wav(stereo, np.stack([samples, samples], axis=1), rate)
    run = str(trained.run["audio"])
    first, second = recipes.predict(run, [mono, stereo], runs_dir=trained.runs)
    assert (first["label"], first["score"]) == (second["label"], second["score"])


def _read_wav(path: Path) -> tuple[int, np.ndarray]:
    import wave

    with wave.open(str(path), "rb") as reader:
        return reader.getframerate(), np.frombuffer(reader.readframes(reader.getnframes()), dtype=np.int16)


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    import wave

    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(samples.shape[1] if samples.ndim == 2 else 1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(np.ascontiguousarray(samples, dtype=np.int16).tobytes())


@pytest.mark.parametrize("resize", ["crop", "stretch", "letterbox"])
def test_a_mask_is_put_back_on_the_inputs_own_pixels_for_every_resize_policy(resize, tmp_path):
    """An image of 60 x 40 whose left third is bright: decoded to 32 x 32 as a run would, 'logits' that mark the bright
    pixels there, put back on the 60 x 40 image: the bright third again, and nothing where the model saw nothing."""
    width, height = 60, 40
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, :20] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    decoding = ImageDecoding(32, 1, resize)
    from transferctl.modalities.image import ImageReader

    square, about = ImageReader(decoding)(path, str(path))
    bright = square[0].float() / 255
    logits = torch.stack([1 - bright, bright])
    mask = mask_on_input(logits, decoding.placement(*about["size"]))
    assert mask.shape == (height, width)
    seen = mask != IGNORE_INDEX
    truth = torch.from_numpy(pixels > 127).long()
    assert (mask[seen] == truth[seen]).double().mean() >= 0.97
    if resize == "crop":  # the centre 40 x 40 was seen; 10 columns each side were cut
        assert seen[:, 10:50].all() and not seen[:, :9].any() and not seen[:, 51:].any()
    else:
        assert seen.all()


def test_bad_inputs_fail_alone_and_bad_requests_write_nothing(trained, tmp_path, cli):
    export = trained.export["image"]
    good = _write_images(tmp_path / "in", trained.loaded("image").split(train=False).inputs[:2].cpu(), ["a.png", "b.png"])
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out.jsonl"
    result = cli("predict", "--from", export, tmp_path / "in", "-o", out, "--json")
    assert result.code == 1 and result.json["failed"] == 1 and result.json["predicted"] == 2
    assert "1 of 3 inputs could not be read" in result.stderr and "broken.png" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" in records[2] and "broken.png" in records[2]["error"] and "label" in records[1]  # a, b, broken
    assert cli("predict", "--from", export, tmp_path / "in", "-o", out, "--skip-bad").code == 0
    (tmp_path / "empty").mkdir()
    wav = tmp_path / "x.wav"
    wav.write_bytes(b"RIFF")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model_card.json").write_text('{"name": "not ours"}')
    fresh = tmp_path / "never.jsonl"
    cases = {
        (export, wav): "is an audio file, and the model reads images",
        (export, tmp_path / "empty"): "holds no",
        (export, str(tmp_path / "none*.png")): "matches no",
        (export, tmp_path / "missing.png"): "no such file",
        (tmp_path / "empty", good[0]): "neither a run",
        (tmp_path / "gone", good[0]): "no such run",
        (foreign, good[0]): "not written by transferctl",
        (trained.run["simclr"], good[0]): "trains no task",
    }
    for (source, given), message in cases.items():
        refused = cli("predict", "--from", source, given, "-o", fresh, "--runs-dir", trained.runs)
        assert refused.code == 2 and message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert not fresh.exists()
    assert cli("predict", "--from", export, good[0], "--json").code == 2  # --json needs --output
    drawn = cli("predict", "--from", export, good[0], "--save-images", tmp_path / "drawn")  # a classifier draws nothing
    assert drawn.code == 2 and "draws nothing" in drawn.stderr and not (tmp_path / "drawn").exists()
    assert cli("embed", "--from", export, good[0], "-o", tmp_path / "e.npy").code == 2  # embed reads a run's encoder


def test_exports_of_0_9_keep_working_with_their_normalization_outside(tmp_path, trained):
    """0.9.0 exported the format-2 fixture's runs (tests/fixtures/export090/README.md): image exports then took
    normalized images. Predict from those folders agrees with predict from the runs."""
    runs = Path(shutil.copytree(FORMAT2 / "runs", tmp_path / "runs"))
    for config in runs.glob("*/config.yaml"):
        config.write_text(config.read_text().replace(MADE_IN, str(trained.data)))
    cases = {
        "image": ("20261206-031318-finetune-mnist_sample-3652", None),
        "audio": ("20261206-031351-finetune-audio_folder-1d86", sorted((trained.data / "audio" / "test").rglob("*.wav"))),
        "text": ("20261206-031409-finetune-text_csv-1252", [trained.data / "text" / "test.csv"]),
    }
    for kind, (run, files) in cases.items():
        if files is None:
            test = trained.loaded("image").split(train=False)
            files = _write_images(tmp_path / "digits", test.inputs[:20].cpu(), [f"{i}.png" for i in range(20)])
        folder = FIXTURES / "export090" / kind
        assert "normalization" not in json.loads((folder / "model_card.json").read_text())["input"]
        from_run = recipes.predict(str(runs / run), files, runs_dir=runs)
        from_export = recipes.predict(folder, files)
        assert [r["label"] for r in from_export] == [r["label"] for r in from_run], kind
        assert [r["score"] for r in from_export] == pytest.approx([r["score"] for r in from_run], abs=1e-4)


def test_masks_of_more_than_255_classes_are_16_bit_and_a_plugin_task_of_0_9_still_decodes(tmp_path):
    from transferctl.data.targets import Placement
    from transferctl.modalities.base import ReadBatch
    from transferctl.predictions import WIDE_UNSEEN
    from transferctl.recipes.prediction import _decoded
    from transferctl.registry import TASKS
    from transferctl.tasks.classification import Classification

    classes = [f"c{i}" for i in range(300)]
    logits = torch.zeros(1, 300, 4, 4)
    logits[0, 299] = 1.0  # every pixel: the last class, past what a palette holds
    crop = Placement(8, 4, scale_x=1.0, scale_y=1.0, offset_x=-2, offset_y=0)  # 8 x 4 input, centre 4 x 4 seen
    (record,) = TASKS.build("segmentation", {}).decode(logits, {"classes": classes}, batch=ReadBatch(None, [{}], [crop]))
    mask = record["mask"]
    assert mask.wide and mask.pixels.shape == (4, 8) and set(mask.pixels[:, 2:6].flatten().tolist()) == {299}
    assert set(mask.pixels[:, :2].flatten().tolist()) == {WIDE_UNSEEN} and record["pixel_share"] == {"c299": 1.0}
    mask.write(tmp_path / "wide.png")
    assert np.array(Image.open(tmp_path / "wide.png")).max() == WIDE_UNSEEN

    class Older(Classification):  # decode as 0.9 declared it: no batch
        def decode(self, outputs, fitted, top_k=1):
            return [{"label": "old"} for _ in outputs]

    assert _decoded(Older(), torch.zeros(2, 3), {"classes": ["a", "b", "c"]}, 1, ReadBatch(None)) == [{"label": "old"}] * 2
