"""Document context for tagging (FLERT): a sentence is read with words of its document around it, which the model
reads and nothing tags. Reading (word ids of the sentence unchanged, context within its document, within the room and
max_length, kept when another tokenizer reads the sentences), the CRF's chain over the sentence's tokens alone, a
loss that no context token reaches, and the chain train -> evaluate -> predict."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import write_config
from tests.test_token_classification import NER, TAGS, _load, _tokenization, sentence
from transferctl.build import load_trained
from transferctl.config import load_config
from transferctl.data.tagging import read_conll
from transferctl.modalities.text import CONTEXT_WORD, SentenceInContext, tokenized
from transferctl.runs import read_trained_run
from transferctl.tasks.token_classification import CRF, IGNORED, Tagger, TaggingLoss, first_subwords, token_tags

ROOM = 6


def write_documents(path: Path, documents: int, sentences: int, seed: int) -> None:
    """`documents` documents of `sentences` made-up sentences each, a -DOCSTART- line before each."""
    rng, blocks = random.Random(seed), []
    for _ in range(documents):
        blocks.append("-DOCSTART- O")
        blocks += ["\n".join(f"{word} {tag}" for word, tag in sentence(rng)) for _ in range(sentences)]
    path.write_text("\n\n".join(blocks) + "\n")


@pytest.fixture(scope="module")
def documents_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("documents")
    for name, count, seed in (("train", 60, 0), ("dev", 10, 1), ("test", 15, 2)):
        write_documents(root / f"{name}.txt", count, 4, seed)
    return root


def _sides(word_ids: torch.Tensor) -> tuple[int, int]:
    """How many context tokens a row has before its sentence's first token and after its last."""
    ids = word_ids.tolist()
    own = [t for t, w in enumerate(ids) if w >= 0]
    return sum(w == CONTEXT_WORD for w in ids[: own[0]]), sum(w == CONTEXT_WORD for w in ids[own[-1] :])


def test_a_sentence_in_context_keeps_its_tokens_and_reads_only_its_own_document(documents_root):
    alone, read = _load(documents_root), _load(documents_root, document_context=ROOM)
    sentences = read_conll("conll_folder", documents_root / "train.txt")
    assert len(read) == len(alone) == 240 and sentences.documents[:5] == [1, 1, 1, 1, 2]
    assert all(isinstance(text, SentenceInContext) and text.room == ROOM for text in read.texts)
    for i, (text, ids, word_ids) in enumerate(zip(read.texts, read.inputs, read.side["word_ids"], strict=True)):
        own = word_ids >= 0
        assert ids[own].tolist() == alone.inputs[i][alone.side["word_ids"][i] >= 0].tolist()
        assert word_ids[own].tolist() == alone.side["word_ids"][i][alone.side["word_ids"][i] >= 0].tolist()
        first, last = i % 4 == 0, i % 4 == 3  # a document's first and last sentences: nothing before / after
        assert (text.before == ()) == first and (text.after == ()) == last
        if not first:  # the words nearest the sentence, in order
            assert text.before[-len(alone.texts[i - 1]) :] == alone.texts[i - 1][-ROOM:]
        if not last:
            assert text.after[: len(alone.texts[i + 1])] == alone.texts[i + 1][:ROOM]
        before, after = _sides(word_ids)
        assert (before > 0) == (not first) and (after > 0) == (not last) and before <= ROOM and after <= ROOM
    assert read.side["word_ids"].eq(CONTEXT_WORD).any() and not read.cut.any()


def test_context_fits_what_max_length_leaves_and_another_tokenizer_reads_it_again(documents_root):
    read = _load(documents_root, document_context=ROOM)
    for max_length in (48, 20):
        again = tokenized(read, _tokenization(max_length=max_length))
        for text, word_ids, cut in zip(again.texts, again.side["word_ids"], again.cut, strict=True):
            if cut:  # max_length cuts the sentence itself: no room for context
                assert not word_ids.eq(CONTEXT_WORD).any()
                continue
            assert int(first_subwords(word_ids[None]).sum()) == len(text.words)  # every word's tag has its token
            free = max_length - int((word_ids >= 0).sum()) - 2  # what the sentence and [CLS], [SEP] leave
            before, after = _sides(word_ids)
            assert before <= free // 2 and before + after <= free
        assert again.cut.any() == (max_length == 20) and again.side["word_ids"].eq(CONTEXT_WORD).any()


def test_the_crf_s_chain_is_the_sentence_s_tokens_alone():
    torch.manual_seed(1)
    crf = CRF(len(TAGS))
    crf.allow_iob2(TAGS)
    with torch.no_grad():
        crf.transitions.normal_()
        crf.start.normal_()
        crf.end.normal_()
    # rows whose sentences sit between context tokens (valid IOB2 paths at the masked tokens), one whose every token
    # is its own, and their tokens packed to the front; a row with no token of its own counts in nothing
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 1, 1, 1], [1] * 8, [0] * 8], dtype=torch.bool)
    tags = torch.tensor([[0, 1, 2, 0, -100, -100, 3, -100], [-100, -100, 3, 4, -100, 4, 0, 1], [0, 1, 2, 2, 0, 3, 4, 0], [-100] * 8])
    emissions = torch.randn(4, 8, len(TAGS))
    packed_mask = torch.arange(8) < mask.sum(1, keepdim=True)
    order = [row.nonzero().flatten().tolist() + (~row).nonzero().flatten().tolist() for row in mask]
    packed = torch.stack([emissions[i, order[i]] for i in range(4)])
    packed_tags = torch.stack([tags[i, order[i]] for i in range(4)])
    nll = crf.nll(emissions, tags, mask)
    assert 0 < nll.item() < 100  # valid paths: no forbidden transition's score in it
    assert nll.item() == pytest.approx(crf.nll(packed[:3], packed_tags[:3], packed_mask[:3]).item(), abs=1e-6)
    paths, scores = crf.viterbi(emissions, mask), crf.path_scores(emissions, mask)
    expected_paths, expected_scores = crf.viterbi(packed, packed_mask), crf.path_scores(packed, packed_mask)
    assert scores[3].eq(0).all()
    for i in range(3):
        kept = mask[i].nonzero().flatten()
        assert paths[i, kept].tolist() == expected_paths[i, : len(kept)].tolist()
        assert torch.allclose(scores[i, kept], expected_scores[i, : len(kept)], atol=1e-6)
        assert scores[i, ~mask[i]].eq(0).all()  # context and padding: no tag


