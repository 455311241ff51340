"""Speech recognition: utterances composed of trimmed takes (seeded, splits keeping speakers and takes apart), padding
that changes no real frame of the front end and the frame encoders, CTC decoding and the alignment check, WER and CER
against jiwer, transcribed folders and their bad input, and the chain: train, a killed run resumed bit-exactly,
evaluate, export with a dynamic length and lengths beside the waveforms, predict a transcript per file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch

from tests.conftest import write_config
from tests.test_audio import write_wav
from tests.test_resume import killed_and_resumed
from transferctl.components import load_components
from transferctl.data.speech import DIGIT_WORDS, trim_silence
from transferctl.modalities.audio import FrontEnd, LogMel
from transferctl.models.sequence import conv1d, gru, lstm
from transferctl.registry import DATASETS
from transferctl.tasks.speech_recognition import Alphabet, error_rates, frames_needed, greedy_ids

RATE = 8000
SPEAKERS = ("george", "lucas", "jackson")

ASR = """\
method: finetune
task: {{name: speech_recognition}}
model: {{name: conv1d, widths: [24, 48], kernel_size: 5}}
head: {{name: ctc, dropout: 0.0}}
optimizer: {{name: adamw, lr: 0.01}}
scheduler: {{name: constant}}
data: {{name: fsdd_sequences, root: {root}, train_utterances: 160, test_utterances: 24, min_digits: 1, max_digits: 3,
        batch_size: 16, eval_batch_size: 32, augment: {{name: none}}}}
train: {{epochs: 5, log_every: 5, device: cpu, checkpoint_every: 10, grad_clip_norm: 5.0}}
"""


def digit_take(digit: int, speaker: int, take: int) -> np.ndarray:
    """A made-up take: a tone of the digit's pitch (a little apart per speaker and take) between silences."""
    rng = np.random.default_rng(100 * digit + 10 * speaker + take)
    seconds = 0.12 + 0.01 * take
    t = np.arange(round(seconds * RATE)) / RATE
    voiced = 0.5 * np.sin(2 * np.pi * (400 + 350 * digit + 15 * speaker) * t)
    before, after = (np.zeros(round(rng.uniform(0.05, 0.15) * RATE)) for _ in range(2))
    return np.concatenate([before, voiced, after])


@pytest.fixture(scope="session")
def fsdd_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdd_sequences")
    for digit in range(4):
        for s, speaker in enumerate(SPEAKERS):
            for take in range(8):  # takes 0-4: the official test split's
                write_wav(root / "FSDD" / "recordings" / f"{digit}_{speaker}_{take}.wav", digit_take(digit, s, take))
    return root


@pytest.fixture(scope="session")
def asr_run(tmp_path_factory, fsdd_root) -> Path:
    """A recognizer trained on the made-up utterances (shared by the tests that read a trained run)."""
    from transferctl.recipes import finetune

    folder = tmp_path_factory.mktemp("asr")
    config = write_config(folder / "asr.yaml", ASR.format(root=fsdd_root))
    return finetune(None, config, [], runs_dir=folder / "runs").run_dir


def _split(root: Path, train: bool, **options):
    load_components()
    return DATASETS.build("fsdd_sequences", options, root=root, download=False, train=train)


# --------------------------------------------------------------------------- utterances


def test_takes_are_trimmed_of_silence_below_the_peak():
    voiced = np.concatenate([np.zeros(800), 0.5 * np.sin(np.arange(1600) / 3), 0.001 * np.ones(800), np.zeros(400)])
    samples = torch.from_numpy(voiced * 32767).to(torch.int16)
    kept = trim_silence(samples, RATE, top_db=40)
    # the whole voiced part, and less than a 20 ms frame more at either end: the -56 dB hum and the silence go
    assert 1600 <= len(kept) <= 1600 + 2 * 160
    assert kept.abs().sum() >= samples[800:2400].abs().sum() and kept.abs().sum() < samples.abs().sum()


