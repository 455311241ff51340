"""Fine-tuning options do what they claim: head warm-up, encoder LR scale, L2-SP, unlabeled pseudo-labels (with their
labels-only warm-up and the comparison with a labels-only head that a run that ends below it reports), weight
averaging."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL_SIMCLR, write_config
from transferctl import build
from transferctl.config import DataConfig, load_config
from transferctl.data import NO_LABEL, BatchAugment, load_split, load_unlabeled, split_train_val
from transferctl.data.pipeline import UnlabeledStream
from transferctl.engine.averaging import WeightAverage
from transferctl.engine.evaluate import embed
from transferctl.errors import ConfigError
from transferctl.methods.finetune.labels_only import logistic_regression
from transferctl.methods.finetune.propagation import propagate_labels
from transferctl.methods.finetune.pseudo_labels import PseudoLabels
from transferctl.methods.finetune.weight_anchor import WeightAnchor
from transferctl.methods.supervised import TaskObjective
from transferctl.modalities import modality_named
from transferctl.recipes import finetune, finetune_config, pretrain
from transferctl.tasks.classification import classify

IMAGE = modality_named("image")

FEW_LABELS = ["data.labels_per_class=5", "data.batch_size=16", "train.device=cpu", "finetune.head_warmup_steps=0"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, digits_root) -> Path:
    """A small SimCLR run to fine-tune from (made once for this module)."""
    folder = tmp_path_factory.mktemp("source")
    config = write_config(folder / "simclr.yaml", SMALL_SIMCLR.format(root=digits_root))
    return pretrain(config, ["train.max_steps=6"], runs_dir=folder / "runs").run_dir


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def encoder_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Squared distance over trainable weights (batch-norm running statistics move either way)."""
    return sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in a if a[k].is_floating_point() and "running" not in k)


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tune(source: Path, tmp_path: Path, *overrides: str) -> Path:
    return finetune(str(source), None, [*FEW_LABELS, *overrides], runs_dir=tmp_path / "runs").run_dir


# --------------------------------------------------------------------------- head warm-up and LR scale


def test_during_head_warmup_the_encoder_and_its_statistics_stay_pretrained(source, tmp_path):
    warm = weights(tune(source, tmp_path, "train.max_steps=4", "finetune.head_warmup_steps=4"))
    pre, tuned = encoder_of(weights(source)), encoder_of(warm)
    assert all(torch.equal(pre[k], tuned[k]) for k in pre)  # weights and batch-norm running statistics
    torch.manual_seed(0)  # the seed the run's head was initialised with
    cfg = finetune_config(str(source), None, [*FEW_LABELS, "finetune.head_warmup_steps=4"])
    initial_head = build.build_network(cfg, (1, 28, 28), 10).head.state_dict()
    assert not torch.equal(warm["head.2.weight"], initial_head["2.weight"])  # the head trained meanwhile


def test_after_head_warmup_the_encoder_trains(source, tmp_path):
    tuned = encoder_of(weights(tune(source, tmp_path, "train.max_steps=6", "finetune.head_warmup_steps=4")))
    pre = encoder_of(weights(source))
    assert not torch.equal(pre["0.weight"], tuned["0.weight"])


def test_encoder_lr_scale_sets_the_encoder_groups_learning_rate(source, digits_root):
    cfg = finetune_config(str(source), None, [*FEW_LABELS, "optimizer.lr=0.2", "finetune.encoder_lr_scale=0.1"])
    training = build.build_training(cfg)
    groups = training.optimizer.param_groups
    encoder_ids = {id(p) for p in training.network.encoder.parameters()}
    rates = {
        ("encoder" if id(g["params"][0]) in encoder_ids else "head", round(g["initial_lr"], 9)) for g in groups
    }  # before warm-up scaling
    assert rates == {("encoder", 0.02), ("head", 0.2)}


def test_encoder_lr_scale_zero_leaves_the_encoder_weights_alone(source, tmp_path):
    pre = encoder_of(weights(source))
    tuned = encoder_of(weights(tune(source, tmp_path, "train.max_steps=3", "finetune.encoder_lr_scale=0")))
    assert all(torch.equal(pre[k], tuned[k]) for k in pre if "running" not in k and "num_batches" not in k)


# --------------------------------------------------------------------------- L2-SP


