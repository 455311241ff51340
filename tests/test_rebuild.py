"""A trained network rebuilt from its checkpoint alone (format 3 records its input shape and outputs, and the fitted
state how inputs were decoded), format-2 checkpoints still sized from their config and fitted state (or their test
split), and `Modality.read`: files and texts decoded exactly as the training data sets decode theirs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_mnist_root, write_config
from tests.test_audio import tone, write_wav
from tests.test_format2_runs import AUDIO, IMAGE, SEGMENTATION, TEXT
from tests.test_text import make_text_root
from transferctl import checkpoints, plots
from transferctl.build import build_network, load_trained, rebuild
from transferctl.components import load_components
from transferctl.config import load_config
from transferctl.data import NO_LABEL
from transferctl.errors import UsageError
from transferctl.methods import method_of
from transferctl.modalities import modality_named
from transferctl.registry import DATASETS
from transferctl.runs import read_trained_run

load_components()
FORMAT2 = Path(__file__).parent / "fixtures" / "format2"
CPU = torch.device("cpu")
DECODING = ("image_size", "channels", "resize", "interpolation")

IMAGE_RUN = """\
method: supervised
model: {{name: cnn, widths: [4, 8]}}
optimizer: {{name: adamw, lr: 0.01}}
data: {{name: image_folder, root: {root}, image_size: 16, batch_size: 8, eval_batch_size: 64, val_fraction: 0.25}}
train: {{max_steps: 2, epochs: 5, log_every: 1, device: cpu}}
"""


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    """`count` PNGs of assorted sizes and modes (RGB, grey, RGBA, palette), so decoding converts, resizes and crops."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        height, width = int(rng.integers(10, 40)), int(rng.integers(10, 40))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        image = image.convert(("RGB", "L", "RGBA", "P")[i % 4])
        paths.append(folder / f"{i}.png")
        image.save(paths[-1])
    return paths


def make_image_folder(root: Path) -> Path:
    for split, count in (("train", 6), ("test", 3)):
        for index, name in enumerate(("cat", "dog")):
            write_images(root / split / name, count, seed=10 * index + count)
    return root


def test_a_new_run_is_format_3_and_rebuilds_without_its_data(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)  # drawing curves.png would take most of the test's time
    root = make_image_folder(tmp_path / "images")
    runs = tmp_path / "runs"
    result = cli("pretrain", "-c", write_config(tmp_path / "c.yaml", IMAGE_RUN.format(root=root)), "--runs-dir", runs, "--json")
    assert result.code == 0, result.stderr
    run_dir = Path(result.json["run_dir"])
    for name in ("last", "best"):
        saved = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
        assert saved["format"] == 3 and saved["network"] == {"sample_shape": [3, 16, 16], "num_outputs": 2}
        assert {k: saved["data"][k] for k in DECODING} == {"image_size": 16, "channels": 3, "resize": "crop", "interpolation": "bilinear"}

    record = read_trained_run(str(run_dir), runs)
    cfg = load_config(None, base=record.config)
    trained = load_trained(record, cfg, device=CPU, splits=("test",))
    test = trained.split(train=False)
    files = [path for name in ("cat", "dog") for path in sorted((root / "test" / name).iterdir())]  # ImageFolder's order
    read = trained.modality.read([str(p) for p in files], trained.fitted)  # what `predict` will call
    assert torch.equal(read.inputs, test.inputs) and read.classes == ("cat", "dog") and bool((read.targets == NO_LABEL).all())
    inputs = trained.modality.model_input(read.inputs, read)
    with torch.no_grad():
        expected = trained.network(inputs)

    shutil.move(root, tmp_path / "moved")  # no data set to read from here on
    rebuilt = rebuild(checkpoints.read(run_dir / "checkpoints" / "last.pt"))
    again = load_trained(record, cfg, device=CPU, splits=())
    with torch.no_grad():
        assert torch.equal(rebuilt(inputs), expected) and torch.equal(again.network(inputs), expected)
    assert again.splits == {} and again.fitted == trained.fitted
    evaluated = cli("evaluate", "--from", run_dir, "--runs-dir", runs)  # evaluation reads the test split: a usage error
    assert evaluated.code == 2 and "data set 'image_folder' not found" in evaluated.stderr