@pytest.mark.parametrize("crf", [True, False])
def test_no_loss_reaches_a_context_token(crf):
    torch.manual_seed(0)
    word_ids = torch.tensor([[-1, CONTEXT_WORD, CONTEXT_WORD, 0, 1, 1, 2, CONTEXT_WORD, -1, -1]])
    ids = torch.tensor([[2, 7, 8, 9, 10, 11, 12, 13, 3, 0]])  # pad id 0
    head = Tagger(4, len(TAGS), pad_id=0, dropout=0.0, crf=crf)
    if crf:
        head.crf.allow_iob2(TAGS)
    inside, begin = torch.tensor([0, 2, 2, 4, 4]), torch.tensor([0, 1, 1, 3, 3])
    # the sentence begins inside an entity (I-PER I-PER O: its beginning is in the context)
    labels = token_tags(
        [torch.tensor([2, 2, 0])], word_ids, inside, all_subwords=crf, specials=0 if crf else None, begin=begin if crf else None
    )
    assert labels[word_ids == CONTEXT_WORD].eq(IGNORED).all()
    if crf:  # the chain (CLS, the sentence, SEP) stays valid IOB2: the first I-PER after the context is a beginning
        assert labels[0].tolist() == [0, IGNORED, IGNORED, 1, 2, 2, 0, IGNORED, 0, 0]
    logits = torch.randn(1, 10, len(TAGS), requires_grad=True)
    TaggingLoss(head, 0.0)(logits, labels, ids).backward()
    assert logits.grad[word_ids == CONTEXT_WORD].eq(0).all() and logits.grad[word_ids >= 0].ne(0).any()


def test_a_tagger_trained_in_context_is_scored_on_its_sentences_and_tags_a_given_text_whole(cli, tmp_path, documents_root):
    from transferctl.recipes import evaluate, finetune

    config = write_config(tmp_path / "ner.yaml", NER.format(root=documents_root))
    options = ["head.crf=true", f"data.document_context={ROOM}", "data.tokenizer.max_length=40", "train.epochs=4"]
    run = finetune(None, config, options, runs_dir=tmp_path / "runs").run_dir
    tested = evaluate(str(run), runs_dir=tmp_path / "runs").metrics
    assert tested["entity_f1"] > 0.9 and tested["words_unread"] == 0
    truth = read_conll("conll_folder", documents_root / "test.txt")
    assert tested["entities"] == sum(tag.startswith("B-") for tags in truth.tags for tag in tags)

    # the tagger reads the context: a sentence's tag scores change when its neighbours are taken away
    record = read_trained_run(str(run), tmp_path / "runs")
    trained = load_trained(record, load_config(None, base=record.config))
    test, served = trained.split(train=False), trained.served()
    word_ids = test.side["word_ids"][1:9]  # sentences with context (before them, or for a document's first, after)
    ids, _, encodings = test.tokenization.encode([text.words for text in test.texts[1:9]], with_encodings=True)
    with torch.no_grad():
        in_context, alone = served(test.inputs[1:9].long(), word_ids=word_ids), served(ids.long())
    assert in_context[word_ids == CONTEXT_WORD].eq(0).all() and word_ids.eq(CONTEXT_WORD).any(1).all()
    own = [scores[ids >= 0] for scores, ids in zip(in_context, word_ids, strict=True)]
    by_itself = [scores[[w is not None for w in e.word_ids]] for scores, e in zip(alone, encodings, strict=True)]
    assert all(a.shape == b.shape for a, b in zip(own, by_itself, strict=True))
    assert any(not torch.allclose(a, b) for a, b in zip(own, by_itself, strict=True))

    assert f"up to {ROOM} tokens" in trained.method.task.card(test)["document_context"]  # what an export's card says

    # predict tags a text given whole, all of it
    text = "Omar Khan joined Globex Bank last year . Anna Berg visited Oslo on Monday ."
    predicted = cli("predict", "--from", run, "--runs-dir", tmp_path / "runs", "--text", text, "-o", tmp_path / "out.jsonl")
    assert predicted.code == 0, predicted.stderr
    entities = json.loads((tmp_path / "out.jsonl").read_text())["entities"]
    assert {(e["text"], e["type"]) for e in entities} >= {("Omar Khan", "PER"), ("Oslo", "LOC")}  # both sentences


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.document_context=-1", "data.document_context: Input should be greater than or equal to 0"),
        ("data.name=token_jsonl", "data.document_context: unknown option for data 'token_jsonl'"),  # JSONL has no documents
    ],
)
def test_bad_document_context_is_a_one_line_error_and_no_run(cli, tmp_path, documents_root, override, message):
    config = write_config(tmp_path / "ner.yaml", NER.format(root=documents_root))
    done = cli("finetune", "-c", config, "data.document_context=4", override, "--runs-dir", tmp_path / "runs")
    assert done.code == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