def test_l2_sp_keeps_the_encoder_closer_to_its_pretrained_weights(source, tmp_path):
    pre = encoder_of(weights(source))
    steps = ["train.max_steps=8", "optimizer.lr=0.1", "finetune.encoder_lr_scale=1"]
    free = distance(encoder_of(weights(tune(source, tmp_path, *steps))), pre)
    held = distance(encoder_of(weights(tune(source, tmp_path, *steps, "finetune.l2_sp=1"))), pre)
    assert 0 < held < 0.5 * free


def test_l2_sp_replaces_the_encoders_weight_decay(source):
    cfg = finetune_config(str(source), None, [*FEW_LABELS, "finetune.l2_sp=0.1", "optimizer.weight_decay=0.01"])
    training = build.build_training(cfg)
    groups = training.optimizer.param_groups
    encoder_ids = {id(p) for p in training.network.encoder.parameters()}
    decays = {("encoder" if id(g["params"][0]) in encoder_ids else "head", g["weight_decay"]) for g in groups}
    assert ("encoder", 0.0) in decays and ("encoder", 0.01) not in decays and ("head", 0.01) in decays


def test_weight_anchor_penalty_is_zero_at_the_anchor_and_grows_with_distance():
    layer = torch.nn.Linear(3, 2)
    anchor = WeightAnchor.toward(layer, {k: v.clone() for k, v in layer.state_dict().items()}, strength=2.0)
    assert anchor.penalty().item() == 0.0
    with torch.no_grad():
        layer.weight += 1.0
    assert anchor.penalty().item() == pytest.approx(0.5 * 2.0 * 6)  # six weights, each moved by 1


def test_l2_sp_without_pretrained_weights_is_a_config_error(cli, tmp_path, digits_root):
    config = write_config(tmp_path / "ft.yaml", f"method: finetune\ndata: {{name: mnist, root: {digits_root}}}\n")
    result = cli("finetune", "-c", config, "finetune.l2_sp=0.1", "--runs-dir", tmp_path / "runs")
    assert result.code == 2 and "finetune.l2_sp" in result.stderr and "--from" in result.stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- unlabeled images


def test_the_unlabeled_pool_is_the_training_part_without_labels(digits_root):
    cfg = DataConfig(name="mnist", root=str(digits_root), val_fraction=0.2, seed=3)
    pool = load_unlabeled(cfg)
    full = load_split(cfg, train=True)
    train_idx, val_idx = split_train_val(len(full), 0.2, 3)
    assert len(pool) == len(train_idx) and torch.equal(pool.inputs, full.inputs[train_idx])
    assert (pool.targets == NO_LABEL).all()
    assert {bytes(i.numpy()) for i in pool.inputs}.isdisjoint({bytes(i.numpy()) for i in full.inputs[val_idx]})


def test_unlabeled_batches_are_a_pure_function_of_the_step(digits_root):
    pool = load_unlabeled(DataConfig(name="mnist", root=str(digits_root)))
    strong = BatchAugment(crop_scale=(0.3, 1.0), rotation=20, brightness=0.4)
    make = lambda: UnlabeledStream(pool, BatchAugment(), strong, IMAGE, batch_size=32, seed=0)
    a, b = make(), make()
    weak5, strong5, index5 = a.batch(5)
    a.batch(6)
    assert all(torch.equal(x, y) for x, y in zip((weak5, strong5, index5), b.batch(5), strict=True))  # no hidden state
    assert torch.allclose(weak5, IMAGE.model_input(pool.inputs[index5], pool))  # the index says which images
    assert not torch.equal(weak5, a.batch(6)[0])
    assert not torch.equal(weak5, strong5)
    per_epoch = len(pool) // 32
    seen = torch.cat([a.batch(s)[0].flatten(1) for s in range(per_epoch)])
    assert len(torch.unique(seen, dim=0)) == per_epoch * 32  # an epoch draws every image at most once


