"""Named entities on the real CoNLL-2003 files; runs when TRANSFERCTL_DATA_DIR points at a folder holding CoNLL2003."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from seqeval.metrics.sequence_labeling import get_entities

from transferctl.config import load_config
from transferctl.data.datasets import load_split, load_training_data
from transferctl.tasks.token_classification import entity_spans

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ["TRANSFERCTL_DATA_DIR"]).resolve() if os.environ.get("TRANSFERCTL_DATA_DIR") else None

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        DATA_DIR is None or not (DATA_DIR / "CoNLL2003" / "train.txt").is_file(),
        reason="set TRANSFERCTL_DATA_DIR to a folder with CoNLL2003",
    ),
]


def test_the_recipe_reads_the_shared_splits_with_dev_validating_and_the_test_entities_counted():
    cfg = load_config(REPO / "configs" / "ner_conll2003.yaml", [f"data.root={DATA_DIR}"])
    data = load_training_data(cfg.data, labelled_subset=True)
    assert (len(data.train), len(data.val)) == (14041, 3250)  # all of train; dev is the validation split
    assert data.train.classes == ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER")
    tokenization = data.train.tokenization
    assert tokenization.max_length == 128 and tokenization.tokenizer.encode("Peter").tokens[1] == "Peter"  # case kept
    test = load_split(cfg.data, train=False)
    tags = [[test.classes[i] for i in t.tolist()] for t in test.targets]
    # the I- tags that begin an entity in the shared file, read as beginnings: the entities seqeval finds in the file
    raw, sentence = [], []
    for line in [*(DATA_DIR / "CoNLL2003" / "test.txt").read_text().splitlines(), ""]:
        if line.split():
            sentence.append(line.split()[-1])
        elif sentence:
            raw.append(sentence)
            sentence = []
    assert len(test) == len(raw) == 3453
    assert [entity_spans(s) for s in tags] == [[(k, a, b + 1) for k, a, b in get_entities(s)] for s in raw]
    assert Counter(kind for s in tags for kind, _, _ in entity_spans(s))["PER"] == 1617
    assert int(data.train.cut.sum()) <= 2  # 128 tokens read nearly every sentence whole
