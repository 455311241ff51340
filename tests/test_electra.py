"""Replaced-token detection (ELECTRA): the corruption and its labels, the generator's sampling, the loss, a
pretraining that learns on a corpus with an obvious rule, and the fine-tune from it."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import write_config
from tests.test_token_classification import NER, conll_root  # noqa: F401  (a fixture)
from transferctl.distributed import World
from transferctl.errors import ConfigError
from transferctl.methods.electra import ReplacedTokenDetection, ReplacedTokenLoss, corrupt, sample_tokens
from transferctl.methods.mlm import TokenMasking

SPECIAL = {"pad": 0, "mask": 1, "keep": (2, 3), "vocab_size": 30}


def texts(count: int = 8, length: int = 12) -> torch.Tensor:
    """[CLS] ordinary tokens [SEP] and padding, of unlike lengths."""
    ids = torch.randint(4, 30, (count, length))
    ids[:, 0] = 2
    for row, end in enumerate(torch.randint(4, length, (count,)).tolist()):
        ids[row, end] = 3
        ids[row, end + 1 :] = 0
    return ids


def test_the_encoder_is_told_which_real_tokens_the_generator_replaced():
    """Hidden tokens are filled with the generator's samples; a sample equal to the text's token counts as the
    text's own; padding and the boundary tokens are never hidden, replaced or scored."""
    ids = texts(64)
    masking = TokenMasking(0.5, 1.0, 0.0, SPECIAL)
    # a generator that is right in even rows (it names the hidden token) and says token 4 in odd ones
    truth = {}

    def generate(shown: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        assert (shown[chosen] == SPECIAL["mask"]).all()  # every hidden token shown as [MASK]
        rows = torch.arange(len(ids))[:, None].expand_as(ids)[chosen]
        truth["chosen"] = chosen
        guess = torch.where(rows % 2 == 0, ids[chosen], torch.full_like(ids[chosen], 4))
        return F.one_hot(guess, 30).float() * 100  # a sure generator: its sample is its guess

    c = corrupt(ids, masking, generate, torch.Generator().manual_seed(0))
    chosen = truth["chosen"]
    assert chosen.any() and (c.ids[~chosen] == ids[~chosen]).all()  # only hidden places change
    assert (c.ids[chosen] == torch.where(torch.arange(64)[:, None].expand_as(ids)[chosen] % 2 == 0, ids[chosen], 4)).all()
    real = (ids > 3) & (ids != 0)
    assert torch.equal(c.real, real)
    assert torch.equal(c.replaced, (c.ids != ids)[real])
    even = torch.zeros_like(ids, dtype=torch.bool)
    even[::2] = True
    assert not c.replaced[even[real]].any()  # right guesses are the texts' own tokens
    assert c.replaced[~even[real]].sum() == ((ids != 4) & chosen & ~even).sum() > 0
    assert torch.equal(c.hidden, ids[chosen])


def test_the_generator_never_puts_padding_mask_or_boundary_tokens_into_a_text():
    ids = texts(64)
    masking = TokenMasking(0.5, 1.0, 0.0, SPECIAL)
    special = [0, 1, 2, 3]

    def generate(shown: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:  # sure of a special token, unsure of the rest
        logits = torch.zeros(int(chosen.sum()), 30)
        logits[:, special] = 50.0
        return logits

    c = corrupt(ids, masking, generate, torch.Generator().manual_seed(0))
    hidden = c.ids[ids != c.ids]
    assert len(hidden) > 0 and not torch.isin(hidden, torch.tensor(special)).any()
    assert torch.equal(c.ids == 0, ids == 0)  # the padding is where it was


def test_samples_follow_the_generators_softmax_and_its_seed():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20_000, 3)
    drawn = sample_tokens(logits, torch.Generator().manual_seed(1))
    shares = torch.bincount(drawn, minlength=3) / len(drawn)
    assert torch.allclose(shares, torch.tensor([0.7, 0.2, 0.1]), atol=0.015), shares
    assert torch.equal(drawn, sample_tokens(logits, torch.Generator().manual_seed(1)))


def test_the_loss_is_the_generators_plus_weighted_detection():
    generated, hidden = torch.randn(5, 30), torch.randint(0, 30, (5,))
    detected, replaced = torch.randn(40), torch.rand(40) < 0.2
    loss = ReplacedTokenLoss(50.0)
    expected = F.cross_entropy(generated, hidden) + 50 * F.binary_cross_entropy_with_logits(detected, replaced.float())
    assert loss(generated, hidden, detected, replaced).item() == pytest.approx(expected.item(), rel=1e-6)
    scaled = 0.5 * F.cross_entropy(generated, hidden) + 50 * 2.0 * F.binary_cross_entropy_with_logits(detected, replaced.float())
    assert loss(generated, hidden, detected, replaced, (0.5, 2.0)).item() == pytest.approx(scaled.item(), rel=1e-6)
    nothing_hidden = loss(generated[:0], hidden[:0], detected, replaced)  # a batch of very short texts: no NaN
    assert nothing_hidden.item() == pytest.approx(50 * F.binary_cross_entropy_with_logits(detected, replaced.float()).item())


def test_electra_refuses_more_than_one_process():
    """Its generator runs outside the training forward, whose gradients DDP would not average."""
    from transferctl.config import load_config

    cfg = load_config(None, base={"method": "electra", "model": {"name": "transformer"}, "data": {"name": "text_csv"}})
    ReplacedTokenDetection().check(cfg, World(rank=0, size=1))
    with pytest.raises(ConfigError, match="one process"):
        ReplacedTokenDetection().check(cfg, World(rank=0, size=2))


WORDS = [f"w{i:02d}" for i in range(30)]


def cyclic_corpus(root: Path) -> Path:
    """Texts of consecutive words from a cycle of 30: each hidden word is named by its neighbours, and a wrong
    replacement stands out from them."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 300), ("test", 60)):
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text"])
            for _ in range(count):
                start = rng.randrange(30)
                writer.writerow([" ".join(WORDS[(start + k) % 30] for k in range(rng.randint(10, 20)))])
    return root


def electra_config(tmp_path: Path, corpus: Path) -> Path:
    """A GRU encoder: it reads its neighbours in order from the first step, where a small transformer's positions take
    a thousand steps to tell a neighbour; the generator is a transformer block whatever the encoder is."""
    return write_config(
        tmp_path / "electra.yaml",
        f"""
method: electra
model: {{name: gru, embed_dim: 32, hidden_dim: 32, layers: 1}}
head: {{generator_heads: 2}}
optimizer: {{lr: 0.003}}
data: {{name: text_csv, root: {corpus}, label_column: null, batch_size: 16, tokenizer: {{vocab_size: 100, max_length: 24}}}}
train: {{epochs: 30, log_every: 50, device: cpu}}
""",
    )


def test_electra_pretrains_and_a_tagger_fine_tunes_from_it(cli, tmp_path, conll_root):  # noqa: F811
    corpus = cyclic_corpus(tmp_path / "corpus")
    runs = tmp_path / "runs"
    pretrained = cli("pretrain", "-c", electra_config(tmp_path, corpus), "--runs-dir", runs, "--json")
    assert pretrained.code == 0, pretrained.stderr
    metrics = pretrained.json["metrics"]
    assert metrics["val_masked_accuracy"] > 0.1  # the generator learns the cycle (chance: 1 in 30)
    # the encoder tells the generator's slips (about one real token in eight: 0.88 if it called all the texts' own)
    assert metrics["val_detection_recall"] > 0.8 and metrics["val_detection_accuracy"] > 0.95
    evaluated = cli("evaluate", "--from", pretrained.json["run_dir"], "--runs-dir", runs, "--json")
    assert evaluated.code == 0, evaluated.stderr
    assert {"masked_accuracy", "detection_accuracy", "detection_recall"} <= set(evaluated.json["metrics"])
    config = write_config(tmp_path / "ner.yaml", NER.format(root=conll_root))
    tuned = cli("finetune", "--from", pretrained.json["run_dir"], "-c", config, "--runs-dir", runs, "--json")
    assert tuned.code == 0, tuned.stderr
    assert tuned.json["metrics"]["val_entity_f1"] > 0.25  # a small GRU in 6 epochs; an untrained tagger finds none


class KnowsTheReplacements(torch.nn.Module):
    """A stand-in network: its generator is sure of token 4 wherever a token is hidden, and its detector calls every
    token 4 replaced (so a text's own 4s are its false alarms)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Module()
        self.head.token_generator = lambda shown, chosen: F.one_hot(torch.full((int(chosen.sum()),), 4), 30).float() * 100

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.where(ids[positions] == 4, 5.0, -5.0)


def test_measure_scores_the_generator_and_the_detector_over_the_whole_split(monkeypatch):
    """Shares over the split's tokens (not means of batch means), against the same draws done by hand."""
    from transferctl.methods import electra

    ids = texts(40)
    batches = lambda data, size: ((ids[i : i + size], None) for i in range(0, len(ids), size))
    monkeypatch.setattr(electra, "iterate_batches", batches)
    monkeypatch.setattr(electra, "modality_of", lambda data: SimpleNamespace(model_input=lambda inputs, data: inputs))
    masking = TokenMasking(0.3, 1.0, 0.0, SPECIAL)
    network = KnowsTheReplacements()
    measured = electra.ReplacedTokensObjective(network, None, ReplacedTokenLoss(50.0), masking, 0).measure(network, None, 16)
    generator = torch.Generator().manual_seed(0)  # validation's fixed seed, drawn batch after batch
    done = [corrupt(inputs, masking, network.head.token_generator, generator) for inputs, _ in batches(None, 16)]
    hidden, replaced = torch.cat([c.hidden for c in done]), torch.cat([c.replaced for c in done])
    generated = torch.cat([c.generated for c in done])
    said = torch.cat([c.ids[c.real] == 4 for c in done])
    assert measured["masked_accuracy"] == pytest.approx((hidden == 4).float().mean().item())
    assert measured["detection_accuracy"] == pytest.approx((said == replaced).float().mean().item())
    assert measured["detection_recall"] == pytest.approx((said & replaced).sum().item() / replaced.sum().item())
    assert measured["detection_recall"] == 1.0 and measured["detection_accuracy"] < 1.0  # the texts' own 4s
    logits = torch.where(said, 5.0, -5.0)
    per_token = F.cross_entropy(generated, hidden) + 50 * F.binary_cross_entropy_with_logits(logits, replaced.float())
    assert measured["loss"] == pytest.approx(per_token.item(), rel=1e-5)


def test_grouped_batches_weigh_each_token_the_same_and_a_restored_objective_draws_the_same():
    """With batches grouped by length, each term is scaled by the batch's token count over the split's mean; a
    resumed run's objective (its generator's state restored) hides and samples exactly as the uninterrupted one."""
    from transferctl.data.samples import Batch
    from transferctl.methods.electra import ReplacedTokensObjective

    ids = texts(16)
    masking = TokenMasking(0.5, 1.0, 0.0, SPECIAL)
    generator_net = KnowsTheReplacements().head.token_generator
    seen = []

    class Detector(torch.nn.Module):
        def forward(self, corrupted: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            seen.append(corrupted.clone())
            return torch.zeros(int(positions.sum()))

    def objective(per_text):
        return ReplacedTokensObjective(Detector(), generator_net, ReplacedTokenLoss(50.0), masking, 3, per_text=per_text)

    plain, grouped = objective(None), objective((2.0, 5.0))
    state = grouped.state_dict()
    batch = Batch((ids,), torch.zeros(16))
    unscaled, scaled = plain.loss(batch, 0), grouped.loss(batch, 0)
    c = corrupt(ids, masking, generator_net, torch.Generator().set_state(state["generator"]))
    generation = F.cross_entropy(c.generated, c.hidden)
    detection = F.binary_cross_entropy_with_logits(torch.zeros(len(c.replaced)), c.replaced.float())
    assert unscaled.item() == pytest.approx((generation + 50 * detection).item(), rel=1e-5)
    shares = (len(c.hidden) / (2.0 * 16), len(c.replaced) / (5.0 * 16))
    assert scaled.item() == pytest.approx((generation * shares[0] + 50 * detection * shares[1]).item(), rel=1e-5)
    resumed = objective((2.0, 5.0))
    resumed.load_state_dict(state)
    resumed.loss(batch, 0)
    assert torch.equal(seen[-1], seen[1]) and not torch.equal(seen[-1], ids)  # the same corruption, replayed


def test_electra_refuses_early_stopping_on_its_loss():
    from transferctl.config import load_config

    base = {"method": "electra", "model": {"name": "transformer"}, "data": {"name": "text_csv"}}
    cfg = load_config(None, ["train.early_stop.patience=3"], base=base)
    with pytest.raises(ConfigError, match=r"train\.early_stop\.metric=val_detection_accuracy"):
        ReplacedTokenDetection().check(cfg, World())
    ReplacedTokenDetection().check(load_config(None, ["train.early_stop.metric=val_detection_accuracy"], base=base), World())


def test_the_cli_refuses_early_stopping_on_electras_loss_in_one_line_before_any_run(cli, tmp_path):
    runs = tmp_path / "runs"
    refused = cli(
        "pretrain", "-c", electra_config(tmp_path, cyclic_corpus(tmp_path / "corpus")), "train.early_stop.patience=3", "--runs-dir", runs
    )
    assert refused.code == 2 and refused.stderr.strip().count("\n") == 0
    assert "train.early_stop.metric=val_detection_accuracy" in refused.stderr and "Traceback" not in refused.stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_a_checkpoint_of_the_earlier_generator_layout_loads_into_the_shared_encoder_layout():
    """0.22.0 kept the generator's embedding, positions, blocks and norm directly under it; such runs still load,
    every tensor where the generator now reads it, and the generator's logits are unchanged."""
    from transferctl.methods.electra import replaced_token_detector

    def head() -> torch.nn.Module:
        return replaced_token_detector(16, 30, 0, (12,), word_embedding=torch.nn.Embedding(30, 16, padding_idx=0))

    torch.manual_seed(0)
    trained = head()
    renamed = {}
    for key, value in trained.state_dict().items():
        for old, new in type(trained.token_generator).RENAMED:
            key = key.replace(f"token_generator.{new}", f"token_generator.{old}")
        renamed[key] = value
    old_layout = {"embedding.weight", "positions", "blocks.0.attention.qkv.weight", "norm.weight", "norm.bias"}
    assert {f"token_generator.{name}" for name in old_layout} <= set(renamed)  # 0.22.0's names, written out
    assert not any(key.startswith("token_generator.encoder.") for key in renamed)
    loaded = head()
    loaded.load_state_dict(renamed)  # strict: no key missing or unexpected
    loaded.eval(), trained.eval()
    ids = texts(4)
    chosen = ids > 3
    assert torch.equal(loaded.token_generator(ids, chosen), trained.token_generator(ids, chosen))