def test_pseudo_labels_count_only_confident_predictions(digits_root):
    pool = load_unlabeled(DataConfig(name="mnist", root=str(digits_root)))
    stream = UnlabeledStream(pool, BatchAugment(), BatchAugment(), IMAGE, batch_size=16, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    assert PseudoLabels(stream, 1.0, threshold=1.0).loss(model, 0).item() == 0.0  # nothing is that sure
    assert PseudoLabels(stream, 1.0, threshold=0.0).loss(model, 0).item() > 0.0
    assert PseudoLabels(stream, 2.0, threshold=0.0).loss(model, 0).item() == pytest.approx(
        2 * PseudoLabels(stream, 1.0, threshold=0.0).loss(model, 0).item()
    )


def test_pseudo_labels_count_what_they_keep_until_the_counts_are_taken(digits_root):
    pool = load_unlabeled(DataConfig(name="mnist", root=str(digits_root)))
    stream = UnlabeledStream(pool, BatchAugment(), BatchAugment(), IMAGE, batch_size=16, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        confidence = model(stream.batch(0)[0]).softmax(dim=1).max(dim=1).values
    threshold = confidence.median().item()
    labels = PseudoLabels(stream, 1.0, threshold=threshold)
    labels.loss(model, 0)
    labels.loss(model, 0)
    passed, seen = labels.take_counts()
    assert (float(passed), seen) == (2.0 * (confidence >= threshold).sum().item(), 32)
    assert labels.take_counts() == (0.0, 0)  # taking them starts the count again


def test_alignment_hands_the_less_favoured_class_its_share_of_pseudo_labels(digits_root):
    pool = load_unlabeled(DataConfig(name="mnist", root=str(digits_root)))
    stream = UnlabeledStream(pool, BatchAugment(), BatchAugment(), IMAGE, batch_size=4, seed=0)
    leaning = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])  # every image leans to class 0
    assert PseudoLabels(stream, 1.0, 0.0).targets(leaning)[1].tolist() == [0, 0, 0, 0]
    confidence, targets = PseudoLabels(stream, 1.0, 0.0, class_shares=torch.tensor([0.5, 0.5])).targets(leaning)
    assert targets.tolist() == [0, 0, 1, 1]  # the batch now splits as the labelled images do
    assert confidence[0].item() == pytest.approx(0.75)  # 0.9 * (0.5/0.75) vs 0.1 * (0.5/0.25), renormalised


def test_alignment_takes_its_class_shares_from_the_labelled_images(source):
    semi = ["finetune.unlabeled.weight=1", "finetune.unlabeled.batch_size=32"]
    plain = build.build_training(finetune_config(str(source), None, [*FEW_LABELS, *semi])).objective
    assert plain.pseudo_labels.class_shares is None
    training = build.build_training(finetune_config(str(source), None, [*FEW_LABELS, *semi, "finetune.unlabeled.align=true"]))
    shares = training.objective.pseudo_labels.class_shares
    expected = torch.bincount(training.train.targets, minlength=10).float() / len(training.train)
    assert torch.allclose(shares, expected) and shares.sum().item() == pytest.approx(1.0)


def test_unlabeled_images_are_loaded_only_when_asked_for(source, tmp_path):
    semi = ["finetune.unlabeled.weight=1", "finetune.unlabeled.threshold=0", "finetune.unlabeled.batch_size=32"]
    assert build.build_training(finetune_config(str(source), None, FEW_LABELS)).data.unlabeled is None
    training = build.build_training(finetune_config(str(source), None, [*FEW_LABELS, *semi]))
    pool = load_unlabeled(training.cfg.data)
    assert len(training.train) == 50 and torch.equal(training.data.unlabeled.inputs, pool.inputs)
    assert (training.data.unlabeled.targets == NO_LABEL).all()
    plain = tune(source, tmp_path, "train.max_steps=3")
    tuned = tune(source, tmp_path, "train.max_steps=3", *semi)
    assert not torch.equal(weights(plain)["head.2.weight"], weights(tuned)["head.2.weight"])  # standardize, dropout, linear
    assert all("pseudo_label_rate" not in row for row in metric_rows(plain))
    assert [row["pseudo_label_rate"] for row in metric_rows(tuned)] == [1.0] * len(metric_rows(tuned))  # threshold 0 keeps all


