"""The `hf` model across Hugging Face text encoder families: for each, a tiny random checkpoint folder saved as a
download holds it (config.json + model.safetensors of the family's usual hub class, and a tokenizer.json of the
family's kind with its special tokens where the family keeps them), and transferctl

- builds an encoder that gives the checkpoint's own features on the same ids (the [CLS] position),
- gives the checkpoint's token features (every position, and which are padding),
- fine-tunes it for a few steps and exports it to ONNX with parity.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import tokenizers as tk
import torch
import transformers

from tests.test_text import CONFIG, TOPICS, _ok, article, make_text_root, write_config
from transferctl.data.text import TokenizerOptions, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: models this small run fastest on one thread

MAX_LENGTH = 24  # CONFIG's data.tokenizer.max_length
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}


def texts() -> list[str]:
    return [article(t, random.Random(i)) for i in range(30) for t in TOPICS]


# --------------------------------------------------------------------------- tokenizers as the families ship them


def wordpiece() -> tk.Tokenizer:
    """BERT's: WordPiece, [PAD] [UNK] [CLS] [SEP] [MASK], [CLS] text [SEP] (transferctl's own trainer makes one)."""
    return tk.Tokenizer.from_str(train_tokenizer(texts(), TokenizerOptions(vocab_size=150)))


def byte_level_bpe(specials: list[str], added: list[str], template: tuple[str, str], roberta: bool = False) -> tk.Tokenizer:
    """GPT-2's byte-level BPE: RoBERTa's (<s> <pad> </s> <unk> first, <mask> added last) and ModernBERT's (every
    special token added after the merges, as OLMo's tokenizer that it extends)."""
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    return _finished(tokenizer, added, template, roberta)


def unigram(specials: list[str], added: list[str], template: tuple[str, str], unk: str) -> tk.Tokenizer:
    """SentencePiece's unigram with the metaspace: XLM-RoBERTa's (<s> <pad> </s> <unk>, <mask> last) and
    DeBERTa-v2/v3's ([PAD] [CLS] [SEP] [UNK], [MASK] last)."""
    tokenizer = tk.Tokenizer(tk.models.Unigram())
    tokenizer.normalizer = tk.normalizers.NFKC()
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = tk.decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = tk.trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token=unk, show_progress=False)
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    return _finished(tokenizer, added, template)


def _finished(tokenizer: tk.Tokenizer, added: list[str], template: tuple[str, str], roberta: bool = False) -> tk.Tokenizer:
    """The special tokens added after the vocabulary, and the text between the first and the last (RoBERTa's own
    post-processor for RoBERTa, a template for the others, as their tokenizer.json files hold)."""
    tokenizer.add_special_tokens([tk.AddedToken(t, lstrip=t == "<mask>", special=True) for t in added])
    first, last = template
    if roberta:
        tokenizer.post_processor = tk.processors.RobertaProcessing(
            (last, tokenizer.token_to_id(last)), (first, tokenizer.token_to_id(first)), trim_offsets=True, add_prefix_space=False
        )
        return tokenizer
    tokenizer.post_processor = tk.processors.TemplateProcessing(
        single=f"{first} $A {last}",
        pair=f"{first} $A {last} {last} $B {last}" if first == "<s>" else f"{first} $A {last} $B {last}",
        special_tokens=[(first, tokenizer.token_to_id(first)), (last, tokenizer.token_to_id(last))],
    )
    return tokenizer


# --------------------------------------------------------------------------- the families


@dataclass(frozen=True)
class Family:
    model_class: str  # the hub checkpoints' usual class (a masked language model, ELECTRA's discriminator)
    config: Callable[[tk.Tokenizer], object]  # the tokenizer -> the tiny model's config
    tokenizer: Callable[[], tk.Tokenizer]


def ids(tokenizer: tk.Tokenizer, *names: str) -> dict[str, int]:
    """The config's special token ids, named as the tokenizer names them: pad, bos, eos, cls, sep (as many as given)."""
    roles = ("pad", "bos", "eos", "cls", "sep")[: len(names)]
    return {f"{role}_token_id": tokenizer.token_to_id(name) for role, name in zip(roles, names, strict=True)}


ROBERTA_TOKENIZER = lambda: byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"], ("<s>", "</s>"), roberta=True)
XLMR_TOKENIZER = lambda: unigram(["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"], ("<s>", "</s>"), "<unk>")
ROBERTA_POSITIONS = {**TINY, "max_position_embeddings": 64 + 2}  # positions count from pad_token_id + 1 (514 on the hub)

