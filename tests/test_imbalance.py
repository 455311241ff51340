"""Imbalanced classes: the long-tailed split, class-balanced sampling, class weights in the loss, and the metrics that
say the truth on such data (balanced accuracy, macro F1, checked against scikit-learn). Bad settings are one-line
errors before any run."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from tests.conftest import write_config
from transferctl import build
from transferctl.config import load_config
from transferctl.data.datasets import long_tailed_subset
from transferctl.data.pipeline import balanced_order
from transferctl.losses import cross_entropy
from transferctl.tasks.classification import confusion_scores

SUPERVISED = """\
method: supervised
model: {{name: cnn, widths: [8, 16]}}
optimizer: {{name: adamw, lr: 0.003}}
data: {{name: mnist, root: {root}, batch_size: 32, eval_batch_size: 256}}
train: {{epochs: 1, max_steps: 2, log_every: 1, device: cpu}}
"""


def test_a_long_tailed_split_keeps_n_max_times_ratio_to_the_minus_i_over_c_minus_1():
    labels = torch.arange(5).repeat_interleave(100)  # 100 of each of 5 classes
    kept = labels[long_tailed_subset(labels, 5, 100.0, seed=0)]
    assert torch.bincount(kept).tolist() == [100, 31, 10, 3, 1]  # 100 * 100^(-i/4), floored
    assert torch.equal(long_tailed_subset(labels, 5, 100.0, seed=0), long_tailed_subset(labels, 5, 100.0, seed=0))
    assert not torch.equal(long_tailed_subset(labels, 5, 10.0, seed=0), long_tailed_subset(labels, 5, 10.0, seed=1))


def test_balanced_sampling_draws_every_class_about_equally_often():
    labels = torch.cat([torch.zeros(900), torch.ones(90), torch.full((10,), 2)]).long()
    drawn = labels[balanced_order(labels, seed=0, epoch=0)]
    assert len(drawn) == len(labels)
    shares = torch.bincount(drawn, minlength=3).double() / len(drawn)
    assert torch.allclose(shares, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.05)
    assert not torch.equal(balanced_order(labels, 0, 0), balanced_order(labels, 0, 1))  # a new draw each epoch


def test_balanced_class_weights_are_inverse_to_the_class_shares():
    loss = cross_entropy(class_weights="balanced", class_counts=torch.tensor([80, 20, 0]))
    assert loss.weight.tolist() == pytest.approx([100 / (3 * 80), 100 / (3 * 20), 0.0])
    given = cross_entropy(class_weights=[1.0, 2.0, 3.0], class_counts=torch.tensor([1, 1, 1]))
    assert given.weight.tolist() == [1.0, 2.0, 3.0]
    assert cross_entropy().weight is None


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_and_macro_f1_match_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (300,), generator=generator)
    truth[truth == 3] = 0  # class 3 never true ...
    predicted = torch.where(torch.rand(300, generator=generator) < 0.6, truth, torch.randint(0, 5, (300,), generator=generator))
    predicted[predicted == 4] = 3  # ... but predicted; class 4 neither
    confusion = torch.bincount(truth * 5 + predicted, minlength=25).view(5, 5)
    _, balanced, f1 = confusion_scores(confusion)
    assert balanced == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert f1 == pytest.approx(f1_score(truth, predicted, average="macro"))


def test_an_imbalanced_run_trains_with_weights_and_the_balanced_sampler(tmp_path, digits_root):
    config = write_config(tmp_path / "s.yaml", SUPERVISED.format(root=digits_root))
    cfg = load_config(config, ["data.imbalance=10", "loss.class_weights=balanced", "data.sampler=balanced"])
    training = build.build_training(cfg)
    counts = torch.bincount(torch.cat([training.train.targets, training.val.targets.cpu()]), minlength=10)
    assert counts[0] > 5 * counts[9]  # long-tailed before the val cut
    train_counts = torch.bincount(training.train.targets, minlength=10)  # the training split's own counts weigh the loss
    assert training.objective.criterion.weight.tolist() == pytest.approx((train_counts.sum() / (10 * train_counts)).tolist())
    assert training.pipeline.balanced
    rows = training.objective.validate(training.val, 256, training.network)
    assert {"val_balanced_accuracy", "val_f1_macro"} <= set(rows)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.class_weights=[1, 2]"], "loss.class_weights: 2 weights for 10 classes; give one per class"),
        (["data.sampler=balanced", "data.labels_per_class=5"], "data.labels_per_class already gives every class the same count"),
        (["data.imbalance=10", "data.pipeline=stream"], "data.imbalance: it draws from the whole split"),
        (["data.imbalance=0.5"], "data.imbalance: Input should be greater than or equal to 1"),
        (["data.sampler=uniform"], "data.sampler: Input should be 'random' or 'balanced'"),
    ],
)
def test_bad_balancing_settings_are_one_line_errors_before_a_run(tmp_path, digits_root, cli, overrides, message):
    config = write_config(tmp_path / "s.yaml", SUPERVISED.format(root=digits_root))
    result = cli("pretrain", "-c", config, *overrides, "--runs-dir", tmp_path / "runs")
    assert result.code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