def test_utterances_are_seeded_and_the_splits_keep_their_takes_and_speakers_apart(fsdd_root):
    train, again = _split(fsdd_root, True, train_utterances=40), _split(fsdd_root, True, train_utterances=40)
    assert torch.equal(train.inputs, again.inputs) and list(train.targets) == list(again.targets)
    other = _split(fsdd_root, True, train_utterances=40, utterance_seed=1)
    assert list(other.targets) != list(train.targets)
    words = [text.split() for text in train.targets]
    assert all(2 <= len(w) <= 6 and set(w) <= set(DIGIT_WORDS[:4]) for w in words)
    # each recording is its takes (trimmed) and 50-300 ms pauses: longer than its voiced parts, shorter than untrimmed
    lengths = train.side["samples"].tolist()
    shortest = [len(w) * 0.12 * RATE + (len(w) + 1) * 0.05 * RATE for w in words]
    longest = [len(w) * 0.4 * RATE + (len(w) + 1) * 0.3 * RATE for w in words]
    assert all(low <= n <= high for low, n, high in zip(shortest, lengths, longest, strict=True))
    assert (train.inputs[torch.arange(len(train)), train.side["samples"] - 1] == 0).all()  # each ends in a pause
    assert train.target_kind == "transcript" and train.clip_samples is None
    assert torch.equal(train.side["lengths"], train.front_end.steps(train.side["samples"]))

    # official: training utterances draw takes 5-7, test utterances takes 0-4; speakers: the test speakers' alone
    def takes(split) -> list[tuple[int, str, int]]:  # (digit, speaker, take) of every take an utterance is made of
        made = [name.split("_") for text in split.targets for name in text.source.split("(")[1].rstrip(")").split()]
        return [(int(d), speaker, int(take)) for d, speaker, take in made]

    test = _split(fsdd_root, False, test_utterances=40)
    assert {t for _, _, t in takes(train)} <= {5, 6, 7} and {t for _, _, t in takes(test)} <= {0, 1, 2, 3, 4}
    assert {s for _, s, _ in takes(train)} == {s for _, s, _ in takes(test)} == set(SPEAKERS)
    for text, made in zip(train.targets, [t.source for t in train.targets], strict=True):  # one speaker, its digits in order
        parts = [name.split("_") for name in made.split("(")[1].rstrip(")").split()]
        assert len({speaker for _, speaker, _ in parts}) == 1 and text.split() == [DIGIT_WORDS[int(d)] for d, _, _ in parts]
    held_out = _split(fsdd_root, False, split="speakers", test_speakers=["lucas"], test_utterances=20)
    rest = _split(fsdd_root, True, split="speakers", test_speakers=["lucas"], train_utterances=20)
    assert {s for _, s, _ in takes(held_out)} == {"lucas"} and {s for _, s, _ in takes(rest)} == {"george", "jackson"}


# --------------------------------------------------------------------------- padding changes no real frame