FAMILIES = {
    "bert": Family(
        "BertForMaskedLM", lambda t: transformers.BertConfig(vocab_size=t.get_vocab_size(), **TINY, **ids(t, "[PAD]")), wordpiece
    ),
    "distilbert": Family(
        "DistilBertForMaskedLM",
        lambda t: transformers.DistilBertConfig(
            vocab_size=t.get_vocab_size(), dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, **ids(t, "[PAD]")
        ),
        wordpiece,
    ),
    "roberta": Family(
        "RobertaForMaskedLM",
        lambda t: transformers.RobertaConfig(
            vocab_size=t.get_vocab_size(), type_vocab_size=1, **ROBERTA_POSITIONS, **ids(t, "<pad>", "<s>", "</s>")
        ),
        ROBERTA_TOKENIZER,
    ),
    "deberta-v2": Family(  # as deberta-v3-base: relative attention, no absolute positions
        "DebertaV2ForMaskedLM",
        lambda t: transformers.DebertaV2Config(
            vocab_size=t.get_vocab_size(),
            **TINY,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            type_vocab_size=0,
            **ids(t, "[PAD]", "[CLS]", "[SEP]"),
        ),
        lambda: unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]"], ["[MASK]"], ("[CLS]", "[SEP]"), "[UNK]"),
    ),
    "electra": Family(  # a discriminator, whose embeddings (16) are narrower than its hidden states (32)
        "ElectraForPreTraining",
        lambda t: transformers.ElectraConfig(vocab_size=t.get_vocab_size(), embedding_size=16, **TINY, **ids(t, "[PAD]")),
        wordpiece,
    ),
    "xlm-roberta": Family(
        "XLMRobertaForMaskedLM",
        lambda t: transformers.XLMRobertaConfig(
            vocab_size=t.get_vocab_size(), type_vocab_size=1, **ROBERTA_POSITIONS, **ids(t, "<pad>", "<s>", "</s>")
        ),
        XLMR_TOKENIZER,
    ),
    "modernbert": Family(  # layer 0 global, layer 1 a 16-token sliding window (local_attention), rotary positions
        "ModernBertForMaskedLM",
        lambda t: transformers.ModernBertConfig(
            vocab_size=t.get_vocab_size(), **TINY, local_attention=16, **ids(t, "[PAD]", "[CLS]", "[SEP]", "[CLS]", "[SEP]")
        ),
        lambda: byte_level_bpe([], ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"], ("[CLS]", "[SEP]")),
    ),
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> Path:
    return make_text_root(tmp_path_factory.mktemp("zoo") / "data")


CHECKPOINT_SEED = 1234  # not the run's: a fresh encoder must not happen to hold the checkpoint's weights


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Callable[..., Path]:
    """(family, dtype) -> its checkpoint folder, saved once for the module (the same weights in any dtype); every
    weight of it is what transformers' AutoModel reads back."""
    saved: dict[tuple[str, torch.dtype], Path] = {}

    def folder_of(name: str, dtype: torch.dtype = torch.float32) -> Path:
        if (name, dtype) not in saved:
            family = FAMILIES[name]
            tokenizer = family.tokenizer()
            folder = tmp_path_factory.mktemp(name)
            torch.manual_seed(CHECKPOINT_SEED)
            model = getattr(transformers, family.model_class)(family.config(tokenizer)).eval().to(dtype)
            model.save_pretrained(folder)
            tokenizer.save(str(folder / "tokenizer.json"))
            read = transformers.AutoModel.from_pretrained(str(folder), dtype=dtype).state_dict()
            base = model.base_model.state_dict()
            assert base.keys() <= read.keys() and all(k.startswith("pooler.") for k in read.keys() - base.keys())  # no pooler saved
            assert all(torch.equal(read[k], base[k]) for k in base)
            saved[name, dtype] = folder
        return saved[name, dtype]

    return folder_of


def recipe_of(tmp_path: Path, folder: Path, text_root: Path) -> Path:
    text = CONFIG.format(method="finetune", model="hf", root=text_root, epochs=1)
    return write_config(tmp_path / "hf.yaml", text.replace("model: {name: hf}", f"model: {{name: hf, weights: {folder}}}"))


def build(tmp_path: Path, folder: Path, text_root: Path, *overrides: str):
    from transferctl.build import build_training
    from transferctl.config import load_config

    return build_training(load_config(recipe_of(tmp_path, folder, text_root), ["train.max_steps=1", *overrides]))


def encoder_and_reference(tmp_path: Path, folder: Path, text_root: Path):
    """transferctl's encoder before any step, a batch of its ids, and the checkpoint's AutoModel's outputs (in float32)
    on the same texts, read with the folder's tokenizer alone (its own padding, not transferctl's pad id)."""
    training = build(tmp_path, folder, text_root)
    assert training.train.tokenization.tokenizer_json == (folder / "tokenizer.json").read_text()  # the folder's tokenizer is the run's
    ids = training.train.inputs[:4].long()
    tokenizer = tk.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_LENGTH)
    pad = next(tokenizer.token_to_id(p) for p in ("[PAD]", "<pad>") if tokenizer.token_to_id(p) is not None)
    tokenizer.enable_padding(pad_id=pad, length=MAX_LENGTH)
    encodings = tokenizer.encode_batch(list(training.train.texts[:4]))
    expected_ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    assert torch.equal(ids, expected_ids), "transferctl's ids are not the folder tokenizer's"
    reference = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(input_ids=expected_ids, attention_mask=mask).last_hidden_state
    return training.network.encoder.eval(), ids, theirs, mask.bool()