@pytest.mark.parametrize("propagate", [False, True])
def test_a_semi_supervised_finetune_resumes_exactly(source, tmp_path, propagate):
    from transferctl.recipes import resume

    semi = [
        "finetune.unlabeled.weight=1",
        "finetune.unlabeled.threshold=0.2",
        "finetune.unlabeled.batch_size=32",
        "scheduler.name=constant",
        f"finetune.unlabeled.propagate={propagate}",
    ]  # constant: cosine would stretch
    whole = finetune(str(source), None, [*FEW_LABELS, *semi, "train.max_steps=7"], runs_dir=tmp_path / "whole").run_dir
    part = finetune(str(source), None, [*FEW_LABELS, *semi, "train.max_steps=4"], runs_dir=tmp_path / "part").run_dir
    resume(str(part), ["train.max_steps=7"], command="finetune", runs_dir=tmp_path / "part")
    a, b = weights(whole), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_strong_augmentation_is_a_component_with_did_you_mean(source):
    cfg = finetune_config(str(source), None, ["finetune.unlabeled.augment.rotation=25"])
    assert cfg.finetune.unlabeled.augment.name == "simclr" and cfg.finetune.unlabeled.augment.options["rotation"] == 25
    expected = r"finetune\.unlabeled\.augment\.rotaton: unknown option for finetune\.unlabeled\.augment 'simclr'; did you mean 'rotation'\?"
    with pytest.raises(ConfigError, match=expected):
        finetune_config(str(source), None, ["finetune.unlabeled.augment.rotaton=25"])


def test_a_frozen_encoder_stays_frozen_after_the_head_warmup(source, tmp_path):
    probe = tune(source, tmp_path, "train.max_steps=4", "finetune.freeze_encoder=true", "finetune.head_warmup_steps=2")
    pre, probed = encoder_of(weights(source)), encoder_of(weights(probe))
    assert all(torch.equal(pre[k], probed[k]) for k in pre)


def test_pretraining_configs_carry_no_unlabeled_augmentation(source):
    cfg = load_config(None, [], base=_config_of(source))
    assert cfg.finetune.unlabeled.augment is None


def _config_of(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_from_scratch_the_encoder_trains_at_full_rate_from_the_first_step(tmp_path, digits_root):
    """The LR scale and the head warm-up protect pretrained features: a random encoder has none to protect,
    so the from-scratch baseline is not handicapped by them."""
    config = write_config(
        tmp_path / "ft.yaml",
        f"""\
method: finetune
model: {{name: cnn, widths: [8, 16]}}
data: {{name: mnist, root: {digits_root}, labels_per_class: 5, batch_size: 16}}
train: {{max_steps: 2, device: cpu}}
finetune: {{encoder_lr_scale: 0.1, head_warmup_steps: 50}}
""",
    )
    training_parts = build.build_training(load_config(config))
    assert {round(g["initial_lr"], 9) for g in training_parts.optimizer.param_groups} == {load_config(config).optimizer.options["lr"]}
    assert training_parts.objective.head_warmup_steps == 0


def test_an_unlabeled_batch_that_does_not_split_over_processes_is_refused_before_the_run_exists(cli, source, tmp_path, monkeypatch):
    from transferctl.distributed import World

    monkeypatch.setattr(build, "world", lambda: World(rank=0, size=2))
    result = cli(
        "finetune", "--from", source, "finetune.unlabeled.weight=1", "finetune.unlabeled.batch_size=33", "--runs-dir", tmp_path / "runs"
    )
    assert result.code == 2 and "finetune.unlabeled.batch_size: 33" in result.stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- weight averaging (train.ema_decay)


def test_weight_average_follows_the_warmed_up_decay_and_copies_counters():
    live = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        live[0].weight.fill_(0.0)
    average = WeightAverage(live, decay=0.5)
    expected = 0.0
    for step, value in enumerate([1.0, 3.0, -2.0, 5.0]):
        with torch.no_grad():
            live[0].weight.fill_(value)
        live[1].num_batches_tracked += 1
        decay = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.18, 0.25, then capped at 0.5
        expected = decay * expected + (1 - decay) * value
        average.update()
        assert average.network[0].weight.item() == pytest.approx(expected)
    assert average.network[1].num_batches_tracked.item() == 4
    assert live[0].weight.item() == 5.0 and not average.network[0].weight.requires_grad


def test_weight_average_moves_a_tied_tensor_once_a_step():
    """A head tied to the encoder's token table (mlm, electra) lists the table under two names: one update each."""
    embedding = torch.nn.Embedding(3, 2)
    live = torch.nn.ModuleDict({"encoder": embedding, "head": torch.nn.ModuleDict({"tied": embedding})})
    with torch.no_grad():
        embedding.weight.fill_(0.0)
    average = WeightAverage(live, decay=0.5)
    with torch.no_grad():
        embedding.weight.fill_(1.0)
    average.update()  # decay 0.1 on the first update: 0.9 of the way to the live weights, once
    assert average.network["encoder"].weight[0, 0].item() == pytest.approx(0.9)
    assert average.network["head"]["tied"].weight is average.network["encoder"].weight


def test_the_weight_average_is_what_a_run_validates_and_saves(source, tmp_path):
    options = ["train.max_steps=6", "train.ema_decay=0.9"]
    run = tune(source, tmp_path, *options)
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["training"]["averaged_steps"] == 6
    assert not torch.equal(checkpoint["model"]["head.2.weight"], checkpoint["training"]["trained_model"]["head.2.weight"])
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(best[k], checkpoint["model"][k]) for k in best)
    training = build.build_training(finetune_config(str(source), None, [*FEW_LABELS, *options]))
    training.network.load_state_dict(checkpoint["model"])
    last_row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    scored = classify(training.network, training.val, 256)
    assert (scored.accuracy, scored.loss) == pytest.approx((last_row["val_accuracy"], last_row["val_loss"]), rel=1e-6)
    training.network.load_state_dict(checkpoint["training"]["trained_model"])
    assert classify(training.network, training.val, 256).loss != pytest.approx(last_row["val_loss"], rel=1e-6)