def _format2_run(run: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a format-2 run, and a data folder holding what its config names (as tests/test_format2_runs.py makes it)."""
    data = Path(shutil.copytree(FORMAT2 / "data", tmp_path / "data"))
    make_mnist_root(data / "mnist", 200, 100)
    runs = Path(shutil.copytree(FORMAT2 / "runs" / run, tmp_path / "runs" / run)).parent
    config = runs / run / "config.yaml"
    config.write_text(config.read_text().replace("/tmp/format2/data", str(data)))
    return runs, data


@pytest.mark.parametrize("run", [AUDIO, TEXT, SEGMENTATION])
def test_a_format_2_checkpoint_rebuilds_from_its_config_and_fitted_state_as_its_test_split_sized_it(run, tmp_path):
    runs, _ = _format2_run(run, tmp_path)
    saved = checkpoints.read(runs / run / "checkpoints" / "last.pt")
    assert saved.format == 2 and saved.network is None
    nowhere = load_config(None, [f"data.root={tmp_path / 'absent'}"], base=saved.config)
    rebuilt = rebuild(saved, nowhere)  # sized without its data
    record = read_trained_run(run, runs)
    trained = load_trained(record, load_config(None, base=record.config), device=CPU, splits=("test",))
    test = trained.split(train=False)
    # what load_trained did before format 3: a network sized from the test split
    cfg, modality = trained.cfg, trained.modality
    before = build_network(cfg, test.sample_shape, method_of(cfg).num_outputs(test), modality.fitted_state(test))
    before.load_state_dict(saved.model)
    inputs = modality.model_input(test.inputs[:4], test)
    with torch.no_grad():
        expected = before.eval()(inputs)
        assert torch.equal(rebuilt(inputs), expected) and torch.equal(trained.network(inputs), expected)
    assert set(DECODING) <= set(trained.fitted) if modality.input_name == "images" else trained.fitted.keys() >= saved.data.keys()


def test_a_format_2_image_checkpoint_without_an_image_size_is_sized_by_its_test_split(tmp_path):
    runs, _ = _format2_run(IMAGE, tmp_path)
    saved = checkpoints.read(runs / IMAGE / "checkpoints" / "last.pt")
    with pytest.raises(UsageError, match="records no input shape") as refused:
        rebuild(saved)  # mnist_sample's 28x28 is in no config: only its data says it
    assert "\n" not in str(refused.value)
    record = read_trained_run(IMAGE, runs)
    trained = load_trained(record, load_config(None, base=record.config), device=CPU, splits=())
    assert trained.split(train=False).sample_shape == (1, 28, 28)
    assert {k: trained.fitted[k] for k in DECODING} == {"image_size": 28, "channels": 1, "resize": "crop", "interpolation": "bilinear"}


def test_older_fitted_states_are_completed_as_their_data_sets_decoded():
    image = modality_named("image")
    old = {"classes": ["a"], "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    for dataset, resize in (("image_folder", "crop"), ("segmentation_folder", "stretch")):
        completed = image.completed_fitted(old, {"image_size": 48, "channels": 3}, DATASETS.get(dataset).meta)
        assert {k: completed[k] for k in DECODING} == {"image_size": 48, "channels": 3, "resize": resize, "interpolation": "bilinear"}
    assert image.input_shape(image.completed_fitted(old, {}, {})) is None  # MNIST-like: the size is the data's
    with pytest.raises(UsageError, match="does not record the image size"):
        image.read([], old)
    text = modality_named("text").completed_fitted({"tokenizer": "{}", "max_length": 8}, {}, {})
    assert (text["truncation"], text["padding"]) == ("right", "right")


def _segmentation_root(root: Path) -> Path:
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("background\nthing\n")
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for path in write_images(root / split / "images", 3, seed=len(split)):
            with Image.open(path) as image:
                mask = rng.integers(0, 2, (image.height, image.width), dtype=np.uint8)
            (root / split / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask, "L").save(root / split / "masks" / path.name)
    return root


def test_reading_images_decodes_as_segmentation_folder_stretches_and_names_a_bad_file(tmp_path):
    root = _segmentation_root(tmp_path / "seg")
    data = DATASETS.build("segmentation_folder", {"image_size": 12, "channels": 1}, root=root, download=False, train=False)
    image = modality_named("image")
    fitted = {"classes": list(data.classes), **image.fitted_state(data)}
    assert (fitted["resize"], fitted["channels"], fitted["image_size"]) == ("stretch", 1, 12)
    read = image.read(sorted((root / "test" / "images").iterdir()), fitted)
    assert torch.equal(read.inputs, data.inputs) and read.sample_shape == (1, 12, 12)
    boxed = image.read([root / "test" / "images" / "0.png"], {**fitted, "resize": "letterbox"})
    assert boxed.inputs.shape == (1, 1, 12, 12)
    assert image.describe_input(read)["resize"] == "stretch"
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    for path in (bad, tmp_path / "missing.png"):
        with pytest.raises(UsageError, match=f"cannot read {path}") as refused:
            image.read([path], fitted)
        assert "\n" not in str(refused.value)


def test_reading_recordings_decodes_as_the_audio_data_set(tmp_path):
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for name in ("a", "b"):
            for i in range(2):  # at 16 kHz, read at 8 kHz: resampled; up to 0.7 s long, kept up to 0.5 s
                write_wav(tmp_path / split / name / f"{i}.wav", tone(300 + 400 * i, rng.uniform(0.2, 0.7), rate=16000), rate=16000)
    options = {"sample_rate": 8000, "clip_seconds": 0.25, "max_seconds": 0.5, "n_mels": 16}
    data = DATASETS.build("audio_folder", options, root=tmp_path, download=False, train=False)
    audio = modality_named("audio")
    fitted = {"classes": list(data.classes), **audio.fitted_state(data)}
    assert fitted["max_samples"] == 4000 and fitted["clip_samples"] == 2000 and "clip_samples" not in fitted["front_end"]
    read = audio.read([p for name in ("a", "b") for p in sorted((tmp_path / "test" / name).iterdir())], fitted)
    assert torch.equal(read.inputs, data.inputs) and read.sample_shape == data.sample_shape == audio.input_shape(fitted)
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    with pytest.raises(UsageError, match=f"cannot read {bad} as audio") as refused:
        audio.read([bad], fitted)
    assert "\n" not in str(refused.value)


def test_reading_texts_encodes_as_the_text_data_set(tmp_path):
    root = make_text_root(tmp_path / "text", per_class=(8, 4))
    options = {"tokenizer": {"vocab_size": 200, "max_length": 8, "truncation": "left"}}
    train = DATASETS.build("text_csv", options, root=root, download=False, train=True)
    text = modality_named("text")
    fitted = {"classes": list(train.classes), **text.fitted_state(train)}
    test = DATASETS.build("text_csv", options, root=root, download=False, train=False, fitted=fitted)  # as evaluation reads it
    read = text.read(list(test.texts), fitted)
    assert torch.equal(read.inputs, test.inputs) and torch.equal(read.cut, test.cut) and bool(read.cut.any())
    assert (fitted["truncation"], fitted["padding"]) == ("left", "right") and text.input_shape(fitted) == (8,)
    with pytest.raises(UsageError, match="reads texts"):
        text.read([tmp_path / "a.txt"], fitted)