# --------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("name", FAMILIES)
def test_the_encoder_gives_the_checkpoints_pooled_and_token_features(tmp_path, text_root, folders, name):
    encoder, ids, theirs, mask = encoder_and_reference(tmp_path, folders(name), text_root)
    with torch.no_grad():
        ours = encoder(ids)
        steps, kept = encoder.token_features(ids)
    torch.testing.assert_close(ours, theirs[:, 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(kept, mask)
    torch.testing.assert_close(steps[mask], theirs[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["roberta"])  # BERT's: tests/test_text.py; the others load and run alike
def test_a_checkpoint_fine_tunes_exports_and_resumes_without_its_folder(cli, tmp_path, text_root, folders, name):
    folder = folders(name)
    tuned = _ok(cli("finetune", "-c", recipe_of(tmp_path, folder, text_root), "train.max_steps=3", "--json"))
    away = folder.rename(folder.with_name(folder.name + "-away"))  # the run rebuilds its encoder without the folder
    try:
        exported = _ok(cli("export", "--from", tuned["run_dir"], "--format", "torchscript", "--json"))  # ONNX: test_text's BERT
        resumed = cli("finetune", "--resume", tuned["run_dir"], "train.epochs=3", "--json")  # tokenized with the run's own tokenizer
        assert resumed.code == 0, resumed.stderr
    finally:
        away.rename(folder)
    assert exported["parity"] and all(p["passed"] for p in exported["parity"].values()), exported["parity"]


@pytest.mark.parametrize("name", ["modernbert"])
def test_a_half_precision_checkpoint_gives_float32_features(tmp_path, text_root, folders, name):
    """Hub checkpoints are often saved in bfloat16 or float16 (config.json's `dtype`); the encoder trains in float32
    beside its float32 head."""
    encoder, ids, theirs, _ = encoder_and_reference(tmp_path, folders(name, torch.bfloat16), text_root)
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    with torch.no_grad():
        ours = encoder(ids)
    torch.testing.assert_close(ours, theirs[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["roberta", "xlm-roberta"])
def test_max_length_is_checked_against_the_positions_that_roberta_can_use(tmp_path, text_root, folders, name):
    """RoBERTa's positions count from pad_token_id + 1: 64 of its 66 hold texts (512 of roberta-base's 514)."""
    from transferctl.errors import ConfigError

    assert build(tmp_path, folders(name), text_root, "data.tokenizer.max_length=64").train.inputs.shape[1] == 64
    with pytest.raises(ConfigError, match="lower max_length"):
        build(tmp_path, folders(name), text_root, "data.tokenizer.max_length=65")


@pytest.mark.parametrize("name", ["roberta"])
def test_a_checkpoint_tags_named_entities_over_its_own_subwords(cli, tmp_path, folders, name):
    """Token classification on a public checkpoint: words split by the folder's tokenizer, labels aligned to first
    subwords, the entity F1 evaluated."""
    from tests.test_token_classification import write_conll

    for split, count, seed in (("train", 60, 0), ("dev", 20, 1), ("test", 20, 2)):
        write_conll(tmp_path / f"{split}.txt", count, seed)
    recipe = Path(__file__).parent.parent / "configs" / "ner_conll2003.yaml"  # a CRF tagger
    args = ["model.name=hf", f"model.weights={folders(name)}", "data.name=conll_folder", f"data.root={tmp_path}"]
    args += ["data.tokenizer.max_length=32", "train.max_steps=3", "train.precision=32"]
    tuned = _ok(cli("finetune", "-c", str(recipe), *args, "--json"))
    evaluated = _ok(cli("evaluate", "--from", tuned["run_dir"], "--json"))
    assert 0 <= evaluated["metrics"]["entity_f1"] <= 1
