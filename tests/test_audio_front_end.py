"""Audio's second seam: the clip window apart from the front end (a fine-tune's own clip through its source's front
end; whole recordings for a task of inputs of any length) and a front end chosen by the model (a model that takes
standardized waveforms, through finetune -> evaluate -> export)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import write_config
from tests.test_audio import make_audio_folder
from transferctl import checkpoints
from transferctl.build import rebuild
from transferctl.config import load_config
from transferctl.data.audio_augment import audio_light
from transferctl.errors import ConfigError
from transferctl.modalities.audio import AudioModality, FrontEnd, StandardWaveform, Waveforms
from transferctl.registry import MODELS, TASKS
from transferctl.tasks.classification import Classification

RATE = 8000
CHAIN = """\
method: finetune
model: {{name: {model}}}
optimizer: {{name: adamw, lr: 0.01}}
data: {{name: audio_folder, root: {root}, sample_rate: 8000, n_mels: 16, labels_per_class: 3, batch_size: 6, eval_batch_size: 64,
        val_fraction: 0.2}}
train: {{max_steps: 3, epochs: 100, log_every: 1, device: cpu}}
"""


class WaveConv(nn.Module):
    """A test-only encoder over raw samples: strided 1-D convolutions, then the mean over time."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv1d(1, width, 64, stride=32), nn.ReLU(), nn.Conv1d(width, width, 8, stride=4), nn.ReLU())
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2, "waveforms (N, samples)"
        return self.layers(x.unsqueeze(1)).mean(dim=2)


class AnyLength(Classification):
    """Classification of recordings of any length: its exports keep the length axis dynamic."""

    variable_length = True
    recipe = None


@pytest.fixture
def registered(registries_restored):
    """`wave_conv`, a model that takes waveforms, and `any_length`, a task of inputs of any length."""

    @MODELS.register(modality="audio", front_end="waveform", channels_last=False)
    def wave_conv(width: int = 8) -> WaveConv:
        """A test-only Conv1d over the raw samples."""
        return WaveConv(width)

    TASKS.register("any_length")(AnyLength)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: models this small run fastest on one thread


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory) -> Path:
    return make_audio_folder(tmp_path_factory.mktemp("audio"), per_class=(5, 2))


def _ok(result) -> dict:
    assert result.code == 0, result.stderr
    return result.json


def _checkpoint(run_dir: str | Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)


def _resolved(root: Path, model: str, *overrides: str) -> dict:
    base = {"method": "finetune", "model": {"name": model}, "data": {"name": "audio_folder", "root": str(root)}}
    return load_config(None, list(overrides), base=base).data.options


# --------------------------------------------------------------------------- units


def test_waveforms_are_standardized_per_clip_over_their_content_whatever_the_padding():
    torch.manual_seed(0)
    speech = torch.randn(1, 3000) * 0.2 + 0.05
    shorter, longer = (nn.functional.pad(speech, (0, pad)) for pad in (1000, 9000))
    a, b = StandardWaveform()(shorter), StandardWaveform()(longer)
    assert torch.equal(a[:, :3000], b[:, :3000]) and not a[:, 3000:].any() and not b[:, 3000:].any()
    content = a[0, :3000].double()
    assert abs(content.mean()) < 1e-6 and abs(content.std(unbiased=False) - 1) < 1e-5
    louder = StandardWaveform()(shorter * 4)
    assert torch.allclose(louder, a, atol=1e-5)  # no statistics of a split: a clip's own loudness is standardized away
    assert torch.equal(StandardWaveform()(torch.zeros(2, 100)), torch.zeros(2, 100))  # silence stays silence
    picture = AudioModality().displayable(b, None)  # views.png of a model that takes waveforms: their envelopes
    lit = picture[0, ..., 0].sum(dim=0)  # rows lit in each column: the content's span, the padding's line at 0
    assert picture.shape == (1, 48, 192, 1) and lit[:10].min() > 10 and lit[-10:].max() <= 2