def test_a_padded_batch_gives_each_recording_its_own_frames_in_the_front_end_and_the_encoders():
    torch.manual_seed(0)
    front_end = FrontEnd.of(RATE, 40, 32.0, 10.0)
    log_mel = LogMel(front_end, tuple(torch.randn(40).tolist()), tuple((torch.rand(40) + 0.5).tolist()))
    samples = torch.tensor([8000, 5111, 2047])
    batch = torch.randn(3, 8000) * (torch.arange(8000) < samples.view(-1, 1))
    steps = front_end.steps(samples)
    assert steps.tolist() == [(8000 - 128) // 80 + 1, (5111 - 128) // 80 + 1, (2047 - 128) // 80 + 1]
    padded = log_mel(batch)
    encoders = [conv1d(40, widths=(16, 32, 32)), gru(40, hidden_dim=16), lstm(40, hidden_dim=16, layers=1)]
    features = [e.eval().token_features(padded, steps)[0] for e in encoders]
    for i, n in enumerate(samples.tolist()):
        alone = log_mel(batch[i : i + 1, :n])
        assert torch.equal(alone[..., : steps[i]], padded[i : i + 1, ..., : steps[i]])  # every frame whose window lies inside
        for encoder, together in zip(encoders, features, strict=True):
            own = encoder.token_features(alone, steps[i : i + 1])[0]
            torch.testing.assert_close(own[0, : steps[i]], together[i, : steps[i]], atol=1e-5, rtol=1e-5)
        # pooled features too: the mean over the real frames alone
        torch.testing.assert_close(encoders[1](alone, steps[i : i + 1])[0], encoders[1](padded, steps)[i], atol=1e-5, rtol=1e-5)


def test_the_dense_conv1d_features_are_the_pooled_network_s_at_every_frame():
    encoder = conv1d(40, widths=(16, 32, 32)).eval()
    x = torch.randn(2, 1, 40, 64)
    pooled = torch.nn.Sequential(*list(encoder)[:-2])(x.squeeze(1))  # the stages with their max-pools: a frame in 4
    dense = encoder.token_features(x)[0].transpose(1, 2)
    torch.testing.assert_close(dense[..., ::4][..., 1:-1], pooled[..., 1:-1])  # the edges read the convolutions' padding


# --------------------------------------------------------------------------- decoding and scoring


def test_greedy_decoding_merges_repeats_drops_blanks_and_needs_a_blank_between_equal_labels():
    path = torch.tensor([[0, 1, 1, 0, 1, 2, 2, 0, 0, 3]])
    log_probs = torch.nn.functional.one_hot(path, 4).float().log()
    assert greedy_ids(log_probs) == [[1, 1, 2, 3]]
    alphabet = Alphabet(("one", "two", "three"), "words")
    assert alphabet.decode([1, 1, 2, 3]) == "one one two three"
    assert alphabet.encode("three one").tolist() == [3, 1]
    characters = Alphabet((" ", "a", "b"), "characters")
    assert characters.split("ab  ba") == ["a", "b", " ", "b", "a"] and characters.missing("abc") == ["c"]
    assert frames_needed([1, 1, 2]) == 4 and frames_needed([1, 2, 3]) == 3 and frames_needed([]) == 0


def test_word_and_character_error_rates_count_as_jiwer_does():
    rng = random.Random(0)
    words = ["one", "two", "three", "four", "oh"]
    truth = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(200)]
    guess = []
    for text in truth:
        said = text.split()
        for _ in range(rng.randint(0, 3)):  # substitutions, deletions and insertions
            at = rng.randrange(len(said) + 1)
            kind = rng.choice("sdi")
            if kind == "i" or not said:
                said.insert(at, rng.choice(words))
            elif kind == "d":
                said.pop(min(at, len(said) - 1))
            else:
                said[min(at, len(said) - 1)] = rng.choice(words)
        guess.append(" ".join(said))
    rates = error_rates(truth, guess)
    assert rates["wer"] == pytest.approx(jiwer.wer(truth, guess)) and rates["cer"] == pytest.approx(jiwer.cer(truth, guess))
    assert rates["utterance_accuracy"] == pytest.approx(sum(t == g for t, g in zip(truth, guess, strict=True)) / len(truth))
    assert 0 < rates["wer"] < 1


# --------------------------------------------------------------------------- the chain


def test_a_trained_recognizer_evaluates_exports_with_any_length_and_predicts_transcripts(cli, tmp_path, asr_run):
    runs = asr_run.parent
    evaluation = cli("evaluate", "--from", asr_run, "--runs-dir", runs, "--json")
    assert evaluation.code == 0, evaluation.stderr
    metrics = evaluation.json["metrics"]
    assert metrics["wer"] < 0.2 and metrics["cer"] < metrics["wer"] + 0.2 and metrics["utterances"] == 24, metrics
    # the rates it reports are jiwer's on the transcripts the model gives
    from transferctl.build import load_trained
    from transferctl.config import load_config
    from transferctl.runs import read_trained_run

    record = read_trained_run(str(asr_run), runs)
    trained = load_trained(record, load_config(None, base=record.config))
    test = trained.split(train=False)
    truth, guess = trained.method.task.transcribe(trained.served(), test, 7)
    assert metrics["wer"] == pytest.approx(jiwer.wer(truth, guess)) and metrics["cer"] == pytest.approx(jiwer.cer(truth, guess))

    export = cli("export", "--from", asr_run, "--format", "onnx", "--runs-dir", runs, "--json")
    assert export.code == 0, export.stderr
    assert export.json["parity"]["onnx"]["passed"] and export.json["parity"]["onnx"]["transcript_agreement"] >= 0.99
    folder = Path(export.json["export_dir"])
    card = json.loads((folder / "model_card.json").read_text())
    assert card["kind"] == "speech_recognizer" and card["blank_id"] == 0 and card["frame_rate"] == 100.0
    assert card["alphabet"] == sorted(DIGIT_WORDS[:4]) and card["input"]["clip_samples"] is None

    # onnxruntime on recordings of lengths it never saw, alone and padded together: the same transcripts
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["waveforms", "lengths"]
    takes = [digit_take(d, 1, 2) for d in (3, 0, 2)]
    recordings = [np.concatenate(takes).astype(np.float32), takes[1].astype(np.float32)]
    longest = max(len(r) for r in recordings)
    batch = np.stack([np.pad(r, (0, longest - len(r))) for r in recordings])
    lengths = np.array([len(r) for r in recordings], dtype=np.int64)
    together = session.run(None, {"waveforms": batch, "lengths": lengths})[0]
    alone = [session.run(None, {"waveforms": r[None], "lengths": lengths[i : i + 1]})[0] for i, r in enumerate(recordings)]
    assert together.shape[1] == longest // 80 and alone[1].shape[1] == len(recordings[1]) // 80
    assert greedy_ids(torch.from_numpy(together)) == [greedy_ids(torch.from_numpy(a))[0] for a in alone]

    # predict: a transcript per file, from the run and from the export folder
    for i, recording in enumerate(recordings):
        write_wav(tmp_path / "in" / f"{i}.wav", recording)
    for source in (asr_run, folder):
        served = cli("predict", "--from", source, tmp_path / "in", "--runs-dir", runs, "-o", tmp_path / "out.jsonl")
        assert served.code == 0, served.stderr
        rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert [r["transcript"] for r in rows] == ["three zero two", "zero"], rows
        assert all(0 < r["confidence"] <= 1 for r in rows)


