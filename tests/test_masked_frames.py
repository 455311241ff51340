"""Masked frame modelling: spans hidden within each recording's real frames (seeded), BEST-RQ codes fixed by their
seed, pretraining that lowers the hidden frames' loss on held-out utterances, a speech recognizer fine-tuned
`--from` it on the pretrained frame encoder, a resumed run that draws the masks an uninterrupted one would, and bad
input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import save_tiny_wav2vec2, write_config
from tests.test_resume import killed_and_resumed
from tests.test_speech_recognition import ASR, fsdd_root  # noqa: F401  (the made-up recordings)
from transferctl import checkpoints
from transferctl.methods.masked_frames import RandomProjectionQuantizer, SpanMasking

PRETRAIN = """\
method: {{name: masked_frames, {method}}}
model: {{name: conv1d, widths: [24, 48], kernel_size: 5}}
optimizer: {{name: adamw, lr: 0.005}}
scheduler: {{name: constant}}
data: {{name: fsdd_sequences, root: {root}, train_utterances: 160, test_utterances: 24, min_digits: 1, max_digits: 3,
        batch_size: 16, eval_batch_size: 32}}
train: {{epochs: 4, log_every: 5, device: cpu, checkpoint_every: 10}}
"""


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, fsdd_root):  # noqa: F811
    from transferctl.recipes import pretrain

    folder = tmp_path_factory.mktemp("masked_frames")
    config = write_config(folder / "pretrain.yaml", PRETRAIN.format(root=fsdd_root, method="codebook_size: 32"))
    return pretrain(config, [], runs_dir=folder / "runs").run_dir


def test_spans_are_hidden_within_each_recording_s_real_frames_and_seeded():
    masking = SpanMasking(ratio=0.5, span=10)
    lengths = torch.tensor([400, 120, 7])
    hidden = masking(3, 400, lengths, torch.Generator().manual_seed(1))
    assert hidden.shape == (3, 400)
    assert not hidden[1, 120:].any() and not hidden[2, 7:].any()  # never a padded frame
    assert all(hidden[i].any() for i in range(3))  # every recording hides at least one span
    assert 0.3 < hidden[0].float().mean() <= 0.5  # 20 spans of 10 over 400 frames, some overlapping
    again = masking(3, 400, lengths, torch.Generator().manual_seed(1))
    assert torch.equal(hidden, again)
    # two ranks' halves of a global batch are what one process draws for the whole of it
    halves = [masking(2, 400, None, torch.Generator().manual_seed(2), rank, 2) for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), masking(4, 400, None, torch.Generator().manual_seed(2)))


def test_codes_are_fixed_by_their_seed_and_tell_frames_apart():
    frames = torch.randn(500, 40)
    first, second = RandomProjectionQuantizer(40, 64, 16, seed=3), RandomProjectionQuantizer(40, 64, 16, seed=3)
    codes = first(frames)
    assert torch.equal(codes, second(frames)) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64 and len(codes.unique()) > 16  # random frames spread over the codebook
    assert not torch.equal(codes, RandomProjectionQuantizer(40, 64, 16, seed=4)(frames))
    assert torch.equal(first(2.0 * frames), codes)  # a code is a direction: the frame's scale does not change it


def test_pretraining_lowers_the_hidden_frames_loss_and_a_recognizer_fine_tunes_from_it(cli, pretrained, tmp_path, fsdd_root):  # noqa: F811
    runs = pretrained.parent
    rows = [r for r in _metrics(pretrained) if "val_loss" in r]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and rows[-1]["val_masked_accuracy"] > rows[0]["val_masked_accuracy"], rows

    evaluation = cli("evaluate", "--from", pretrained, "--runs-dir", runs, "--json")
    assert evaluation.code == 0, evaluation.stderr
    metrics = evaluation.json["metrics"]
    assert 0 < metrics["masked_accuracy"] <= 1 and metrics["masked_loss"] > 0

    config = write_config(tmp_path / "asr.yaml", ASR.format(root=fsdd_root))
    tuned = cli("finetune", "--from", pretrained, "-c", config, "--runs-dir", runs, "train.max_steps=1", "optimizer.lr=1e-7", "--json")
    assert tuned.code == 0, tuned.stderr
    source, started = (checkpoints.read(Path(run) / "checkpoints" / "last.pt").encoder() for run in (pretrained, tuned.json["run_dir"]))
    learnt = [k for k in source if "running_" not in k and "num_batches" not in k]  # batch statistics move in the step
    assert source.keys() == started.keys() and all(torch.allclose(source[k], started[k], atol=1e-4) for k in learnt)


def test_a_killed_masked_frames_run_resumes_bit_exactly(tmp_path, fsdd_root):  # noqa: F811
    config = write_config(tmp_path / "pretrain.yaml", PRETRAIN.format(root=fsdd_root, method="target: signal"))
    whole, resumed = killed_and_resumed("pretrain", config, ["train.epochs=2", "train.checkpoint_every=3"], tmp_path)
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.name=mnist", "model.name=cnn"], "hides frames of recordings"),
        (["model.name=cnn"], "gives no features at those frames; use conv1d, gru, lstm"),
    ],
)
def test_masked_frames_refuses_data_and_encoders_without_frames(cli, tmp_path, fsdd_root, overrides, message):  # noqa: F811
    config = write_config(tmp_path / "pretrain.yaml", PRETRAIN.format(root=fsdd_root, method="target: codes"))
    result = cli("pretrain", "-c", config, "--runs-dir", tmp_path / "runs", *overrides)
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_masked_frames_refuses_a_speech_checkpoint_whose_frames_are_its_own(cli, tmp_path, fsdd_root):  # noqa: F811
    checkpoint = save_tiny_wav2vec2(tmp_path / "wav2vec2", layers=1)
    config = write_config(tmp_path / "pretrain.yaml", PRETRAIN.format(root=fsdd_root, method="target: codes"))
    result = cli("pretrain", "-c", config, "--runs-dir", tmp_path / "runs", "model.name=hf", f"model.weights={checkpoint}")
    assert result.code == 2 and "model 'hf' gives no features at those frames" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