def test_spec_augment_leaves_waveforms_as_they_are_and_draws_nothing():
    augment, waveforms = audio_light(clip_samples=RATE), torch.randn(4, RATE)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert augment.on_model_inputs(waveforms, generator) is waveforms and torch.equal(generator.get_state(), state)
    assert augment(torch.randn(4, 3000), generator).shape == (4, RATE)  # the clip window is the augmentation's
    assert audio_light(clip_samples=None)(torch.randn(4, 3000), generator).shape == (4, 3000)  # none: the recording


def test_a_recorded_front_end_reads_both_ways():
    front_end = FrontEnd.of(RATE, n_mels=16, window_ms=32, hop_ms=10)
    old = {"front_end": {"sample_rate": RATE, "clip_samples": 8000, "n_fft": 256, "win_length": 256, "hop_length": 80, "n_mels": 16}}
    assert FrontEnd.recorded(old) == (front_end, 8000)  # 0.8: the clip inside the front end, which took log-mel
    assert FrontEnd.recorded({"front_end": {**old["front_end"], "kind": "waveform"}, "clip_samples": None})[1] is None
    assert FrontEnd.recorded({"front_end": front_end.__dict__, "clip_samples": 16000}) == (front_end, 16000)


def test_the_front_end_follows_the_model_and_whole_recordings_follow_a_task_of_any_length(registered, audio_root):
    assert _resolved(audio_root, "conv1d")["front_end"] == "log_mel"
    assert _resolved(audio_root, "wave_conv")["front_end"] == "waveform"
    with pytest.raises(ConfigError, match=r"data\.front_end: model 'wave_conv' takes waveform inputs, not log_mel"):
        _resolved(audio_root, "wave_conv", "data.front_end=log_mel")
    with pytest.raises(ConfigError, match=r"data\.front_end: model 'conv1d' takes log_mel inputs"):
        _resolved(audio_root, "conv1d", "data.front_end=waveform")
    assert _resolved(audio_root, "conv1d")["clip_seconds"] == 1.0
    assert _resolved(audio_root, "conv1d", "task.name=any_length")["clip_seconds"] is None
    with pytest.raises(ConfigError, match=r"data\.clip_seconds: the task reads recordings of any length"):
        _resolved(audio_root, "conv1d", "task.name=any_length", "data.clip_seconds=1.0")


# --------------------------------------------------------------------------- chains


def test_a_model_that_takes_waveforms_trains_evaluates_and_exports(cli, registered, tmp_path, audio_root):
    config = write_config(tmp_path / "wave.yaml", CHAIN.format(model="wave_conv", root=audio_root))
    tuned = _ok(cli("finetune", "-c", config, "--runs-dir", tmp_path / "runs", "--json"))
    saved = _checkpoint(tuned["run_dir"])
    assert saved["config"]["data"]["front_end"] == "waveform" and saved["data"]["front_end"]["kind"] == "waveform"
    assert saved["network"]["sample_shape"] == [RATE] and saved["data"]["clip_samples"] == RATE  # (N, samples) inputs
    assert saved["data"]["mean"] == saved["data"]["std"] == []  # each clip standardized alone: no split statistics
    evaluated = _ok(cli("evaluate", "--from", tuned["run_dir"], "--runs-dir", tmp_path / "runs", "--json"))
    assert evaluated["metrics"]["test_images"] == 6
    exported = _ok(cli("export", "--from", tuned["run_dir"], "--format", "torchscript", "--runs-dir", tmp_path / "runs", "--json"))
    assert exported["parity"]["torchscript"]["passed"] and exported["parity"]["torchscript"]["top1_agreement"] == 1.0
    card = json.loads((Path(exported["export_dir"]) / "model_card.json").read_text())
    assert card["input"]["shape"] == ["batch", RATE] and card["input"]["front_end"]["kind"] == "waveform"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(exported["files"]["torchscript"])
    served = AudioModality().served(rebuild(checkpoints.read(Path(tuned["run_dir"]) / "checkpoints" / "last.pt")), saved["data"])
    waveform = torch.randn(1, 3000) * 0.1
    with torch.no_grad():  # a fixed clip: the export takes exactly its samples, which served cuts or zero-pads a recording to
        assert torch.allclose(served(waveform), scripted(nn.functional.pad(waveform, (0, RATE - 3000))), atol=1e-5)


