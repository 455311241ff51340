"""Shared fixtures: small idx-encoded digit data in a temporary folder, and an in-process CLI runner."""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from transferctl.cli import main

SAMPLE_RAW = Path(__file__).parent.parent / "transferctl" / "data" / "sample" / "MNIST" / "raw"


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format that torchvision's MNIST reader expects."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = ((0x08 << 8) | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def read_sample(stem: str) -> tuple[np.ndarray, np.ndarray]:
    def read(name: str) -> np.ndarray:
        raw = gzip.decompress((SAMPLE_RAW / name).read_bytes())
        ndim = raw[3]
        shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(shape)

    return read(f"{stem}-images-idx3-ubyte.gz"), read(f"{stem}-labels-idx1-ubyte.gz")


def make_mnist_root(root: Path, n_train: int, n_test: int, folder: str = "MNIST") -> Path:
    """A torchvision-layout data root with the first n real digits of the shipped sample."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images, labels = read_sample(stem)
        write_idx(raw / f"{stem}-images-idx3-ubyte", images[:n])
        write_idx(raw / f"{stem}-labels-idx1-ubyte", labels[:n])
    return root


def save_tiny_wav2vec2(folder: Path, layers: int = 2) -> Path:
    """A tiny random wav2vec 2.0 with its feature extractor, saved as the hub holds it (one frame per 80 samples)."""
    import transformers

    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16), conv_stride=(10, 8),
        conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
    )  # fmt: skip
    transformers.Wav2Vec2Model(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """600 training and 200 test digits as MNIST idx files (read through torchvision's MNIST)."""
    return make_mnist_root(tmp_path_factory.mktemp("data"), 600, 200)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test reads the user's data folder or cache, and every test starts in a fresh cwd."""
    monkeypatch.delenv("TRANSFERCTL_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture
def cli(capsys):
    """Run `transferctl ARGS...` in-process, as the console script does."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        old_argv = sys.argv
        sys.argv = ["transferctl", *map(str, args)]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = old_argv
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SMALL_SIMCLR = """\
method: simclr
model: {{name: cnn, widths: [8, 16]}}
head: {{name: projection, hidden_dim: 32, out_dim: 16}}
optimizer: {{name: adamw, lr: 0.003}}
data: {{name: mnist, root: {root}, batch_size: 64, eval_batch_size: 256}}
train: {{epochs: 2, log_every: 2, device: cpu}}
"""


@pytest.fixture
def simclr_config(tmp_path, digits_root) -> Path:
    return write_config(tmp_path / "simclr.yaml", SMALL_SIMCLR.format(root=digits_root))


@pytest.fixture
def registries_restored(tmp_path, monkeypatch):
    """Plugins register into process-wide registries: the registries, sys.path and the plugin modules are as they
    were after the test."""
    from transferctl.components import load_components
    from transferctl.registry import REGISTRIES

    load_components()
    saved = {kind: (dict(registry._entries), registry.context) for kind, registry in REGISTRIES.items()}
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules = set(sys.modules)
    yield
    for kind, registry in REGISTRIES.items():
        entries, registry.context = saved[kind]  # a plugin modality may have added context names
        registry._entries.clear()
        registry._entries.update(entries)
        for entry in entries.values():
            entry.context = registry.context
    for name in set(sys.modules) - modules:
        if name.startswith("transferctl_plugin_") or str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): models this small
    run fastest so, and many times faster on a busy machine; the thread count is put back after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
