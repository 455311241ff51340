"""Text: tokenizers, masking, padding-exact encoders, augmentations, the chain from CSV files to an export that
classifies a sentence with `tokenizers` and onnxruntime alone, an exact resume, and the bad inputs."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_resume import killed_and_resumed
from transferctl.components import load_components
from transferctl.data.augment import BatchAugment
from transferctl.data.pipeline import MemoryPipeline
from transferctl.data.samples import Batch
from transferctl.data.text import TokenizerOptions, train_tokenizer
from transferctl.data.text_augment import TextAugment
from transferctl.methods.mlm import IGNORED, MaskedLanguageModel, MaskedTokensObjective, TokenMasking
from transferctl.modalities import modality_named
from transferctl.modalities.text import TextData, Tokenization
from transferctl.registry import MODELS

load_components()

REPO = Path(__file__).resolve().parent.parent
TEXT = modality_named("text")
TOPICS = {
    "sports": ["goal", "match", "team", "player", "coach", "league", "season", "score", "win", "stadium"],
    "markets": ["stock", "market", "shares", "profit", "bank", "investor", "trade", "price", "economy", "fund"],
    "science": ["atom", "cell", "physics", "energy", "planet", "research", "lab", "molecule", "theory", "space"],
}
COMMON = ["the", "a", "of", "in", "on", "and", "to", "with", "for", "this", "that"]


def article(topic: str, rng: random.Random) -> str:
    words = [rng.choice(TOPICS[topic] if rng.random() < 0.6 else COMMON) for _ in range(rng.randint(4, 30))]
    return " ".join(words).capitalize() + "."


def write_csv(path: Path, rows: list[tuple[str, str]], header=("label", "text")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_text_root(root: Path, per_class: tuple[int, int] = (30, 10), seed: int = 0) -> Path:
    rng = random.Random(seed)
    for split, count in zip(("train", "test"), per_class, strict=True):
        rows = [(topic, article(topic, rng)) for _ in range(count) for topic in TOPICS]
        write_csv(root / f"{split}.csv", rows)
    return root


@pytest.fixture
def text_root(tmp_path) -> Path:
    return make_text_root(tmp_path / "data")


CONFIG = """
method: {method}
model: {{name: {model}}}
data:
  name: text_csv
  root: {root}
  batch_size: 16
  eval_batch_size: 64
  tokenizer: {{vocab_size: 200, max_length: 24}}
