"""Token classification (named entities): CoNLL and JSONL readers and their bad input, word tags aligned with subword
tokens (first subword, all subwords, words cut by max_length) and re-aligned when another tokenizer reads the
sentences, entity F1 against seqeval, the CRF against brute force, and the chain: train, a killed run resumed
bit-exactly, evaluate, export with token-level parity, predict entities with character offsets and tags per word."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from seqeval.metrics import f1_score, precision_score, recall_score

from tests.conftest import write_config
from tests.test_resume import killed_and_resumed
from transferctl.config import load_config
from transferctl.data.datasets import load_split
from transferctl.data.targets import TargetList
from transferctl.data.text import TokenizerOptions, train_tokenizer
from transferctl.modalities.text import Tokenization, tokenized
from transferctl.tasks.token_classification import (
    CRF,
    IGNORED,
    EntityCounts,
    entity_scores,
    entity_spans,
    first_subwords,
    token_tags,
    word_tags,
)

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "ner_conll2003.yaml"
FIRST = ["Anna", "Peter", "Maria", "John", "Lena", "Omar", "Ravi", "Sofia"]
LAST = ["Smithson", "Berg", "Khan", "Novakovic", "Rossi", "Ito"]
CITIES = ["Paris", "Berlin", "Oslo", "Lima", "Cairo", "Delhi", "Quito"]
ORGS = [["Acme", "Corp"], ["Globex", "Bank"], ["Initech"], ["Umbrella", "Union"]]
TEMPLATES = [
    "PER visited LOC on Monday .",
    "ORG opened an office in LOC .",
    "PER joined ORG last year , officials said .",
    "Shares of ORG fell in LOC trading .",
]

NER = """\
method: finetune
task: token_classification
model: {{name: transformer, width: 32, layers: 1, heads: 2, dropout: 0.0}}
head: {{name: tagger, dropout: 0.0}}
optimizer: {{name: adamw, lr: 0.005}}
scheduler: {{name: constant}}
data: {{name: conll_folder, root: {root}, batch_size: 16, eval_batch_size: 64,
        tokenizer: {{vocab_size: 120, max_length: 24}}}}
train: {{epochs: 6, log_every: 5, device: cpu, checkpoint_every: 10}}
"""


def sentence(rng: random.Random) -> list[tuple[str, str]]:
    """A template's words with names filled in, each word with its IOB2 tag."""
    out = []
    for slot in rng.choice(TEMPLATES).split():
        words = {"PER": [rng.choice(FIRST), rng.choice(LAST)], "LOC": [rng.choice(CITIES)], "ORG": rng.choice(ORGS)}.get(slot)
        if words is None:
            out.append((slot, "O"))
        else:
            out += [(word, ("B-" if i == 0 else "I-") + slot) for i, word in enumerate(words)]
    return out


def write_conll(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    blocks = ["\n".join(f"{word} {tag}" for word, tag in sentence(rng)) for _ in range(count)]
    path.write_text("-DOCSTART- O\n\n" + "\n\n".join(blocks) + "\n")


@pytest.fixture(scope="session")
def conll_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conll")
    for name, count, seed in (("train", 240, 0), ("dev", 40, 1), ("test", 60, 2)):
        write_conll(root / f"{name}.txt", count, seed)
    return root


@pytest.fixture(scope="session")
def tagger_run(tmp_path_factory, conll_root) -> Path:
    """A tagger trained on the made-up sentences (shared by the tests that read a trained run)."""
    from transferctl.recipes import finetune

    folder = tmp_path_factory.mktemp("tagger")
    config = write_config(folder / "ner.yaml", NER.format(root=conll_root))
    return finetune(None, config, [], runs_dir=folder / "runs").run_dir


# --------------------------------------------------------------------------- reading


def _load(root: Path, name: str = "conll_folder", train: bool = True, **options):
    overrides = ["method=finetune", "task=token_classification", f"data.name={name}", f"data.root={root}"]
    cfg = load_config(None, [*overrides, *(f"data.{k}={v}" for k, v in options.items())])
    return load_split(cfg.data, train=train)


def test_conll_files_read_into_words_tags_and_word_ids(conll_root):
    data = _load(conll_root)
    assert data.classes == ("O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER") and len(data) == 240
    assert data.target_kind == "class_per_word" and isinstance(data.targets, TargetList)
    words, tags = data.texts[0], [data.classes[i] for i in data.targets[0].tolist()]
    assert len(words) == len(tags) and "-DOCSTART-" not in words
    # every word has tokens, and the first one of each is where its tag is read
    word_ids = data.side["word_ids"][0]
    assert sorted(set(word_ids.tolist()) - {-1}) == list(range(len(words)))


def test_iob1_files_are_read_as_iob2(tmp_path):
    (tmp_path / "train.txt").write_text("Anna I-PER\nBerg I-PER\nand O\nOslo I-LOC\nLima B-LOC\n")
    (tmp_path / "test.txt").write_text("Oslo I-LOC\n")
    data = _load(tmp_path, scheme="iob1")
    assert [data.classes[i] for i in data.targets[0].tolist()] == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]