def test_a_killed_recognizer_run_resumes_bit_exactly(tmp_path, fsdd_root):
    config = write_config(tmp_path / "asr.yaml", ASR.format(root=fsdd_root))
    overrides = ["train.epochs=2", "data.train_utterances=80", "train.checkpoint_every=3"]
    whole, resumed = killed_and_resumed("finetune", config, overrides, tmp_path)
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


# --------------------------------------------------------------------------- your own recordings, and bad input


def speech_folder(root: Path, rows: dict[str, list[tuple[str, str]]] | None = None, header: str = "file_name,text") -> Path:
    """<root>/{train,test}/metadata.csv and the recordings it names: `rows` per split (file, transcript)."""
    rows = rows or {
        "train": [(f"{i}.wav", " ".join(DIGIT_WORDS[d] for d in (i % 4, (i + 1) % 4))) for i in range(12)],
        "test": [(f"{i}.wav", DIGIT_WORDS[i % 4]) for i in range(4)],
    }
    for split, listed in rows.items():
        for name, text in listed:
            digits = [DIGIT_WORDS.index(w) for w in text.split() if w in DIGIT_WORDS] or [0]
            write_wav(root / split / name, np.concatenate([digit_take(d, 0, 1) for d in digits]))
        lines = [header, *(f"{name},{text}" for name, text in listed)]
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_a_transcribed_folder_is_read_whole_with_its_transcripts(tmp_path):
    root = speech_folder(tmp_path / "speech")
    load_components()
    train = DATASETS.build("speech_folder", {"sample_rate": RATE}, root=root, download=False, train=True)
    assert len(train) == 12 and train.clip_samples is None and str(train.targets[1]) == "one two"
    assert train.targets[1].source == str(root / "train" / "1.wav")
    assert train.side["samples"][1] == len(np.concatenate([digit_take(1, 0, 1), digit_take(2, 0, 1)]))


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_text_column", "has no column 'text'"),
        ("missing_file", "names 'gone.wav', which is not a file"),
        ("empty_transcript", "an empty transcript"),
        ("outside_alphabet", "'four', which task.alphabet lacks"),
        ("too_short", "frames cannot align the"),
        ("shifting_augmentation", "data.augment"),
        ("pooled_encoder", "reads an encoder's features at every token, and model 'cnn' has none"),
    ],
)
def test_bad_transcribed_folders_are_one_line_errors_and_no_run(cli, tmp_path, case, message):
    root = tmp_path / "speech"
    rows = {"train": [("a.wav", "one two"), ("b.wav", "two")], "test": [("c.wav", "one")]}
    header = "file_name,text"
    options = ["task.vocabulary=words"]
    if case == "no_text_column":
        header = "file_name,sentence"
    elif case == "missing_file":
        speech_folder(root, rows)
        (root / "train" / "metadata.csv").write_text("file_name,text\na.wav,one two\ngone.wav,two\n")
    elif case == "empty_transcript":
        rows["train"].append(("c.wav", " "))
    elif case == "outside_alphabet":
        rows["train"].append(("c.wav", "four one"))
        options = ["task.vocabulary=words", "task.alphabet=[one,two,three]"]
    elif case == "too_short":
        options = ["task.vocabulary=characters"]  # 60 characters said in one take of a quarter second: 25 frames
        rows["train"].append(("c.wav", "a sentence far too long for the short recording it is given"))
    elif case == "shifting_augmentation":
        options = ["task.vocabulary=words", "data.augment.name=audio_light"]  # its time_shift and speed are on
    elif case == "pooled_encoder":
        options = ["task.vocabulary=words", "model.name=cnn"]
    if case != "pooled_encoder":
        options.append("model.name=conv1d")
    if case != "missing_file":
        speech_folder(root, rows, header)
    overrides = ["task=speech_recognition", "data.name=speech_folder", f"data.root={root}", "data.sample_rate=8000"]
    config = write_config(tmp_path / "c.yaml", "method: finetune\n")
    result = cli("finetune", "-c", config, *overrides, *options, "--runs-dir", tmp_path / "runs")
    assert result.code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_batches_of_recordings_are_bucketed_by_length_and_the_order_is_seeded():
    from transferctl.data.pipeline import epoch_order, training_order
    from transferctl.modalities.image import ImageData

    lengths = torch.randint(10, 1000, (203,), generator=torch.Generator().manual_seed(0))
    data = ImageData(torch.zeros(203, 1, 1, 1), torch.zeros(203, dtype=torch.long), ("a",), mean=(0.0,), std=(1.0,), hflip=False)
    assert torch.equal(training_order(data, 3, 1, 10), epoch_order(203, 3, 1))  # no lengths: shuffled as ever
    measured = ImageData(data.inputs, data.targets, ("a",), mean=(0.0,), std=(1.0,), hflip=False, side={"lengths": lengths})
    order = training_order(measured, 3, 1, 10)
    assert sorted(order.tolist()) == list(range(203)) and torch.equal(order, training_order(measured, 3, 1, 10))
    assert not torch.equal(order, training_order(measured, 3, 2, 10))
    batches = order.split(10)
    spread = sum(int(lengths[b].max() - lengths[b].min()) for b in batches[:-1]) / (len(batches) - 1)
    assert spread < 0.2 * float(lengths.max() - lengths.min()) and len(batches[-1]) == 3  # like lengths; the partial batch last