train: {{epochs: {epochs}, log_every: 2, device: cpu}}
"""


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _ok(result) -> dict:
    assert result.code == 0, result.stderr
    return result.json


def small_tokenization(max_length: int = 16) -> Tokenization:
    rng = random.Random(1)
    texts = [article(topic, rng) for _ in range(20) for topic in TOPICS]
    return Tokenization(train_tokenizer(texts, TokenizerOptions(vocab_size=150)), max_length)


# --------------------------------------------------------------------------- tokenizers and masking


def test_the_tokenizer_round_trips_and_pads_on_the_right():
    tokenization = small_tokenization(max_length=32)
    text = "The team won the match with a late goal."
    ids, cut = tokenization.encode([text, "stock"])
    assert ids.dtype == torch.int32 and ids.shape == (2, 32) and not cut.any()
    row = [i for i in ids[0].tolist() if i != tokenization.pad_id]
    assert ids[0, len(row) :].eq(tokenization.pad_id).all()  # padding only at the end
    assert tokenization.tokenizer.decode(row) == text.lower()
    long_ids, long_cut = tokenization.encode([" ".join(["goal"] * 40)])
    assert long_cut.tolist() == [True] and long_ids.ne(tokenization.pad_id).all()


def test_masked_language_modelling_follows_80_10_10_on_a_seeded_batch():
    special = {"pad": 0, "mask": 4, "keep": (2, 3), "vocab_size": 1000}
    ids = torch.randint(5, 1000, (200, 100))
    ids[:, 0], ids[:, -1] = 2, 3  # boundary tokens
    ids[:100, 60:] = 0  # padding
    masking = TokenMasking(0.15, 0.8, 0.1, special)
    shown, targets = masking(ids, torch.Generator().manual_seed(0))
    chosen = targets != IGNORED
    content = (ids != 0) & (ids != 2) & (ids != 3)
    assert not (chosen & ~content).any()  # padding and boundaries are never hidden
    assert torch.equal(targets[chosen], ids[chosen]) and torch.equal(shown[~chosen], ids[~chosen])
    assert abs(chosen.sum().item() / content.sum().item() - 0.15) < 0.01
    as_mask = (shown[chosen] == 4).float().mean().item()
    unchanged = (shown[chosen] == ids[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02 and abs(1 - as_mask - unchanged - 0.1) < 0.02
    swapped = chosen & (shown != 4) & (shown != ids)
    assert not torch.isin(shown[swapped], torch.tensor([0, 2, 3, 4])).any()  # a random token is never a special one
    again, _ = masking(ids, torch.Generator().manual_seed(0))
    assert torch.equal(again, shown)
    # two ranks each draw their half of the global batch as one process would
    halves = [masking(ids[r * 100 : (r + 1) * 100], torch.Generator().manual_seed(0), r, 2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), shown)


def word_masking_expected(encodings, draws: torch.Tensor, ratio: float, offsets=None) -> torch.Tensor:
    """The whole-word rule from the tokenizer's own word ids: a token is hidden when its word's first piece drew
    under the ratio. `offsets`: per encoding, (row, first position) where it sits in the ids."""
    expected = torch.zeros(draws.shape, dtype=torch.bool)
    for index, encoding in enumerate(encodings):
        row, at = offsets[index] if offsets else (index, 0)
        first: dict[int, int] = {}
        for position, word in enumerate(encoding.word_ids):
            if word is not None:
                first.setdefault(word, at + position)
                expected[row, at + position] = bool(draws[row, first[word]] < ratio)
    return expected


def test_whole_word_masking_hides_every_piece_of_a_chosen_word_and_no_other():
    """With whole words, a token is hidden exactly when its word's first piece drew under the ratio (the tokenizer's
    word ids are the reference); words of several pieces go whole; the share of hidden tokens is still the ratio."""
    tokenization = small_tokenization(max_length=48)
    rng = random.Random(3)
    words = [*TOPICS["science"], "photosynthesis", "unbelievably", "stadiums"]
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    ids, _, encodings = tokenization.encode(texts, with_encodings=True)
    t = tokenization
    assert t.continues_word[ids[ids != t.pad_id]].any()  # some words are split here
    special = {"pad": t.pad_id, "mask": t.mask_id, "keep": t.boundary_ids, "vocab_size": t.vocab_size}
    masking = TokenMasking(0.15, 0.8, 0.1, special, t.continues_word)
    shown, targets = masking(ids, torch.Generator().manual_seed(0))
    chosen = targets != IGNORED
    draws = torch.rand(2, *ids.shape, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(chosen, word_masking_expected(encodings, draws, 0.15))
    hidden_whole = 0  # words of several pieces, every piece hidden
    for row, encoding in enumerate(encodings):
        pieces: dict[int, list[int]] = {}
        for position, word in enumerate(encoding.word_ids):
            if word is not None:
                pieces.setdefault(word, []).append(position)
        hidden_whole += sum(len(at) > 1 and bool(chosen[row, at].all()) for at in pieces.values())
    assert hidden_whole > 50
    assert abs(chosen.sum().item() / masking.maskable(ids).sum().item() - 0.15) < 0.03  # words, not tokens, are drawn
    assert torch.equal(masking(ids, torch.Generator().manual_seed(0))[0], shown)


def test_after_a_boundary_token_a_word_starts_even_without_its_mark():
    """A byte-level text's first word carries no `Ġ`: after a boundary token (a pair's [SEP]) it is a word of its own,
    not the rest of the word before the boundary."""
    from tokenizers import ByteLevelBPETokenizer

    byte_level = ByteLevelBPETokenizer()
    corpus = [article(topic, random.Random(i)) for i in range(40) for topic in TOPICS]
    byte_level.train_from_iterator(corpus, vocab_size=400, special_tokens=["<pad>", "<mask>", "</s>"], show_progress=False)
    tokenization = Tokenization(byte_level._tokenizer.to_str(), 32)
    first, second = byte_level.encode("goal match stadium"), byte_level.encode("team player")
    vocabulary = byte_level.get_vocab()
    row = [*first.ids, vocabulary["</s>"], *second.ids]
    ids = torch.tensor([row] * 400)
    special = {"pad": vocabulary["<pad>"], "mask": vocabulary["<mask>"], "keep": (vocabulary["</s>"],), "vocab_size": 400}
    chosen = TokenMasking(0.5, 1.0, 0.0, special, tokenization.continues_word)(ids, torch.Generator().manual_seed(0))[1] != IGNORED
    draws = torch.rand(2, *ids.shape, generator=torch.Generator().manual_seed(0))[0]
    offsets = [(r, 0) for r in range(400)] + [(r, len(first.ids) + 1) for r in range(400)]
    assert torch.equal(chosen, word_masking_expected([first] * 400 + [second] * 400, draws, 0.5, offsets))
    assert (chosen[:, len(first.ids) - 1] != chosen[:, len(first.ids) + 1]).any()  # the words either side are drawn apart


def test_which_vocabularies_mark_where_words_continue():
    """WordPiece marks continuing pieces (`##`), byte-level BPE marks word starts (`Ġ`); a BPE trained here marks
    neither, and `method.whole_words` refuses it."""
    from tokenizers import ByteLevelBPETokenizer

    texts = [article(topic, random.Random(i)) for i in range(40) for topic in TOPICS]
    wordpiece = small_tokenization()
    assert all(wordpiece.continues_word[i] == token.startswith("##") for token, i in wordpiece.tokenizer.get_vocab().items())
    byte_level = ByteLevelBPETokenizer()
    byte_level.train_from_iterator(texts, vocab_size=400, special_tokens=["<pad>", "<mask>"], show_progress=False)
    flags = Tokenization(byte_level._tokenizer.to_str(), 16).continues_word
    vocabulary = byte_level.get_vocab()
    assert not flags[vocabulary["Ġgoal"]] and flags[vocabulary["oal"]]
    assert all(flags[i] != token.startswith("Ġ") for token, i in vocabulary.items())  # <pad> and <mask> are never hidden
    assert Tokenization(train_tokenizer(texts, TokenizerOptions(kind="bpe", vocab_size=150)), 16).continues_word is None


def test_whole_word_masking_refuses_a_vocabulary_that_does_not_mark_words(cli, tmp_path, text_root):
    config = write_config(tmp_path / "mlm.yaml", CONFIG.format(method="mlm", model="transformer", root=text_root, epochs=1))
    runs = tmp_path / "runs"
    result = cli("pretrain", "-c", config, "method.whole_words=true", "data.tokenizer.kind=bpe", "--runs-dir", runs)
    assert result.code == 2 and "method.whole_words" in result.stderr and "kind=wordpiece" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not runs.exists()


def test_batches_grouped_by_length_weigh_every_hidden_token_the_same():
    """Grouped by length, a batch of long texts holds more hidden tokens than one of short texts: its loss is scaled
    to its share of the split's tokens (its tokens' summed loss over the mean count of a batch), as a global mean."""
    special = {"pad": 0, "mask": 4, "keep": (2, 3), "vocab_size": 50}
    uniform = lambda shown, chosen: torch.zeros(int(chosen.sum()), 50)  # every hidden token's loss: log 50
    losses = {}
    for per_text in (None, 3.0):
        objective = MaskedTokensObjective(uniform, nn.CrossEntropyLoss(), TokenMasking(0.5, 0.8, 0.1, special), 0, hidden_per_text=per_text)
        for name, length in (("short", 4), ("long", 40)):
            ids = torch.randint(5, 50, (8, 44))
            ids[:, length:] = 0
            targets = objective.masking(ids, torch.Generator().set_state(objective.generator.get_state()))[1]
            losses[per_text, name] = (objective.loss(Batch((ids,), torch.zeros(8)), 0).item(), int((targets != IGNORED).sum()))
    assert losses[None, "short"][0] == pytest.approx(losses[None, "long"][0]) == pytest.approx(math.log(50), rel=1e-5)  # a mean each
    for name in ("short", "long"):
        loss, hidden = losses[3.0, name]
        assert loss == pytest.approx(math.log(50) * hidden / (3.0 * 8), rel=1e-5)
    assert losses[3.0, "long"][0] > 5 * losses[3.0, "short"][0]


class KnowsTheTexts(nn.Module):
    """A stand-in network that predicts each hidden token from the texts' true ids: right in the rows `right`, the
    next id (wrong) elsewhere. It records which tokens were hidden."""

    def __init__(self, ids: torch.Tensor, right: torch.Tensor, vocab_size: int):
        super().__init__()
        self.ids, self.right, self.vocab_size, self.hidden = ids.long(), right, vocab_size, []

    def forward(self, shown: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        self.hidden.append(chosen)
        truth = self.ids[chosen]
        guess = torch.where(self.right[:, None].expand_as(chosen)[chosen], truth, (truth + 1) % self.vocab_size)
        return torch.nn.functional.one_hot(guess, self.vocab_size).float()


def test_masked_accuracy_is_the_share_of_hidden_tokens_predicted_right():
    tokenization = small_tokenization(max_length=24)
    ids, cut = tokenization.encode([article(t, random.Random(i)) for i in range(10) for t in TOPICS])
    texts = TextData(ids, torch.zeros(len(ids), dtype=torch.long), ("any",), texts=("",) * len(ids), tokenization=tokenization, cut=cut)
    method = MaskedLanguageModel()
    objective = MaskedTokensObjective(None, None, method.masking(texts), seed=0)

    def accuracy(right: torch.Tensor) -> tuple[float, torch.Tensor]:
        network = KnowsTheTexts(ids, right, tokenization.vocab_size)
        measured = objective.measure(network, texts, batch_size=len(ids))  # one batch: the stand-in sees the rows in order
        (hidden,) = network.hidden
        return measured["masked_accuracy"], hidden

    everywhere, hidden = accuracy(torch.ones(len(ids), dtype=torch.bool))
    assert everywhere == 1.0 and accuracy(torch.zeros(len(ids), dtype=torch.bool))[0] == 0.0
    # hidden: about 15% of the texts' own tokens, never padding, [CLS] or [SEP], the same ones every time (a fixed seed)
    content = (ids != tokenization.pad_id) & ~torch.isin(ids, torch.tensor(tokenization.boundary_ids, dtype=ids.dtype))
    assert not (hidden & ~content).any() and 0.1 < hidden.sum() / content.sum() < 0.2
    even_rows = torch.arange(len(ids)) % 2 == 0
    share, again = accuracy(even_rows)
    assert torch.equal(again, hidden)
    assert share == pytest.approx((hidden[even_rows].sum() / hidden.sum()).item())  # counted over hidden tokens only


# --------------------------------------------------------------------------- encoders and augmentations


@pytest.mark.parametrize("name", ["gru", "lstm", "transformer"])
def test_padding_does_not_change_the_pooled_features(name):
    tokenization = small_tokenization(max_length=32)
    options = {"hidden_dim": 16, "embed_dim": 16} if name != "transformer" else {"width": 32, "layers": 2, "heads": 4}
    context = {"vocab_size": tokenization.vocab_size, "pad_id": tokenization.pad_id, "max_length": 32}
    model = MODELS.build(name, {**options, "pooling": "attention"} if name != "transformer" else options, **context).eval()
    texts = ["The team won the match.", "Stock prices and the bank profit fell in a long session of trade."]
    ids, _ = tokenization.encode(texts)
    short = Tokenization(tokenization.tokenizer_json, 16).encode(texts)[0]
    with torch.no_grad():
        alone = model(ids[:1].long())
        together = model(ids.long())
        shorter = model(short.long())
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shorter[:1], alone, atol=1e-5, rtol=1e-5)  # 16 or 32 ids: the same text, the same features
    changed = ids.clone()
    changed[0, 2] = tokenization.mask_id
    with torch.no_grad():
        assert not torch.allclose(model(changed[:1].long()), alone)  # it reads the tokens


def test_a_gru_saved_by_0_4_0_still_loads():
    old = torch.nn.GRU(40, 16, num_layers=2, batch_first=True, bidirectional=True)
    state = {**{f"rnn.{k}": v for k, v in old.state_dict().items()}, "norm.weight": torch.ones(40), "norm.bias": torch.zeros(40)}
    gru = MODELS.build("gru", {"hidden_dim": 16}, sequence_features=40).eval()
    gru.load_state_dict(state)
    frames = torch.randn(3, 1, 40, 20)
    expected, _ = old(gru.norm(frames.squeeze(1).transpose(1, 2)))
    torch.testing.assert_close(gru.token_features(frames)[0], expected, atol=1e-5, rtol=1e-5)


def test_text_augmentations_keep_boundaries_stay_right_padded_and_are_seeded():
    tokenization = small_tokenization(max_length=32)
    special = {"pad": tokenization.pad_id, "mask": tokenization.mask_id, "keep": tokenization.boundary_ids, "vocab_size": 150}
    ids = tokenization.encode([article(t, random.Random(i)) for i in range(8) for t in TOPICS])[0].long()
    augment = TextAugment(special, crop=(0.5, 0.8), delete_p=0.2, mask_p=0.2)
    view = augment(ids, torch.Generator().manual_seed(3))
    assert torch.equal(view, augment(ids, torch.Generator().manual_seed(3)))
    real, lengths = view != tokenization.pad_id, (view != tokenization.pad_id).sum(1)
    assert torch.equal(real, torch.arange(32) < lengths[:, None])  # still padded on the right only
    assert (lengths < (ids != tokenization.pad_id).sum(1)).all() and (lengths >= 3).all()  # shorter, never empty
    cls, sep = tokenization.boundary_ids
    assert (view[:, 0] == cls).all() and (view.gather(1, (lengths - 1)[:, None]) == sep).all()
    assert (view == tokenization.mask_id).any()
    kept = [set(v[(v != tokenization.pad_id) & (v != tokenization.mask_id)].tolist()) for v in view]
    assert all(k <= set(i.tolist()) for k, i in zip(kept, ids, strict=True))  # only the text's own tokens


# --------------------------------------------------------------------------- the chain


def test_pretrain_finetune_evaluate_export_on_texts(cli, tmp_path, text_root):
    config = write_config(tmp_path / "mlm.yaml", CONFIG.format(method="mlm", model="transformer", root=text_root, epochs=12))
    small = ["model.width=32", "model.heads=2", "model.layers=1", "optimizer.lr=0.005", "data.batch_size=8"]
    pretrained = _ok(cli("pretrain", "-c", config, *small, "--json"))
    run = Path(pretrained["run_dir"])
    val_losses = [row["val_loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert val_losses[-1] < val_losses[0] - 0.5  # it learns which tokens a text's topic makes likely
    # the summary reports the last validation's share of hidden tokens predicted right (what that share counts:
    # test_masked_accuracy_is_the_share_of_hidden_tokens_predicted_right)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert pretrained["metrics"]["val_masked_accuracy"] == last["val_masked_accuracy"] and (run / "tokenizer.json").is_file()
    result = cli(
        "finetune",
        "--from",
        run,
        "data.labels_per_class=8",
        "data.tokenizer.vocab_size=300",
        "train.max_steps=40",
        "train.device=cpu",
        "--json",
    )
    tuned = _ok(result)
    assert "source run's tokenizer" in result.stderr  # says that its own tokenizer options have no effect
    assert (Path(tuned["run_dir"]) / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    assert _ok(cli("evaluate", "--from", tuned["run_dir"], "--json"))["metrics"]["accuracy"] > 0.6  # three topics, learnt
    formats = ("--format", "onnx", "--format", "torchscript", "--format", "safetensors")
    exported = _ok(cli("export", "--from", tuned["run_dir"], *formats, "--json"))
    assert exported["verified"] and all(p["passed"] and p["top1_agreement"] == 1.0 for p in exported["parity"].values())
    folder = Path(exported["export_dir"])
    card = json.loads((folder / "model_card.json").read_text())
    assert card["input"]["names"] == ["input_ids", "attention_mask"] and card["input"]["max_length"] == 24
    assert card["classes"] == ["markets", "science", "sports"] and card["input"]["tokenizer"] == "tokenizer.json"
    assert card["files"]["tokenizer.json"]["sha256"] == hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    # serving without transferctl (docs/export.md): the export folder alone, with tokenizers and onnxruntime
    import onnxruntime
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))  # set to cut and pad as the model was trained
    sentences = ["The coach and the team win the match in the league.", "The bank and the investor trade shares on the market."]
    encoded = tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    # the same predictions as the exported TorchScript model on the same ids: the folder alone serves the model.
    # (Not which topics these two sentences get: the tokenizer that `tokenizers` trains on a corpus this small is
    # not the same from one process to the next, so neither is a 40-step model; accuracy is checked above.)
    scripted = torch.jit.load(str(folder / "model.pt"))(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()
    np.testing.assert_allclose(logits, scripted, atol=1e-4)
    assert (logits.argmax(1) == scripted.argmax(1)).all()
    # padding that the mask leaves out is ignored, whatever ids it holds
    noisy = np.where(mask == 0, 7, ids)
    np.testing.assert_allclose(session.run(None, {"input_ids": noisy, "attention_mask": mask})[0], logits, atol=1e-5)


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "grouped_by_length"])
def test_masked_language_modelling_resumes_exactly(tmp_path, text_root, grouped):
    """Both random streams go with the checkpoint: the augmentation's and the masking's; batches grouped by length
    (and cut to their longest) come in the same order after a resume."""
    config = write_config(
        tmp_path / "mlm.yaml",
        CONFIG.format(method="mlm", model="gru", root=text_root, epochs=2).replace(
            "model: {name: gru}", "model: {name: gru, hidden_dim: 16, embed_dim: 16}"
        ),
    )
    overrides = ["data.batch_size=8", "train.checkpoint_every=2", "data.augment.name=text_light", f"data.group_by_length={grouped}"]
    whole, resumed = killed_and_resumed("pretrain", config, overrides, tmp_path)
    assert whole["step"] == resumed["step"] > 2
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


def test_grouped_text_batches_hold_texts_of_like_lengths_cut_to_their_longest():
    tokenization = small_tokenization(max_length=40)
    rng = random.Random(3)
    texts = [article(topic, rng) for _ in range(40) for topic in TOPICS]  # 4 to 30 words each
    ids, cut = tokenization.encode(texts)
    data = TextData(ids, torch.zeros(len(ids), dtype=torch.long), ("any",), texts=tuple(texts), tokenization=tokenization, cut=cut)
    real = (ids != tokenization.pad_id).sum(1)
    common = dict(views=1, batch_size=8, seed=0, drop_last=False)
    grouped = list(MemoryPipeline(data, BatchAugment(), TEXT, by_length=True, **common).batches(0))
    shuffled = list(MemoryPipeline(data, BatchAugment(), TEXT, **common).batches(0))
    assert sorted(torch.cat([b.extras["index"] for b in grouped]).tolist()) == list(range(len(texts)))  # each text once
    for batch in grouped:
        (x,), index = batch.inputs, batch.extras["index"]
        assert x.shape[1] == int(real[index].max())  # cut to the batch's longest text
        assert torch.equal(x, ids[index, : x.shape[1]].long())  # and no real token cut
        assert torch.equal(batch.side["lengths"], real[index])

    def padding(batches) -> int:  # what batches cut to their longest text would still pad
        return sum(len(b) * int(real[b.extras["index"]].max()) - int(real[b.extras["index"]].sum()) for b in batches)

    assert padding(grouped) * 4 < padding(shuffled)


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        ("simclr_mnist.yaml", [], "image samples are all one size"),
        ("mlm_news_cased.yaml", ["data.pipeline=loader"], "set data.pipeline=memory"),
    ],
)
def test_grouping_by_length_is_refused_where_it_cannot_group(cli, tmp_path, recipe, overrides, message):
    runs = tmp_path / "runs"
    result = cli("pretrain", "-c", REPO / "configs" / recipe, "data.group_by_length=true", *overrides, "--runs-dir", runs)
    assert result.code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_contrastive_views_on_text_default_to_text_simclr(cli, tmp_path, text_root):
    config = write_config(tmp_path / "simclr.yaml", CONFIG.format(method="simclr", model="gru", root=text_root, epochs=1))
    shown = cli("config", "show", "-c", config, "--json")
    assert shown.code == 0, shown.stderr
    assert shown.json["data"]["augment"]["name"] == "text_simclr" and shown.json["loss"]["name"] == "nt_xent"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("missing_column", "line 2 has no column 'text' (columns: label, body); set data.text_columns"),
        ("not_utf8", "line 3 is not UTF-8"),
        ("empty_text", "line 4 has an empty text"),
        ("unknown_label", "line 3 has label 'weather', which is not among the classes"),
        ("extra_field", "line 2 has more fields than the header; quote texts that hold commas"),
        ("no_label", "line 3 has no label"),
        ("no_tokenizer", "data.tokenizer.path"),
        ("foreign_tokenizer", "not the tokenizer the source run was trained with"),
    ],
)
def test_bad_text_input_is_one_line_exit_2_and_no_run(cli, tmp_path, text_root, fault, message):
    config = write_config(tmp_path / "c.yaml", CONFIG.format(method="supervised", model="gru", root=text_root, epochs=1))
    train = text_root / "train.csv"
    args = ["pretrain", "-c", config]
    if fault == "missing_column":
        write_csv(train, [("sports", "a goal")], header=("label", "body"))
    elif fault == "not_utf8":
        train.write_bytes(b"label,text\nsports,goal\nsports,caf\xe9 goal\n")
    elif fault == "empty_text":
        write_csv(train, [("sports", "goal"), ("sports", "match"), ("sports", "  ")])
    elif fault == "unknown_label":
        write_csv(train, [("sports", "goal"), ("weather", "rain")])
        args += ["data.classes=[markets,science,sports]"]
    elif fault == "extra_field":
        train.write_text("label,text\nsports,a goal, and a match\n")
    elif fault == "no_label":
        write_csv(train, [("sports", "goal"), ("", "match")])
    elif fault == "no_tokenizer":
        args += [f"data.tokenizer.path={tmp_path / 'missing.json'}"]
    else:
        source = _ok(cli("pretrain", "-c", config, "train.max_steps=1", "--json", "--runs-dir", tmp_path / "source"))
        other = make_text_root(tmp_path / "other", seed=5)
        foreign = tmp_path / "foreign.json"
        foreign.write_text(train_tokenizer([article("sports", random.Random(i)) for i in range(50)], TokenizerOptions(vocab_size=120)))
        args = ["finetune", "--from", source["run_dir"], f"data.root={other}", f"data.tokenizer.path={foreign}"]
    runs = tmp_path / "runs"
    result = cli(*args, "--runs-dir", runs)
    assert result.code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    if fault in ("missing_column", "not_utf8", "empty_text", "extra_field", "no_label"):
        assert str(train) in result.stderr  # names the file
    assert not runs.exists() or not any(runs.iterdir())


# --------------------------------------------------------------------------- Hugging Face checkpoints


def test_a_hugging_face_folder_loads_its_weights_and_tokenizer_and_exports(cli, tmp_path, text_root):
    from transformers import BertConfig, BertModel

    texts = [article(t, random.Random(i)) for i in range(30) for t in TOPICS]
    tokenizer_json = train_tokenizer(texts, TokenizerOptions(vocab_size=150))
    vocab = Tokenization(tokenizer_json, 8).vocab_size
    folder = tmp_path / "tiny-bert"
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    bert = BertModel(config, add_pooling_layer=False).eval()
    bert.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer_json)
    recipe = write_config(
        tmp_path / "hf.yaml",
        CONFIG.format(method="finetune", model="hf", root=text_root, epochs=1).replace(
            "model: {name: hf}", f"model: {{name: hf, weights: {folder}}}"
        ),
    )
    # before any training step, the encoder is the checkpoint's: the same features on the same ids
    from transferctl.build import build_training
    from transferctl.config import load_config

    training = build_training(load_config(recipe, ["train.max_steps=1"]))
    ids = training.train.inputs[:4].long()
    with torch.no_grad():
        ours = training.network.encoder.eval()(ids)
        theirs = bert(input_ids=ids, attention_mask=(ids != training.train.tokenization.pad_id).long()).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert training.train.tokenization.tokenizer_json == tokenizer_json  # the folder's tokenizer is the run's
    tuned = _ok(cli("finetune", "-c", recipe, "train.max_steps=5", "--json"))
    shutil.rmtree(folder)  # the run keeps the architecture in its config, the weights and the tokenizer in its checkpoint
    exported = _ok(cli("export", "--from", tuned["run_dir"], "--format", "onnx", "--format", "torchscript", "--json"))
    assert all(p["passed"] for p in exported["parity"].values())


def test_the_masked_language_model_head_is_tied_to_the_token_embeddings():
    from transferctl.build import build_network
    from transferctl.config import load_config

    tokenization = small_tokenization()
    fitted = {"tokenizer": tokenization.tokenizer_json, "max_length": 16}
    for model in ("transformer", "gru"):
        cfg = load_config(None, base={"method": "mlm", "model": {"name": model}, "data": {"name": "text_csv"}})
        network = build_network(cfg, (16,), 0, fitted)
        assert network.head.output.weight is network.encoder.word_embedding.weight  # one table, trained by both
        assert network.head.output.weight.shape == (tokenization.vocab_size, network.encoder.word_embedding.embedding_dim)
        ids = torch.full((2, 16), tokenization.pad_id)
        ids[:, :5] = 7
        assert network(ids, ids != tokenization.pad_id).shape == (10, tokenization.vocab_size)  # logits at the chosen tokens only


def test_word_vectors_initialize_the_token_table_of_a_fresh_run(tmp_path, text_root):
    from transferctl.build import build_training
    from transferctl.config import load_config

    vectors = {"goal": [0.5, -1.0, 2.0, 0.25], "stock": [1.5, 0.0, -0.5, 3.0]}
    glove = tmp_path / "vectors.txt"
    glove.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in vectors.items()) + "unseen 1 2 3 4\n")
    config = write_config(tmp_path / "c.yaml", CONFIG.format(method="supervised", model="gru", root=text_root, epochs=1))
    training = build_training(load_config(config, ["model.embed_dim=4", "model.hidden_dim=8", f"model.embeddings={glove}"]))
    vocabulary, table = training.train.tokenization.tokenizer.get_vocab(), training.network.encoder.word_embedding.weight
    for word, vector in vectors.items():
        torch.testing.assert_close(table[vocabulary[word]].cpu(), torch.tensor(vector))
    with pytest.raises(Exception, match="line 1 has 4 numbers, and the table is 8 wide"):
        build_training(load_config(config, ["model.embed_dim=8", f"model.embeddings={glove}"]))


def test_a_split_is_read_anew_when_its_columns_change_and_a_bom_is_not_a_column(tmp_path):
    from transferctl.registry import DATASETS

    root = tmp_path / "data"
    rows = [("sports", "goal match", "stock market"), ("markets", "bank profit", "team player")]
    path = write_csv(root / "train.csv", rows, header=("label", "title", "body"))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Excel saves a CSV
    write_csv(root / "test.csv", rows, header=("label", "title", "body"))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(small_tokenization().tokenizer_json)
    options = {"test_file": "test.csv", "tokenizer": {"path": str(tokenizer), "max_length": 8}}
    read = lambda column: DATASETS.build("text_csv", {**options, "text_columns": [column]}, root=root, download=False, train=True)
    titles, bodies = read("title"), read("body")  # the same file and tokenizer: the cache must not hand back the titles
    assert titles.texts == ("goal match", "bank profit") and bodies.texts == ("stock market", "team player")
    assert torch.equal(bodies.inputs, bodies.tokenization.encode(list(bodies.texts))[0])