# --------------------------------------------------------------------------- label propagation


def _clusters(centres: torch.Tensor, per_cluster: int, spread: float = 0.05) -> torch.Tensor:
    """L2-normalised points scattered tightly around each of `centres` (rows), cluster after cluster."""
    generator = torch.Generator().manual_seed(0)
    points = centres.repeat_interleave(per_cluster, dim=0)
    return torch.nn.functional.normalize(points + spread * torch.randn(points.shape, generator=generator), dim=1)


def test_propagated_labels_follow_the_feature_graph_and_stop_where_it_ends():
    centres = torch.eye(3)  # three clusters far apart: 90 degrees
    pool = _clusters(centres, 8)
    labelled = _clusters(centres[:2], 1, spread=0.0)  # one labelled image in each of the first two clusters
    probabilities = propagate_labels(labelled, torch.tensor([1, 0]), pool, num_classes=2, neighbours=3)
    assert probabilities.argmax(1)[:16].tolist() == [1] * 8 + [0] * 8
    assert (probabilities[:16].max(1).values > 0.99).all()
    assert torch.equal(probabilities[16:], torch.full((8, 2), 0.5))  # no label reaches the third cluster
    assert torch.allclose(probabilities.sum(1), torch.ones(24))
    in_blocks = propagate_labels(labelled, torch.tensor([1, 0]), pool, num_classes=2, neighbours=3, block_elements=3 * 26)
    assert torch.allclose(in_blocks, probabilities)  # the similarity search, 3 rows at a time, finds the same graph


def test_a_prior_moves_the_pseudo_label_to_where_model_and_prior_agree(digits_root):
    pool = load_unlabeled(DataConfig(name="mnist", root=str(digits_root)))
    labels = PseudoLabels(UnlabeledStream(pool, BatchAugment(), BatchAugment(), IMAGE, batch_size=4, seed=0), 1.0, 0.0)
    model = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    prior = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    confidence, targets = labels.targets(model, prior)
    assert targets.tolist() == [1, 0]  # 0.12 vs 0.32 for the first; an even prior changes nothing
    assert confidence.tolist() == pytest.approx([0.32 / 0.44, 0.9])
    assert labels.targets(model)[1].tolist() == [0, 0]


def test_propagation_runs_on_the_starting_encoder_also_when_resuming(source):
    semi = ["finetune.unlabeled.weight=1", "finetune.unlabeled.batch_size=32"]
    plain = build.build_training(finetune_config(str(source), None, [*FEW_LABELS, *semi])).objective
    plain.prepare()
    assert plain.pseudo_labels.prior is None  # off unless asked for
    cfg = finetune_config(str(source), None, [*FEW_LABELS, *semi, "finetune.unlabeled.propagate=true"])
    fresh = build.build_training(cfg)
    assert fresh.objective.pseudo_labels.prior is None  # not before prepare(), which config check never calls
    fresh.objective.prepare()
    prior = fresh.objective.pseudo_labels.prior
    assert prior.shape == (len(fresh.data.unlabeled), 10) and torch.allclose(prior.sum(1), torch.ones(len(prior)))
    resuming = build.build_training(cfg, load_weights=False)  # a resume builds a random encoder, then loads its checkpoint
    resuming.objective.prepare()
    assert torch.allclose(resuming.objective.pseudo_labels.prior, prior, atol=1e-5)
    random_labelled, random_pool = (embed(resuming.network.encoder, d, 256) for d in (resuming.train, resuming.data.unlabeled))
    from_random = propagate_labels(random_labelled, resuming.train.targets, random_pool, 10)
    assert not torch.allclose(from_random, prior, atol=1e-3)  # so the resumed run did not use its random encoder