def test_log_mel_statistics_count_the_real_frames_of_recordings_read_whole():
    from transferctl.data.audio import audio_split

    front_end = FrontEnd.of(RATE, 40, 32.0, 10.0)
    loud = torch.from_numpy(np.concatenate([digit_take(1, 0, 0), np.zeros(4000)]) * 32767).to(torch.int16)
    alone = torch.from_numpy(digit_take(1, 0, 0) * 32767).to(torch.int16)
    lengths = torch.tensor([len(alone)])
    padded = audio_split(loud[None], lengths, torch.zeros(1, dtype=torch.long), ("a",), front_end, None)
    own = audio_split(alone[None], lengths, torch.zeros(1, dtype=torch.long), ("a",), front_end, None)
    assert padded.mean == pytest.approx(own.mean, abs=1e-4) and padded.std == pytest.approx(own.std, abs=1e-4)
    assert padded.side["lengths"].tolist() == [int(front_end.steps(lengths))]


def test_gradients_are_clipped_to_train_grad_clip_norm(tmp_path, fsdd_root):
    from transferctl.recipes import finetune

    config = write_config(tmp_path / "asr.yaml", ASR.format(root=fsdd_root))
    sgd = "optimizer={name: sgd, lr: 1.0, weight_decay: 0.0}"
    steps = ["train.max_steps=2", "train.epochs=1", sgd, "data.train_utterances=40", "train.val_every=1000"]

    def weights(*overrides: str) -> dict[str, torch.Tensor]:
        run = finetune(None, config, [*steps, *overrides], runs_dir=tmp_path / "runs").run_dir
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
        return {k: v for k, v in state.items() if "running" not in k and "batches" not in k}  # the parameters

    held, once, free = weights("train.grad_clip_norm=1e-6"), weights("train.grad_clip_norm=1e-6", "train.max_steps=1"), weights()

    def moved(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    assert moved(held, once) <= 2e-6 < 1e-2 < moved(held, free)  # each step moves a weight by lr x 1e-6 at most