@pytest.mark.parametrize(
    ("name", "train", "test", "message"),
    [
        ("conll_folder", "Anna B-PER\nBerg\n", "Oslo B-LOC\n", "train.txt line 2 has one column"),
        ("conll_folder", "Anna X-PER\n", "Oslo B-LOC\n", "train.txt line 1 has tag 'X-PER', which is not BIO"),
        ("conll_folder", "and O\nBerg I-PER\n", "Oslo O\n", "train.txt line 2: 'I-PER' begins an entity"),
        ("conll_folder", "\n\n", "Oslo O\n", "train.txt holds no tagged sentences"),
        ("token_jsonl", '{"tokens": ["Anna", "Berg"], "tags": ["B-PER"]}\n', "", "train.jsonl line 1 has 2 tokens and 1 tags"),
        ("token_jsonl", '{"tokens": ["Anna"], "tags": ["B-PER\\nx"]}\n', "", "train.jsonl line 1 has tag 'B-PER\\nx', which is not BIO"),
    ],
)
def test_bad_tagged_files_are_one_line_errors_and_no_run(cli, tmp_path, name, train, test, message):
    suffix = ".txt" if name == "conll_folder" else ".jsonl"
    (tmp_path / f"train{suffix}").write_text(train)
    (tmp_path / f"test{suffix}").write_text(test or '{"tokens": ["Oslo"], "tags": ["O"]}\n')
    runs = tmp_path / "runs"
    result = cli("finetune", "-c", RECIPE, f"data.name={name}", f"data.root={tmp_path}", "--runs-dir", runs)
    assert result.code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not runs.exists() or not any(runs.iterdir())


def test_tagging_refuses_augmentations_that_move_tokens_off_their_words(cli, tmp_path, conll_root):
    runs = tmp_path / "runs"
    result = cli(
        "finetune", "-c", RECIPE, "data.name=conll_folder", f"data.root={conll_root}", "data.augment.name=text_light", "--runs-dir", runs
    )
    assert result.code == 2 and "deletion" in result.stderr, result.stderr
    assert not runs.exists() or not any(runs.iterdir())


SELF_TRAINING = [
    "data.labeled_samples=10", "finetune.unlabeled.weight=1", "finetune.unlabeled.batch_size=32", "finetune.unlabeled.threshold=0.9",
    "finetune.unlabeled.augment.name=text_light", "finetune.unlabeled.augment.delete_p=0", "finetune.unlabeled.augment.mask_p=0.15",
]  # fmt: skip


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("finetune.unlabeled.augment.delete_p=0.1", "would move task 'token_classification''s pseudo-labels off their places (deletion)"),
        ("finetune.unlabeled.align=true", "finetune.unlabeled.align: it acts on one class per sample"),
        ("finetune.unlabeled.propagate=true", "finetune.unlabeled.propagate: it acts on one class per sample"),
    ],
)
def test_self_training_refuses_views_that_move_tokens_and_per_sample_options(cli, tmp_path, conll_root, option, message):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "ner.yaml", NER.format(root=conll_root))
    result = cli("finetune", "-c", config, *SELF_TRAINING, option, "--runs-dir", runs)
    assert result.code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not runs.exists()