# --------------------------------------------------------------------------- few labels that cannot quietly fail

SEMI = ["finetune.unlabeled.weight=1", "finetune.unlabeled.threshold=0.5", "finetune.unlabeled.batch_size=32", "train.max_steps=12"]


def test_the_labels_only_head_is_scikit_learns_logistic_regression_on_standardized_features():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(20)
    features = torch.randn(60, 5, generator=generator) + 1.5 * torch.nn.functional.one_hot(labels, 5).float()
    new = torch.randn(40, 5, generator=generator)
    head = logistic_regression(features, labels, 3)
    scaler = StandardScaler().fit(features.numpy())
    reference = LogisticRegression(C=1.0, max_iter=1000, tol=1e-8).fit(scaler.transform(features.numpy()), labels.numpy())
    expected = reference.predict_proba(scaler.transform(new.numpy()))
    assert head(new).softmax(1).numpy() == pytest.approx(expected, abs=2e-3)


def test_pseudo_labels_wait_for_the_warm_up(source, tmp_path, monkeypatch):
    drawn: list[int] = []
    original = PseudoLabels.loss
    monkeypatch.setattr(PseudoLabels, "loss", lambda self, forward, step: drawn.append(step) or original(self, forward, step))
    batches: list[int] = []
    stream_batch = UnlabeledStream.batch
    monkeypatch.setattr(UnlabeledStream, "batch", lambda self, step: batches.append(step) or stream_batch(self, step))
    finetune(str(source), None, [*FEW_LABELS, *SEMI, "finetune.unlabeled.warmup_steps=8"], runs_dir=tmp_path / "runs")
    assert drawn == list(range(12)) and batches == [8, 9, 10, 11]  # no unlabeled batch is even read before step 8


@pytest.fixture(scope="module")
def badly_started(source, tmp_path_factory) -> Path:
    """A fine-tune whose first 8 steps teach class c as c + 1 (a head confidently wrong when pseudo-labels start)."""
    original = TaskObjective.loss

    def rotated(self, batch, step):
        if step < 8:
            batch = replace(batch, targets=(batch.targets + 1) % 10)
        return original(self, batch, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskObjective, "loss", rotated)
        overrides = [*FEW_LABELS, *SEMI, "finetune.unlabeled.warmup_steps=8", "optimizer.lr=0.1"]
        return finetune(str(source), None, overrides, runs_dir=tmp_path_factory.mktemp("bad") / "runs").run_dir


def test_a_run_that_ends_below_its_labels_alone_says_so(badly_started):
    check = json.loads((badly_started / "summary.json").read_text())["unlabeled_check"]
    assert check["verdict"] == "hurt"
    assert check["held_out"]["finetuned"] < check["held_out"]["labels_only"] and check["held_out"]["samples"] == 60
    assert check["labelled"]["samples"] == 50
    log = (badly_started / "log.txt").read_text()
    assert log.count("warning: the fine-tune with unlabeled data ends below what its labels alone give") == 1


def test_a_run_that_learns_from_its_labels_is_not_flagged(source, tmp_path):
    longer = [*FEW_LABELS, *SEMI, "finetune.unlabeled.warmup_steps=8", "train.max_steps=40"]
    run = finetune(str(source), None, longer, runs_dir=tmp_path / "runs").run_dir
    check = json.loads((run / "summary.json").read_text())["unlabeled_check"]
    assert check["verdict"] != "hurt" and "warning" not in check
    plain = finetune(str(source), None, [*FEW_LABELS, "train.max_steps=2"], runs_dir=tmp_path / "runs").run_dir
    assert "unlabeled_check" not in json.loads((plain / "summary.json").read_text())  # no unlabeled data, nothing to check
