"""Audio: the log-mel front end against a reference computation, reading and resampling real .wav files, the fsdd
splits, the augmentations, the encoders over frames, the pretrain -> finetune -> evaluate -> export chain on
waveforms (with onnxruntime on a .wav file, as a caller without transferctl does: docs/export.md), an exact resume, and the bad inputs."""

from __future__ import annotations

import json
import math
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_config
from tests.test_resume import killed_and_resumed
from transferctl.components import load_components
from transferctl.data.audio import decode_audio_files, read_audio
from transferctl.data.audio_augment import AudioAugment, audio_simclr, content_length
from transferctl.modalities.audio import AudioData, AudioModality, FrontEnd, LogMel, to_clip
from transferctl.registry import DATASETS, MODELS

RATE = 8000
TONES = {"low": 440.0, "mid": 1200.0, "high": 2500.0}  # each class a tone: a task a small net learns in a few steps


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE, channels: int = 1) -> Path:
    """16-bit PCM, as FSDD ships it; `samples` (frames,) or (frames, channels) floats in [-1, 1]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return path


def tone(frequency: float, seconds: float, rate: int = RATE, phase: float = 0.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return 0.5 * np.sin(2 * np.pi * frequency * t + phase)


def make_audio_folder(root: Path, per_class: tuple[int, int] = (12, 4), rate: int = RATE) -> Path:
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for name, frequency in TONES.items():
            for i in range(count):
                clip = tone(frequency * rng.uniform(0.95, 1.05), rng.uniform(0.3, 0.9), rate, rng.uniform(0, 6))
                write_wav(root / split / name / f"{i}.wav", clip + 0.01 * rng.standard_normal(len(clip)), rate)
    return root


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory) -> Path:
    return make_audio_folder(tmp_path_factory.mktemp("audio"))


SUPERVISED = """\
method: supervised
model: {{name: conv1d, widths: [16, 32]}}
optimizer: {{name: adamw, lr: 0.01}}
data: {{name: audio_folder, root: {root}, sample_rate: 8000, n_mels: 32, batch_size: 12, eval_batch_size: 64, val_fraction: 0.2}}
train: {{epochs: 15, log_every: 5, device: cpu}}
"""


def _ok(result):
    assert result.code == 0, result.stderr
    return result.json


# --------------------------------------------------------------------------- the front end


def _reference_log_mel(x: np.ndarray, f: FrontEnd) -> np.ndarray:
    """numpy: centred STFT (reflect padding, periodic Hann), power, HTK mel triangles, log."""
    pad = f.n_fft // 2
    padded = np.pad(x, pad, mode="reflect")
    window = np.zeros(f.n_fft)
    offset = (f.n_fft - f.win_length) // 2
    window[offset : offset + f.win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(f.win_length) / f.win_length)
    frames = np.stack([padded[i * f.hop_length : i * f.hop_length + f.n_fft] * window for i in range(f.frames(len(x)))])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, n_fft // 2 + 1)
    mel = lambda hz: 2595 * np.log10(1 + hz / 700)
    edges = 700 * (10 ** (np.linspace(mel(0), mel(f.sample_rate / 2), f.n_mels + 2) / 2595) - 1)
    bins = np.linspace(0, f.sample_rate / 2, f.n_fft // 2 + 1)
    rising = (bins[None, :] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - bins[None, :]) / (edges[2:, None] - edges[1:-1, None])
    triangles = np.maximum(0, np.minimum(rising, falling))  # (n_mels, bins)
    return np.log(triangles @ power.T + 1e-6)


def test_the_front_end_matches_a_reference_computation_on_a_tone():
    front_end = FrontEnd.of(RATE, n_mels=40, window_ms=25, hop_ms=10)
    assert (front_end.win_length, front_end.n_fft, front_end.hop_length, front_end.frames(RATE)) == (200, 256, 80, 100)
    signal = tone(1000.0, 1.0)
    ours = LogMel(front_end).log_mel(torch.tensor(signal, dtype=torch.float32).unsqueeze(0))[0].double().numpy()
    reference = _reference_log_mel(signal, front_end)
    assert ours.shape == reference.shape == (40, 100)
    loud = reference > reference.max() - 20  # where the tone's energy is: compare there to float32 precision
    assert np.abs(ours - reference)[loud].max() < 1e-3
    assert np.argmax(reference.mean(axis=1)) == np.argmax(ours.mean(axis=1))  # the same, tone's, mel bin peaks


def test_the_front_end_standardizes_waveforms_of_any_length_and_the_data_path_cuts_or_pads_to_the_clip():
    front_end = FrontEnd.of(RATE, n_mels=16, window_ms=32, hop_ms=16)
    module = LogMel(front_end, mean=tuple(range(16)), std=(2.0,) * 16)
    long, short = torch.randn(2, 6000), torch.randn(2, 1000)
    energies = module.log_mel(long)
    assert torch.allclose(module(long)[:, 0], (energies - torch.arange(16.0).view(-1, 1)) / 2, atol=1e-5)
    assert module(long).shape == (2, 1, 16, 6000 // 128) and module(short).shape == (2, 1, 16, 1000 // 128)
    clip = 4000  # 0.5 s: the data path's clip window, not the front end's
    assert torch.equal(to_clip(long, clip), long[:, :clip])  # past the clip: not read
    assert torch.equal(to_clip(short, clip), torch.nn.functional.pad(short, (0, clip - 1000)))
    assert module(to_clip(short, clip)).shape == (2, 1, 16, front_end.frames(clip)) and to_clip(short, None) is short


# --------------------------------------------------------------------------- reading, resampling and splits


def test_reading_downmixes_stereo_and_resampling_keeps_a_tones_frequency(tmp_path):
    left = tone(1000.0, 1.0, rate=16000)
    stereo = write_wav(tmp_path / "stereo.wav", np.stack([left, left], axis=1), rate=16000, channels=2)
    samples, rate = read_audio("test", stereo)
    assert rate == 16000 and samples.shape == (16000,) and abs(samples.abs().max().item() - 0.5) < 1e-3
    (resampled,), lengths = decode_audio_files("test", [stereo], sample_rate=RATE, max_samples=10 * RATE)
    assert lengths.tolist() == [RATE] and resampled.dtype == torch.int16 and len(resampled) == RATE
    spectrum = torch.fft.rfft(resampled.float()).abs()
    assert abs(spectrum.argmax().item() * RATE / len(resampled) - 1000.0) <= 1.0  # 1 Hz bins: the tone stays at 1 kHz


def test_decoded_folders_are_cached_and_long_clips_kept_up_to_max_seconds(tmp_path):
    paths = [write_wav(tmp_path / "a.wav", tone(440, 3.0)), write_wav(tmp_path / "b.wav", tone(440, 0.5))]
    first, lengths = decode_audio_files("test", paths, RATE, max_samples=2 * RATE)
    assert first.shape == (2, 2 * RATE) and (first[1, RATE // 2 :] == 0).all()  # padded at the end
    assert lengths.tolist() == [2 * RATE, RATE // 2]
    assert len(list((tmp_path / "cache" / "transferctl" / "decoded").glob("*.pt"))) == 1
    assert torch.equal(decode_audio_files("test", paths, RATE, max_samples=2 * RATE)[0], first)


def make_fsdd(root: Path, speakers=("george", "lucas", "jackson"), digits=(0, 1, 2), takes=8) -> Path:
    for d in digits:
        for s, speaker in enumerate(speakers):
            for take in range(takes):
                write_wav(root / "FSDD" / "recordings" / f"{d}_{speaker}_{take}.wav", tone(300 + 200 * d + 20 * s, 0.2 + 0.01 * take))
    return root


def test_fsdd_splits_put_every_take_and_speaker_where_the_split_says(tmp_path):
    load_components()
    root = make_fsdd(tmp_path / "data")

    def split(train: bool, **options):
        return DATASETS.build("fsdd", options, root=root, download=False, train=train)

    official_train, official_test = split(True), split(False)
    assert (len(official_train), len(official_test)) == (3 * 3 * 3, 3 * 3 * 5)  # takes 5-7 train, 0-4 test
    assert official_train.classes == tuple("0123456789") and set(official_test.targets.tolist()) == {0, 1, 2}
    held_out_train = split(True, split="speakers", test_speakers=["lucas"])
    held_out_test = split(False, split="speakers", test_speakers=["lucas"])
    assert (len(held_out_train), len(held_out_test)) == (2 * 3 * 8, 3 * 8)
    # the clips' lengths name their take (0.2 s + 10 ms a take): every test clip is lucas's, of every take
    takes = sorted(round((n / RATE - 0.2) / 0.01) for n in content_length(held_out_test.inputs.float()).tolist())
    assert takes == sorted(list(range(8)) * 3)
    official_takes = {round((n / RATE - 0.2) / 0.01) for n in content_length(official_test.inputs.float()).tolist()}
    assert official_takes == set(range(5))


# --------------------------------------------------------------------------- augmentations and encoders


def test_augmentations_keep_shapes_are_seeded_and_shift_within_the_clip():
    augment = audio_simclr(clip_samples=4000)
    x = torch.zeros(6, 9000)
    x[:, :2000] = torch.randn(6, 2000) * 0.1
    x[0] = torch.randn(9000) * 0.1  # a long recording: cropped
    out = augment(x, torch.Generator().manual_seed(3))
    assert out.shape == (6, 4000) and torch.equal(out, augment(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(4)))
    plain = AudioAugment(clip_samples=4000, time_shift=True)
    crops = plain(x[:1].expand(20, -1).contiguous(), torch.Generator().manual_seed(0))
    windows = x[0].unfold(0, 4000, 1)  # every contiguous 4000-sample window of the long recording
    starts = [int((windows == crop).all(dim=1).nonzero()[0]) for crop in crops]  # each crop is one of them
    assert len(set(starts)) > 10 and max(starts) <= 5000
    shifted = plain(x[1:2].expand(50, -1).contiguous(), torch.Generator().manual_seed(0))
    kept = (shifted != 0).sum(dim=1)
    assert (kept == 2000).all() and len({int(row.nonzero()[0]) for row in shifted}) > 5  # the whole clip, at many places


def test_spec_augment_hides_whole_frames_and_whole_bins():
    spectrograms = torch.randn(8, 1, 40, 100) + 5  # nothing is 0 before masking
    for options, along in (({"time_masks": 2, "time_mask_frames": 10}, 3), ({"freq_masks": 2, "freq_mask_bins": 6}, 2)):
        masked = AudioAugment(clip_samples=8000, **options).on_model_inputs(spectrograms, torch.Generator().manual_seed(0))
        hidden = masked == 0
        assert hidden.any() and torch.equal(masked[~hidden], spectrograms[~hidden])
        across = 2 if along == 3 else 3  # a hidden frame is hidden in every bin, and a hidden bin in every frame
        assert torch.equal(hidden.all(dim=across), hidden.any(dim=across))
        assert (hidden.any(dim=across).sum(dim=-1) <= 2 * max(options.values())).all()


def test_the_front_end_runs_in_float32_inside_a_bf16_step():
    front_end = FrontEnd.of(RATE, n_mels=40, window_ms=32, hop_ms=10)
    waveforms, targets = torch.zeros(2, RATE, dtype=torch.int16), torch.zeros(2, dtype=torch.long)
    data = AudioData(waveforms, targets, ("a",), front_end, (0.0,) * 40, (1.0,) * 40, clip_samples=RATE)
    x = torch.randn(2, RATE) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = AudioModality().normalize(x, data)
    assert inside.dtype == torch.float32 and torch.equal(inside, AudioModality().normalize(x, data))


def test_speed_perturbation_changes_pitch_and_length():
    x = torch.tensor(tone(1000.0, 0.5), dtype=torch.float32).view(1, -1)
    x = torch.nn.functional.pad(x, (0, 4000))
    faster = AudioAugment(clip_samples=8000, speed=(1.25, 1.25))(x, torch.Generator())
    assert abs(content_length(faster).item() - 4000 / 1.25) <= 2
    spectrum = torch.fft.rfft(faster[0]).abs()
    assert abs(spectrum.argmax().item() * RATE / 8000 - 1250.0) <= 2.0


def test_speed_and_window_interpolate_linearly_inside_the_played_recording():
    ramp = torch.zeros(3, 6000)
    ramp[:, :5000] = torch.arange(5000.0) / 5000  # linear interpolation of a ramp is exact: out[j] = (start + j) * rate
    for rate in (0.8, 1.25):
        from_start = AudioAugment(clip_samples=2000, speed=(rate, rate))(ramp, torch.Generator())
        assert torch.allclose(from_start * 5000, torch.arange(2000.0) * rate, atol=1e-2)
        shift = AudioAugment(clip_samples=2000, time_shift=True, speed=(rate, rate))
        shifted = shift(ramp[:1].expand(40, -1).contiguous(), torch.Generator())
        starts = (shifted[:, 1] * 5000 / rate).round() - 1
        assert len(set(starts.tolist())) > 10 and starts.min() >= 0  # many windows, all inside the recording played:
        assert ((starts + 1999) * rate <= 5000).all() and (shifted[:, -1] > 0).all()
        assert torch.allclose(shifted * 5000, (starts.view(-1, 1) + torch.arange(2000.0)) * rate, atol=1e-2)
    slow = AudioAugment(clip_samples=8000, speed=(0.5, 0.5))(ramp, torch.Generator())
    assert torch.allclose(slow[0, :6000] * 5000, torch.arange(6000.0) * 0.5, atol=1e-2) and slow[0, 6000:].max() < 1
    assert torch.equal(AudioAugment(clip_samples=8000, speed=(2.0, 2.0))(ramp, torch.Generator())[:, 3000:], torch.zeros(3, 5000))


def test_noise_reaches_about_noise_p_of_the_clips_at_an_snr_in_range():
    amplitude = torch.logspace(-2, -0.5, 300).view(-1, 1)  # clips of every loudness: each gets noise for its own power
    clean = torch.sin(torch.arange(4000.0) * 0.3).view(1, -1) * amplitude
    noisy = AudioAugment(clip_samples=4000, noise_p=0.5, snr_db=(10.0, 20.0))(clean, torch.Generator().manual_seed(0))
    touched = (noisy != clean).any(dim=1)
    assert 100 < touched.sum() < 200 and torch.equal(noisy[~touched], clean[~touched])
    noise = noisy[touched] - clean[touched]
    snr = 10 * torch.log10(clean[touched].square().mean(dim=1) / noise.square().mean(dim=1))
    assert snr.min() > 9.5 and snr.max() < 20.5 and snr.max() - snr.min() > 5


def test_every_audio_encoder_reads_log_mel_inputs():
    load_components()
    x = torch.randn(3, 1, 40, 100)
    encoders = (("gru", {"pooling": "attention", "hidden_dim": 16}), ("conv1d", {"widths": [16, 32]}), ("resnet18", {}), ("cnn", {}))
    for name, options in encoders:  # the last two on the log-mel as a one-channel image
        encoder = MODELS.build(name, options, in_channels=1, sequence_features=40)
        assert encoder(x).shape == (3, encoder.feature_dim)
    gru = MODELS.build("gru", {"hidden_dim": 16}, sequence_features=40).eval()
    later_frames_changed = x.clone()
    later_frames_changed[..., 50:] = 0
    assert not torch.allclose(gru(x), gru(later_frames_changed))  # it reads the whole sequence


# --------------------------------------------------------------------------- the chain on waveforms


def test_pretrain_finetune_evaluate_export_on_waveforms(cli, tmp_path, audio_root):
    config = write_config(tmp_path / "supervised.yaml", SUPERVISED.format(root=audio_root))
    pretrained = _ok(cli("pretrain", "-c", config, "--json"))
    run = Path(pretrained["run_dir"])
    assert _ok(cli("evaluate", "--from", run, "--json"))["metrics"]["accuracy"] > 0.9  # three tones: an easy task, learnt
    result = cli("finetune", "--from", run, "data.labels_per_class=3", "data.n_mels=64", "train.max_steps=30", "train.device=cpu", "--json")
    tuned = _ok(result)
    assert "source run's front end (n_mels=32)" in result.stderr  # says which of its own settings has no effect
    fitted = torch.load(Path(tuned["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["data"]
    assert fitted["front_end"]["n_mels"] == 32  # the source's front end, not data.n_mels=64: its encoder reads 32 bins
    assert fitted["mean"] == torch.load(run / "checkpoints" / "last.pt", weights_only=True)["data"]["mean"]
    assert _ok(cli("evaluate", "--from", tuned["run_dir"], "--json"))["metrics"]["test_images"] == 12
    exported = _ok(
        cli("export", "--from", tuned["run_dir"], "--format", "onnx", "--format", "torchscript", "--format", "safetensors", "--json")
    )
    assert exported["verified"] and all(p["passed"] and p["top1_agreement"] == 1.0 for p in exported["parity"].values())
    card = json.loads((Path(exported["export_dir"]) / "model_card.json").read_text())
    assert card["input"]["name"] == "waveforms" and card["input"]["shape"] == ["batch", RATE]
    assert card["input"]["sample_rate"] == RATE and card["classes"] == ["high", "low", "mid"]
    # serving without transferctl (docs/export.md): a .wav file, the card, onnxruntime
    import onnxruntime

    with wave.open(str(audio_root / "test" / "low" / "0.wav")) as f:  # 16-bit mono PCM at the card's sample rate
        x = np.frombuffer(f.readframes(f.getnframes()), "<i2") / 32768
    clip = np.zeros(card["input"]["shape"][1], np.float32)  # the clip's start, zero-padded
    clip[: min(len(x), len(clip))] = x[: len(clip)]
    session = onnxruntime.InferenceSession(exported["files"]["onnx"], providers=["CPUExecutionProvider"])
    logits = session.run(None, {card["input"]["name"]: clip[None]})[0]
    assert card["classes"][int(logits.argmax())] == "low"


def test_simclr_on_audio_draws_spectrogram_views_and_resumes_exactly(tmp_path, audio_root):
    config = write_config(
        tmp_path / "simclr.yaml",
        SUPERVISED.format(root=audio_root)
        .replace("method: supervised", "method: simclr\nhead: {name: projection, hidden_dim: 32, out_dim: 16}")
        .replace("epochs: 15, log_every: 5", "epochs: 2, log_every: 1, checkpoint_every: 2"),
    )
    whole, resumed = killed_and_resumed("pretrain", config, ["data.batch_size=8"], tmp_path)
    assert whole["step"] == resumed["step"] > 2
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert next((tmp_path / "whole").iterdir()).joinpath("views.png").stat().st_size > 0


class ZeroDecoder(torch.nn.Module):
    """A reconstruction of zeros: every hidden patch left at the per-mel-bin mean (0 in the standardized inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_autoencoding_a_spectrogram_and_bce_refused(cli, tmp_path, audio_root):
    config = write_config(
        tmp_path / "mae.yaml",
        SUPERVISED.format(root=audio_root)
        .replace("method: supervised", "method: {name: mae, patch_size: 4}")
        .replace("name: conv1d, widths: [16, 32]", "name: cnn, widths: [8, 16]")
        .replace("epochs: 15", "epochs: 1"),
    )
    result = _ok(cli("pretrain", "-c", config, "data.batch_size=4", "--json"))  # 7 steps
    # it learns to fill the hidden patches from the rest of the spectrogram: well below the loss of leaving them at
    # the mean that the corrupted input shows there (1.06 on these clips; the decoder outputting zeros)
    from transferctl.build import build_training
    from transferctl.config import load_config

    training = build_training(load_config(config, ["data.batch_size=4"]))
    mean_fill = training.objective.measure(ZeroDecoder(), training.val, 64)["loss"]
    assert 0.9 < mean_fill < 1.2 and result["metrics"]["val_loss"] < 0.9 * mean_fill  # this run: 0.82
    assert (Path(result["run_dir"]) / "reconstructions.png").stat().st_size > 0
    refused = cli("pretrain", "-c", config, "loss.name=bce")
    assert refused.code == 2 and "bce" in refused.stderr and "loss.name=mse" in refused.stderr


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("not_audio", "cannot read"),
        ("truncated", "truncated"),
        ("empty", "holds no samples"),
        ("no_classes", "no class folders"),
        ("fsdd_without_recordings", "FSDD/recordings/*.wav; point data.root"),
    ],
)
def test_bad_audio_is_one_line_exit_2_and_no_run(cli, tmp_path, fault, message):
    root = make_audio_folder(tmp_path / "data", per_class=(2, 1))
    bad = root / "train" / "low" / "0.wav"
    config_text = SUPERVISED.format(root=root)
    if fault == "not_audio":
        bad.write_text("this is a text file\n")
    elif fault == "truncated":
        bad.write_bytes(bad.read_bytes()[:-1000])
    elif fault == "empty":
        write_wav(bad, np.zeros(0))
    elif fault == "no_classes":
        config_text = config_text.replace("name: audio_folder", "name: audio_folder, train_dir: flat")
        (root / "flat").mkdir()
        (root / "flat" / "notes.txt").write_text("no recordings here")
    else:
        (root / "FSDD").mkdir()
        config_text = config_text.replace("name: audio_folder", "name: fsdd").replace(", sample_rate: 8000, n_mels: 32", "")
    result = cli("pretrain", "-c", write_config(tmp_path / "bad.yaml", config_text))
    assert result.code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    if fault in ("not_audio", "truncated", "empty"):
        assert str(bad) in result.stderr  # names the file
    assert "download" not in result.stderr  # no data set here can download itself
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_audio_without_the_audio_extra_is_one_line(cli, tmp_path, audio_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchaudio", None)  # as if torchaudio were not installed
    result = cli("pretrain", "-c", write_config(tmp_path / "c.yaml", SUPERVISED.format(root=audio_root)))
    assert result.code == 2 and 'pip install "transferctl[audio]"' in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_an_audio_encoder_on_images_is_refused(cli, tmp_path, digits_root):
    config = write_config(
        tmp_path / "gru.yaml",
        "method: supervised\nmodel: {name: gru}\ndata: {name: mnist, root: " + str(digits_root) + "}\ntrain: {device: cpu}\n",
    )
    result = cli("config", "check", "-c", config)
    assert result.code == 2 and "gru" in result.stderr and "image" in result.stderr


def test_more_mel_bins_than_frequencies_is_refused(cli, tmp_path, audio_root):
    config = write_config(tmp_path / "c.yaml", SUPERVISED.format(root=audio_root))
    result = cli("config", "check", "-c", config, "data.n_mels=200")
    assert result.code == 2 and "data.n_mels: 200 mel bins" in result.stderr and "window_ms" in result.stderr


def test_frames_and_seconds_are_consistent():
    front_end = FrontEnd.of(16000, n_mels=64, window_ms=25, hop_ms=10)
    assert front_end.frames(16000) == 100 and front_end.input_shape(16000) == (1, 64, 100) and front_end.n_fft == 512
    assert math.isclose(front_end.win_length / 16000, 0.025)