def test_self_training_reads_a_sentence_whole_with_a_crf_and_each_token_without():
    from transferctl.tasks.token_classification import TokenClassification

    task = TokenClassification()
    task.load_fitted({"tags": list(TAGS)})  # pad id 0
    crf = CRF(len(TAGS))
    crf.allow_iob2(TAGS)
    network = torch.nn.Module()
    network.head = torch.nn.Module()
    network.head.crf = crf
    # token id -> its logits: 1-4 sure of their tag, 5 torn between B-PER and B-LOC; 0 is padding
    table = torch.zeros(6, len(TAGS))
    table[1, 0] = table[2, 1] = table[3, 2] = table[4, 3] = 9.0
    table[5, 1] = table[5, 3] = 9.0
    weak = torch.tensor([[2, 3, 1, 4, 0], [1, 5, 1, 0, 0], [1, 1, 0, 0, 0]])
    strong = torch.tensor([[2, 1, 1, 4, 0], [1, 5, 1, 0, 0], [4, 1, 0, 0, 0]])  # masked and replaced tokens
    # each token's word: the second sentence's last token continues its second word, the third's first is [CLS]
    side = {"word_ids": torch.tensor([[0, 1, 2, 3, -1], [0, 1, 1, -1, -1], [-1, 0, -1, -1, -1]])}
    forward = lambda ids: table[ids]
    loss, passed = task.pseudo_label_loss(network, forward, weak, strong, side, threshold=0.9)
    assert passed.tolist() == [True, False, True]  # the torn token keeps the second sentence out, whole
    tags = torch.tensor([[1, 2, 0, 3], [0, 0, 0, 0]])
    kept = torch.tensor([[2, 1, 1, 4], [4, 1, 0, 0]])
    expected = crf.nll(table[kept], tags, kept != 0) * 2 / 3  # the weak view's path, learnt on the strong view
    assert loss.item() == pytest.approx(expected.item())

    # a softmax head: each sure token that the labelled loss reads counts (a word's first subword), the torn one,
    # a continuation subword, [CLS] and padding do not
    network.head.crf = None
    loss, passed = task.pseudo_label_loss(network, forward, weak, strong, side, threshold=0.9)
    assert passed.tolist() == [True] * 4 + [True, False] + [True]
    sure = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    per_token = torch.nn.functional.cross_entropy(
        table[strong[:, :4]].transpose(1, 2), torch.tensor([[1, 2, 0, 3], [0, 0, 0, 0], [0, 0, 0, 0]]), reduction="none"
    )
    assert loss.item() == pytest.approx((per_token * sure).sum().item() / 7)
    task.label_all_subwords = True  # the continuation subword is read too
    assert task.pseudo_label_loss(network, forward, weak, strong, side, threshold=0.9)[1].tolist() == [True] * 5 + [False, True, True]


