"""Multi-label classification: metrics against scikit-learn, thresholds chosen on the validation split and kept with
the run, the losses, label sets from mnist_scenes and from the user's folders and CSV files, and predict and export
giving each label's probability and the chosen set. Bad label files are one-line errors before any run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from tests.conftest import write_config
from transferctl import recipes
from transferctl.checkpoints import read as read_checkpoint
from transferctl.components import load_components
from transferctl.config import DataConfig
from transferctl.data import load_split
from transferctl.losses import asymmetric, binary_cross_entropy
from transferctl.recipes.export import export_run
from transferctl.tasks.multilabel import average_precision, best_thresholds, class_maps_head, f1_scores

load_components()  # the data sets read directly below

SCENES = """\
method: supervised
task: multilabel
model: {{name: cnn, widths: [8, 16]}}
head: {{name: class_maps}}
optimizer: {{name: adamw, lr: 0.01}}
data: {{name: mnist_scenes, root: {root}, train_scenes: 300, test_scenes: 60, image_size: 32, max_digits: 2,
       batch_size: 32, eval_batch_size: 128, val_fraction: 0.2}}
train: {{max_steps: 20, epochs: 100, log_every: 10, val_every: 100, device: cpu}}
"""


def _scores(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    truth = (torch.rand(200, 4, generator=generator) < torch.tensor([0.5, 0.2, 0.05, 0.0])).float()
    scores = (truth * 0.3 + torch.rand(200, 4, generator=generator)).round(decimals=1)  # ties, as real scores have
    return scores, truth


def test_average_precision_matches_scikit_learn_with_ties_and_a_class_without_positives():
    scores, truth = _scores()
    ap = average_precision(scores, truth)
    for column in range(3):
        assert ap[column].item() == pytest.approx(average_precision_score(truth[:, column], scores[:, column]))
    assert torch.isnan(ap[3])  # no positives: left out of the mean (mAP)


def test_micro_and_macro_f1_match_scikit_learn():
    scores, truth = _scores(1)
    decided = scores >= 0.6
    micro, macro, _ = f1_scores(decided, truth)
    assert micro == pytest.approx(f1_score(truth, decided, average="micro", zero_division=1))
    assert macro == pytest.approx(f1_score(truth, decided, average="macro", zero_division=1))


def test_each_threshold_is_its_class_s_best_f1_on_the_samples_it_was_chosen_on():
    scores, truth = _scores(2)
    thresholds = best_thresholds(scores, truth)
    for column, threshold in enumerate(thresholds[:3]):
        labels, ranked = truth[:, column], scores[:, column]
        best = max(f1_score(labels, ranked >= t, zero_division=1) for t in ranked.unique().tolist())
        assert f1_score(labels, ranked >= threshold, zero_division=1) == pytest.approx(best)
    assert thresholds[3] == 0.5  # a class without positives keeps the default


def test_the_losses_are_cross_entropy_focal_and_asymmetric():
    logits, targets = torch.tensor([[3.0, -3.0, 0.2]]), torch.tensor([[1.0, 0.0, 0.0]])
    assert binary_cross_entropy()(logits, targets) == pytest.approx(F.binary_cross_entropy_with_logits(logits, targets).item())
    focal = binary_cross_entropy(focal_gamma=2.0)(logits, targets)
    assert focal < binary_cross_entropy()(logits, targets)  # the easy decisions count far less
    p = logits.sigmoid()
    clipped = asymmetric(gamma_neg=0.0, gamma_pos=0.0, clip=0.05)(logits, targets)
    expected = -(torch.log(p[0, 0]) + 0.0 + torch.log(1 - (p[0, 2] - 0.05))) / 3  # p(-3) = 0.047 < clip: no loss at all
    assert clipped.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_class_maps_head_pools_each_class_s_scores_from_their_mean_to_their_maximum():
    torch.manual_seed(0)
    maps = [torch.randn(3, 8, 16, 16), torch.randn(3, 16, 4, 4)]  # only the deepest is read
    soft, hard = class_maps_head((8, 16), 5, sharpness=1e-3), class_maps_head((8, 16), 5, sharpness=100.0)
    hard.load_state_dict(soft.state_dict())
    per_place = torch.einsum("nchw,kc->nkhw", maps[-1], soft.classify.weight[:, :, 0, 0]) + soft.classify.bias[:, None, None]
    linear_on_mean = maps[-1].mean((2, 3)) @ soft.classify.weight[:, :, 0, 0].T + soft.classify.bias
    assert torch.allclose(soft(maps), linear_on_mean, atol=1e-2)  # near 0: the linear head on average-pooled features
    assert torch.allclose(hard(maps), per_place.amax((2, 3)), atol=0.03)  # large: the best place decides


def test_mnist_scenes_gives_the_set_of_digits_present(digits_root):
    data = load_split(
        DataConfig(name="mnist_scenes", root=str(digits_root), train_scenes=50, test_scenes=10), True, target_kind="class_set"
    )
    masks = load_split(DataConfig(name="mnist_scenes", root=str(digits_root), train_scenes=50, test_scenes=10), True)
    assert data.target_kind == "class_set" and data.targets.shape == (50, 10)
    for row, mask in zip(data.targets, masks.targets, strict=True):  # the same composition: the mask's classes are the set
        present = {int(c) - 1 for c in mask.unique() if 0 < c < 255}
        assert present <= set(row.nonzero().flatten().tolist())


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, digits_root) -> Path:
    """A small multi-label run on mnist_scenes, its evaluation and its export."""
    folder = tmp_path_factory.mktemp("multilabel")
    config = write_config(folder / "scenes.yaml", SCENES.format(root=digits_root))
    run = recipes.pretrain(config, runs_dir=folder / "runs").run_dir
    export_run(str(run), ["torchscript", "onnx"], runs_dir=folder / "runs")
    return run


def test_thresholds_are_fitted_on_the_validation_split_and_evaluation_uses_them(tagged):
    checkpoint = read_checkpoint(tagged / "checkpoints" / "last.pt")
    thresholds = checkpoint.task["thresholds"]
    assert len(thresholds) == 10 and any(t != 0.5 for t in thresholds)
    result = recipes.evaluate(str(tagged), runs_dir=tagged.parent)
    assert set(result.metrics) >= {"map", "f1_micro", "f1_macro"} and 0 < result.metrics["map"] <= 1
    per_class = json.loads((result.run_dir / "per_class.json").read_text())["classes"]
    assert [c["threshold"] for c in per_class.values()] == thresholds


def test_predict_gives_each_labels_probability_and_the_chosen_set_from_the_run_and_its_export(tagged, tmp_path):
    test = load_split(_scenes_config(tagged), False, target_kind="class_set")
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(test.inputs[i, 0].numpy()).save(files[-1])
    from_run = recipes.predict(str(tagged), files, runs_dir=tagged.parent)
    from_export = recipes.predict(tagged / "export", files)
    thresholds = read_checkpoint(tagged / "checkpoints" / "last.pt").task["thresholds"]
    for record in from_run:
        assert list(record["scores"]) == list(test.classes)
        chosen = {c for c, t in zip(test.classes, thresholds, strict=True) if record["scores"][c] >= t}
        assert set(record["labels"]) == chosen
    assert [r["labels"] for r in from_export] == [r["labels"] for r in from_run]
    card = json.loads((tagged / "export" / "model_card.json").read_text())
    assert card["kind"] == "multilabel_classifier" and list(card["thresholds"].values()) == thresholds
    assert card["parity"]["onnx"]["passed"]  # log-sum-exp pooling of the class maps inside the graph


def _scenes_config(run: Path) -> DataConfig:
    import yaml

    return DataConfig(**yaml.safe_load((run / "config.yaml").read_text())["data"])


# --------------------------------------------------------------------------- the user's own label sets


def _image_folder(root: Path, rows: dict[str, dict[str, str]]) -> Path:
    """<root>/<split>/<file>.png and <root>/<split>/labels.csv from {split: {file: labels}}."""
    for split, labels in rows.items():
        folder = root / split
        folder.mkdir(parents=True)
        for i, name in enumerate(labels):
            Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(folder / name)
        (folder / "labels.csv").write_text("file,labels\n" + "".join(f"{name},{value}\n" for name, value in labels.items()))
    return root


def test_an_image_folder_with_a_labels_file_gives_label_sets(tmp_path):
    root = _image_folder(tmp_path / "pics", {"train": {"a.png": "cat|dog", "b.png": "dog", "c.png": ""}, "test": {"d.png": "cat"}})
    cfg = DataConfig(name="image_folder", root=str(root), labels_file="labels.csv", image_size=8)
    train, test = load_split(cfg, True, target_kind="class_set"), load_split(cfg, False, target_kind="class_set")
    assert train.classes == test.classes == ("cat", "dog")
    assert train.targets.tolist() == [[1, 1], [0, 1], [0, 0]] and test.targets.tolist() == [[1, 0]]


def test_a_text_csv_label_column_holds_label_sets(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngoal scored,sports\nvote and match,politics|sports\nrain,\n")
    (tmp_path / "test.csv").write_text("text,label\nelection,politics\n")
    cfg = DataConfig(name="text_csv", root=str(tmp_path), tokenizer={"kind": "wordpiece", "vocab_size": 100})
    train = load_split(cfg, True, target_kind="class_set")
    assert train.classes == ("politics", "sports") and train.targets.tolist() == [[0, 1], [1, 1], [0, 0]]


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ({"train": {"a.png": "cat"}, "test": {"b.png": "cow"}}, [], "test/labels.csv line 2: label 'cow' is not one of the classes (cat)"),
        (
            {"train": {"a.png": "cat"}, "test": {"b.png": "cat"}},
            ["task.allow_empty=false", "data.labels_file=missing.csv"],
            "no labels file",
        ),
        ({"train": {"a.png": "cat", "b.png": ""}, "test": {"c.png": "cat"}}, ["task.allow_empty=false"], "task.allow_empty is false"),
    ],
)
def test_bad_label_sets_are_one_line_errors_before_a_run(tmp_path, cli, rows, extra, message):
    root = _image_folder(tmp_path / "pics", rows)
    config = write_config(
        tmp_path / "c.yaml",
        f"method: supervised\ntask: multilabel\nmodel: {{name: cnn, widths: [8]}}\n"
        f"data: {{name: image_folder, root: {root}, labels_file: labels.csv, image_size: 8, val_fraction: 0}}\n"
        f"train: {{max_steps: 1, device: cpu}}\n",
    )
    runs = tmp_path / "runs"
    result = cli("pretrain", "-c", config, *extra, "--runs-dir", runs)
    if "cow" in message:  # the test split is read by evaluate
        assert result.code == 0, result.stderr
        result = cli("evaluate", "--from", result.stdout.strip().splitlines()[-1], "--runs-dir", runs)
    assert result.code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_audio_folder_with_a_labels_file_gives_label_sets(tmp_path):
    import soundfile

    for split, rows in {"train": {"a.wav": "bird|rain", "b.wav": "rain"}, "test": {"c.wav": "bird"}}.items():
        (tmp_path / split).mkdir()
        for i, name in enumerate(rows):
            soundfile.write(tmp_path / split / name, np.sin(np.arange(1600) * (i + 1) / 10).astype(np.float32), 16000)
        (tmp_path / split / "labels.csv").write_text("file,labels\n" + "".join(f"{n},{v}\n" for n, v in rows.items()))
    cfg = DataConfig(name="audio_folder", root=str(tmp_path), labels_file="labels.csv")
    train, test = load_split(cfg, True, target_kind="class_set"), load_split(cfg, False, target_kind="class_set")
    assert train.classes == test.classes == ("bird", "rain") and train.target_kind == "class_set"
    assert train.targets.tolist() == [[1, 1], [0, 1]] and test.targets.tolist() == [[1, 0]]