def test_a_fine_tune_reads_its_own_clip_through_its_source_front_end(cli, tmp_path, audio_root):
    config = write_config(tmp_path / "source.yaml", CHAIN.format(model="conv1d", root=audio_root).replace("finetune", "supervised"))
    runs = tmp_path / "runs"
    source = _ok(cli("pretrain", "-c", config, "--runs-dir", runs, "--json"))
    overrides = ["data.clip_seconds=2", "data.n_mels=32", "data.labels_per_class=3", "train.max_steps=2"]
    result = cli("finetune", "--from", source["run_dir"], *overrides, "--runs-dir", runs, "--json")
    tuned = _ok(result)
    assert "this run reads 2 s clips, its source run read 1 s clips" in result.stderr
    assert "source run's front end (n_mels=16)" in result.stderr
    before, after = _checkpoint(source["run_dir"]), _checkpoint(tuned["run_dir"])
    assert before["network"]["sample_shape"] == [1, 16, 100] and after["network"]["sample_shape"] == [1, 16, 200]  # frames doubled
    assert after["data"]["front_end"] == before["data"]["front_end"] and after["data"]["mean"] == before["data"]["mean"]
    assert (before["data"]["clip_samples"], after["data"]["clip_samples"]) == (RATE, 2 * RATE)
    exported = _ok(cli("export", "--from", tuned["run_dir"], "--format", "torchscript", "--runs-dir", runs, "--json"))
    card = json.loads((Path(exported["export_dir"]) / "model_card.json").read_text())
    assert card["input"]["shape"] == ["batch", 2 * RATE] and card["input"]["front_end"]["frames"] == 200


def test_a_task_of_inputs_of_any_length_reads_whole_recordings_and_exports_without_a_clip(cli, registered, tmp_path, audio_root):
    config = write_config(tmp_path / "any.yaml", CHAIN.format(model="conv1d", root=audio_root) + "task: {name: any_length}\n")
    runs = tmp_path / "runs"
    tuned = _ok(cli("finetune", "-c", config, "--runs-dir", runs, "--json"))
    saved = _checkpoint(tuned["run_dir"])
    assert saved["data"]["clip_samples"] is None and saved["config"]["data"]["clip_seconds"] is None
    exported = _ok(cli("export", "--from", tuned["run_dir"], "--format", "torchscript", "--runs-dir", runs, "--json"))
    card = json.loads((Path(exported["export_dir"]) / "model_card.json").read_text())
    assert card["input"]["shape"] == ["batch", "samples"] and exported["parity"]["torchscript"]["passed"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(exported["files"]["torchscript"])
    served = AudioModality().served(rebuild(checkpoints.read(Path(tuned["run_dir"]) / "checkpoints" / "last.pt")), saved["data"])
    assert isinstance(served, Waveforms) and served.clip_samples is None
    with torch.no_grad():
        for samples in (3000, 20000):  # no clip: every length is read whole, with each waveform's length beside it
            waveform = torch.randn(2, samples) * 0.1
            lengths = torch.tensor([samples, samples - 1000])
            assert torch.allclose(scripted(waveform, lengths), served(waveform, lengths), atol=1e-5)
        short, padded, lengths = waveform[:, :3000], nn.functional.pad(waveform[:, :3000], (0, 5000)), torch.tensor([3000, 3000])
        assert not torch.allclose(served(short), served(padded))  # without lengths, a waveform is all recording
        assert torch.allclose(served(short, lengths), served(padded, lengths), atol=1e-5)  # with them, padding is not read