@pytest.mark.parametrize("crf", [True, False])
def test_self_training_on_untagged_sentences_runs_and_reports_its_rate(cli, tmp_path, conll_root, crf):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "ner.yaml", NER.format(root=conll_root))
    tuned = cli(
        "finetune",
        "-c",
        config,
        *SELF_TRAINING,
        f"head.crf={str(crf).lower()}",
        "train.epochs=1000",
        "train.max_steps=40",
        "--runs-dir",
        runs,
        "--json",
    )
    assert tuned.code == 0, tuned.stderr
    rows = [json.loads(line) for line in (Path(tuned.json["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rates = [row["pseudo_label_rate"] for row in rows]
    assert 0.0 < max(rates) <= 1.0 and rates[-1] > rates[0]  # sentences (CRF) or tokens that passed 0.9, more as it learns
    summary = json.loads((Path(tuned.json["run_dir"]) / "summary.json").read_text())
    assert "unlabeled_check" not in summary  # a labels-only classifier of whole samples does not apply to tags
    assert "finetune.unlabeled.check compares with a labels-only classifier" in (Path(tuned.json["run_dir"]) / "log.txt").read_text()


def test_a_test_tag_training_never_saw_is_a_one_line_error_of_evaluate(cli, tmp_path):
    (tmp_path / "train.txt").write_text("Anna B-PER\nBerg I-PER\n")
    (tmp_path / "test.txt").write_text("Oslo B-LOC\n")
    runs = tmp_path / "runs"
    overrides = ["data.name=conll_folder", f"data.root={tmp_path}", "train.max_steps=1"]
    tuned = cli("finetune", "-c", RECIPE, *overrides, "--runs-dir", runs, "--json")
    assert tuned.code == 0, tuned.stderr
    result = cli("evaluate", "--from", tuned.json["run_dir"], "--runs-dir", runs)
    assert result.code == 2 and "test.txt line 1 has tag 'B-LOC', whose type the training file never has" in result.stderr
    assert len(list(runs.iterdir())) == 1  # no evaluate run


# --------------------------------------------------------------------------- alignment


def _tokenization(max_length: int = 16, lowercase: bool = False, vocab_size: int = 120) -> Tokenization:
    texts = [" ".join(w for w, _ in sentence(random.Random(i))) for i in range(50)]
    return Tokenization(train_tokenizer(texts, TokenizerOptions(vocab_size=vocab_size, lowercase=lowercase)), max_length)


def test_a_word_tag_goes_to_its_first_subword_or_to_all_and_cut_words_are_outside():
    tokenization = _tokenization(max_length=8)
    words = ("Novakovic", "visited", "Quito", "on", "Monday", "and", "Oslo", ".")
    tags = torch.tensor([5, 0, 1, 0, 0, 0, 1, 0])  # B-PER O B-LOC O O O B-LOC O
    _, _, (encoding,) = tokenization.encode([words], with_encodings=True)
    word_ids = torch.tensor([[-1 if w is None else w for w in encoding.word_ids]])
    inside = torch.tensor([0, 2, 2, 4, 4, 6, 6])  # B-X -> I-X
    first = token_tags([tags], word_ids, inside, all_subwords=False, specials=None)[0]
    every = token_tags([tags], word_ids, inside, all_subwords=True, specials=0)[0]
    pieces = [w for w in encoding.word_ids if w == 0]
    assert len(pieces) > 1  # Novakovic is split into subwords
    for t, w in enumerate(encoding.word_ids):
        if w is None:
            assert first[t] == IGNORED and every[t] == 0
        elif t == encoding.word_ids.index(w):
            assert first[t] == every[t] == tags[w]
        else:  # a later subword: ignored, or the word's inside tag
            assert first[t] == IGNORED and every[t] == inside[tags[w]]
    # max_length 8 cuts the sentence: the words without a token are read as O and counted
    read = {w for w in encoding.word_ids if w is not None}
    assert len(read) < len(words)
    scores = torch.nn.functional.one_hot(torch.where(first >= 0, first, 0), 7).float()[None]
    ((predicted, confidence),) = word_tags(scores, word_ids, [len(words)], outside=0)
    assert predicted[: len(read)].tolist() == tags[: len(read)].tolist() and predicted[len(read) :].eq(0).all()
    assert confidence[len(read) :].eq(0).all()


def test_a_crf_learns_valid_iob2_even_where_an_entity_s_first_word_has_no_token():
    tokenization = _tokenization()
    words = ("\u200b", "Smithson", "said")  # B-PER, I-PER, O: the zero-width space becomes no token
    _, _, (encoding,) = tokenization.encode([words], with_encodings=True)
    word_ids = torch.tensor([[-1 if w is None else w for w in encoding.word_ids]])
    assert 0 not in word_ids
    tags, inside, begin = torch.tensor([1, 2, 0]), torch.tensor([0, 2, 2]), torch.tensor([0, 1, 1])  # O, B-PER, I-PER
    labels = token_tags([tags], word_ids, inside, all_subwords=True, specials=0, begin=begin)[0]
    real = labels[word_ids[0] >= 0].tolist()
    assert real[0] == 1 and all(t == 2 for t in real[1:-1]) and real[-1] == 0  # B-PER I-PER... O
    assert labels[0] == 0  # [CLS]


def test_text_given_whole_is_split_into_words_as_conll_splits_them():
    from transferctl.tasks.token_classification import _words_by_offsets, split_words

    text = "U.S. officials said Germany's 3.5 percent rise in Jean-Marie's Brussels."
    spans = split_words(text)
    assert [text[a:b] for a, b in spans] == [
        *("U.S.", "officials", "said", "Germany", "'s", "3.5", "percent", "rise", "in", "Jean-Marie", "'s", "Brussels", "."),
    ]
    _, _, (encoding,) = _tokenization(max_length=128).encode([text], with_encodings=True)
    words = _words_by_offsets(encoding, spans)
    assert words[0] is None and sorted({w for w in words if w is not None}) == list(range(len(spans)))
    assert words.count(0) == encoding.tokens.count("U") + encoding.tokens.count(".") - 1  # U . S . is one word


def test_a_byte_level_tokenizer_that_adds_no_space_reads_each_word_as_after_a_space():
    """RoBERTa's tokenizer as saved adds no space before a word: words given apart would run together ("AnnaBerg"). Read
    as run_ner.py reads them (add_prefix_space=True): each word's ids are those it has after a space in running text."""
    from tokenizers import ByteLevelBPETokenizer

    from transferctl.data.tagging import reading_words

    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False)
    tokenizer.train_from_iterator(["Anna Berg visited Oslo"] * 5, vocab_size=300, special_tokens=["<pad>"], show_progress=False)
    saved = Tokenization(tokenizer._tokenizer.to_str(), 8)
    words = reading_words(saved)
    ids, _ = words.encode([["Anna", "Berg", "visited", "Oslo"]])
    running, _ = saved.encode([" Anna Berg visited Oslo"])
    assert torch.equal(ids, running) and ids[0, 0] != saved.encode(["Anna"])[0][0, 0]
    wordpiece = _tokenization()
    assert reading_words(wordpiece) is wordpiece  # WordPiece reads words as they are


def test_the_crf_s_scores_are_in_the_forward_graph_for_ddp():
    from transferctl.tasks.token_classification import tagger

    head = tagger(feature_dim=8, num_outputs=5, crf=True).train()
    grads = torch.autograd.grad(head(torch.randn(2, 4, 8)).sum(), list(head.crf.parameters()), allow_unused=True)
    assert all(g is not None for g in grads)  # DDP sees them used in the forward, so it waits for their gradients


def test_sentences_read_with_another_tokenizer_keep_their_word_tags(conll_root):
    data = _load(conll_root)
    other = _tokenization(max_length=40, lowercase=True, vocab_size=100)
    again = tokenized(data, other)
    assert again.targets is data.targets and again.inputs.shape[1] == 40 != data.inputs.shape[1]
    for words, word_ids in zip(again.texts, again.side["word_ids"], strict=True):
        _, _, (encoding,) = other.encode([words], with_encodings=True)
        assert word_ids.tolist() == [-1 if w is None else w for w in encoding.word_ids]
        assert int(first_subwords(word_ids[None]).sum()) == len(words)  # each word's tag has its token


# --------------------------------------------------------------------------- metrics


def test_entity_scores_count_as_seqeval_does():
    hand_made = [
        (["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]),
        (["B-PER", "I-PER", "O"], ["B-PER", "O", "O"]),  # a span cut short is wrong
        (["O", "I-ORG", "I-ORG"], ["O", "B-ORG", "I-ORG"]),  # an I- after O begins an entity
        (["B-PER", "I-LOC"], ["B-PER", "B-LOC"]),  # a type change begins another
        (["B-LOC", "B-LOC"], ["B-LOC", "I-LOC"]),  # two touching entities, one found as one
        (["O", "O"], ["B-MISC", "O"]),
    ]
    truth, guess = [t for t, _ in hand_made], [g for _, g in hand_made]
    scores = entity_scores(truth, guess)
    assert scores["entity_f1"] == pytest.approx(f1_score(truth, guess))
    assert scores["entity_precision"] == pytest.approx(precision_score(truth, guess))
    assert scores["entity_recall"] == pytest.approx(recall_score(truth, guess))
    assert entity_spans(["O", "I-ORG", "I-ORG", "I-LOC"]) == [("ORG", 1, 3), ("LOC", 3, 4)]
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    for _ in range(200):
        truth = [[rng.choice(tags) for _ in range(rng.randint(1, 9))] for _ in range(3)]
        guess = [[rng.choice(tags) if rng.random() < 0.4 else t for t in s] for s in truth]
        assert entity_scores(truth, guess)["entity_f1"] == pytest.approx(f1_score(truth, guess))


# --------------------------------------------------------------------------- the CRF

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def _valid(path: list[str]) -> bool:
    return all(not t.startswith("I-") or (p != "O" and p[2:] == t[2:]) for p, t in zip(["O", *path], path, strict=False))


def test_the_crf_matches_brute_force_and_never_takes_a_forbidden_transition():
    torch.manual_seed(0)
    crf = CRF(len(TAGS))
    crf.allow_iob2(TAGS)
    with torch.no_grad():  # transitions that favour what IOB2 forbids: the constraint has to do the work
        crf.transitions.normal_(0, 2)
        crf.transitions[0, 2] = crf.transitions[0, 4] = 8.0
        crf.start.normal_()
        crf.end.normal_()
    crf.requires_grad_(False)
    emissions, lengths = torch.randn(6, 5, len(TAGS)) * 2, torch.tensor([5, 4, 3, 1, 5, 2])
    mask = torch.arange(5) < lengths[:, None]
    paths, marginals = crf.viterbi(emissions, mask), crf.marginals(emissions, mask)
    for i, n in enumerate(lengths.tolist()):
        scores = {}
        for path in itertools.product(range(len(TAGS)), repeat=n):
            if _valid([TAGS[t] for t in path]):
                score = crf.start[path[0]] + crf.end[path[-1]] + sum(emissions[i, t, k] for t, k in enumerate(path))
                scores[path] = score + sum(crf.transitions[a, b] for a, b in itertools.pairwise(path))
        best = max(scores, key=scores.get)
        assert tuple(paths[i, :n].tolist()) == best and _valid([TAGS[t] for t in best])
        log_z = torch.logsumexp(torch.stack(list(scores.values())), 0)
        tags = torch.tensor(best + (0,) * (5 - n))[None]
        nll = crf.nll(emissions[i : i + 1], tags, mask[i : i + 1]) * n
        assert nll.item() == pytest.approx((log_z - scores[best]).item(), rel=1e-4, abs=1e-4)
        for t in range(n):  # marginals: the probability mass of the valid paths through each tag
            mass = [sum(torch.exp(s - log_z) for p, s in scores.items() if p[t] == k) for k in range(len(TAGS))]
            assert marginals[i, t].tolist() == pytest.approx([float(m) for m in mass], abs=1e-4)


# --------------------------------------------------------------------------- the chain


def test_a_trained_tagger_evaluates_exports_and_predicts_entities(cli, tmp_path, conll_root, tagger_run):
    runs = tagger_run.parent
    evaluation = cli("evaluate", "--from", tagger_run, "--runs-dir", runs, "--json")
    assert evaluation.code == 0, evaluation.stderr
    metrics = evaluation.json["metrics"]
    assert metrics["entity_f1"] > 0.9, metrics
    assert set(evaluation.json["per_type_f1"]) == {"LOC", "ORG", "PER"}
    # the F1 it reports is seqeval's on the tags the model gives
    from transferctl.build import load_trained
    from transferctl.runs import read_trained_run

    record = read_trained_run(str(tagger_run), runs)
    trained = load_trained(record, load_config(None, base=record.config))
    test = trained.split(train=False)
    truth, guess, unread = trained.method.task.tag(trained.served(), test, 64)
    assert metrics["entity_f1"] == pytest.approx(f1_score(truth, guess))
    # max_length 24 cuts some sentences: their last words are counted, as O
    cut = sum(len(words) - len(set(ids.tolist()) - {-1}) for words, ids in zip(test.texts, test.side["word_ids"], strict=True))
    assert metrics["words_unread"] == unread == cut > 0

    export = cli("export", "--from", tagger_run, "--format", "onnx", "--runs-dir", runs, "--json")
    assert export.code == 0, export.stderr
    assert export.json["parity"]["onnx"]["passed"] and export.json["parity"]["onnx"]["token_tag_agreement"] >= 0.999
    card = json.loads((Path(export.json["export_dir"]) / "model_card.json").read_text())
    assert card["kind"] == "tagger" and card["classes"][0] == "O" and "first subword" in card["word_alignment"]
    assert "document_context" not in card  # read without context

    # predict from the export folder: entities with character offsets in a text, tags per word of a given sentence
    (tmp_path / "in.jsonl").write_text(json.dumps({"tokens": ["Maria", "Rossi", "visited", "Lima", "on", "Monday", "."]}) + "\n")
    text = "Omar Khan joined Globex Bank last year , officials said ."
    served = cli("predict", "--from", export.json["export_dir"], tmp_path / "in.jsonl", "--text", text, "-o", tmp_path / "out.jsonl")
    assert served.code == 0, served.stderr
    words, whole = (json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines())
    assert words["tags"] == ["B-PER", "I-PER", "O", "B-LOC", "O", "O", "O"]
    assert [(e["text"], e["type"]) for e in whole["entities"]] == [("Omar Khan", "PER"), ("Globex Bank", "ORG")]
    assert [text[e["start"] : e["end"]] for e in whole["entities"]] == ["Omar Khan", "Globex Bank"]


def test_a_killed_tagging_run_resumes_bit_exactly(tmp_path, conll_root):
    config = write_config(tmp_path / "ner.yaml", NER.format(root=conll_root))
    whole, resumed = killed_and_resumed("finetune", config, ["train.epochs=2"], tmp_path)
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


def test_a_crf_tagger_decodes_valid_paths_and_fine_tunes_from_a_run_with_another_tokenizer(cli, tmp_path, conll_root):
    # a masked language model pretrained on the sentences' text with a lowercasing tokenizer of its own
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [" ".join(w for w, _ in sentence(random.Random(i))) for i in range(200)]
    for name in ("train.csv", "test.csv"):
        (corpus / name).write_text("text\n" + "\n".join(json.dumps(line) for line in lines) + "\n")  # quoted: commas
    runs = tmp_path / "runs"
    mlm = Path(__file__).resolve().parent.parent / "configs" / "mlm_ag_news.yaml"
    source = cli(
        "pretrain", "-c", mlm, "data.name=text_csv", f"data.root={corpus}", "data.label_column=null",
        "data.tokenizer.vocab_size=100", "data.tokenizer.max_length=20", "model.width=32", "model.layers=1", "model.heads=2",
        "train.max_steps=4", "train.device=cpu", "--runs-dir", runs, "--json",
    )  # fmt: skip
    assert source.code == 0, source.stderr
    config = write_config(tmp_path / "ner.yaml", NER.format(root=conll_root))
    tuned = cli("finetune", "--from", source.json["run_dir"], "-c", config, "head.crf=true", "--runs-dir", runs, "--json")
    assert tuned.code == 0, tuned.stderr
    log = (Path(tuned.json["run_dir"]) / "log.txt").read_text()
    assert "texts are read with the source run's tokenizer" in log
    assert tuned.json["metrics"]["val_entity_f1"] > 0.5
    from transferctl.build import load_trained
    from transferctl.runs import read_trained_run

    record = read_trained_run(tuned.json["run_dir"], runs)
    trained = load_trained(record, load_config(None, base=record.config))
    test = trained.split(train=False)
    assert test.tokenization.max_length == 20 and test.tokenization.tokenizer_json == trained.split(train=True).tokenization.tokenizer_json
    scores = trained.served()(test.inputs.long())
    names = test.classes
    for row, ids in zip(scores, test.inputs, strict=True):
        real = ids != test.tokenization.pad_id
        path = [names[k] for k in row.argmax(-1)[real].tolist()]
        assert _valid(path), path
    counts = EntityCounts({}, {}, {})
    truth, guess, _ = trained.method.task.tag(trained.served(), test, 64)
    for want, got in zip(truth, guess, strict=True):
        counts.add(want, got)
    assert counts.scores()["entity_f1"] == pytest.approx(f1_score(truth, guess))
