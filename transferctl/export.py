"""Export a run's model to TorchScript, ONNX or safetensors, and check every export against the eager model.

A classifier run exports the whole classifier (normalized images -> logits); an encoder-only run
exports the encoder (normalized images -> embeddings). Files are staged in a private folder and
checked; only then is each moved into place with an atomic rename, so a failed export replaces
nothing and no file is ever half-written. The model card beside the files says how to feed the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import transferctl
from transferctl.build import build_network
from transferctl.config import Config, load_config
from transferctl.data import ImageData, load_split, model_input
from transferctl.errors import RunFailed, UsageError
from transferctl.registry import did_you_mean
from transferctl.fileio import atomic_write_bytes
from transferctl.recipes.evaluation import as_trained, trained_model
from transferctl.runs import DEFAULT_RUNS_DIR, load_checkpoint, read_trained_run

TRACE_BATCH = 16
ONNX_OPSET = 18  # the lowest opset torch's dynamo exporter emits; onnxruntime has run it since 1.14

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Format:
    """One export format: how to write it and how to run what was written without transferctl."""

    name: str
    filename: str
    save: Callable[[nn.Module, torch.Tensor, Path, Config], None]
    load: Callable[[Path], Runner]
    modules: tuple[str, ...] = ()  # optional packages it needs, all from the [onnx] extra

    def missing_modules(self) -> list[str]:
        return [m for m in self.modules if importlib.util.find_spec(m) is None]


# --------------------------------------------------------------------------- torchscript

def _save_torchscript(module: nn.Module, example: torch.Tensor, path: Path, cfg: Config) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the one loadable format
        torch.jit.save(torch.jit.trace(module, example), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_torchscript(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path), map_location="cpu")
    scripted.eval()
    return lambda x: scripted(x)



# --------------------------------------------------------------------------- onnx

def _save_onnx(module: nn.Module, example: torch.Tensor, path: Path, cfg: Config) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    output = "logits" if cfg.is_classifier else "embeddings"
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # keep stdout for --json
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=["images"], output_names=[output],
            dynamic_shapes={_forward_arg(module): {0: batch}},
            opset_version=ONNX_OPSET, verbose=False,
        )
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(path, proto.SerializeToString())


def _forward_arg(module: nn.Module) -> str:
    """The name of forward's input (dynamic shapes are keyed by it): `images`, or `input` for nn.Sequential."""
    return next(iter(inspect.signature(module.forward).parameters))


def _load_onnx(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])



# --------------------------------------------------------------------------- safetensors

def _save_safetensors(module: nn.Module, example: torch.Tensor, path: Path, cfg: Config) -> None:
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    metadata = {"transferctl_config": json.dumps(cfg.to_dict()), "input_shape": json.dumps(list(example.shape[1:]))}
    atomic_write_bytes(path, save(state, metadata=metadata))


def load_safetensors(path: str | Path) -> nn.Module:
    """Rebuild an exported model with transferctl from its .safetensors file alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    cfg = load_config(None, base=json.loads(metadata["transferctl_config"]))
    state = load_file(str(path))
    channels, size, _ = json.loads(metadata["input_shape"])
    num_classes = _head_outputs(state)
    network = build_network(cfg, channels, size, num_classes)
    module = network if cfg.is_classifier else network.encoder
    module.load_state_dict(state)
    return module.eval()


def _head_outputs(state: dict[str, torch.Tensor]) -> int:
    """A classifier's number of classes: the rows of its head's last linear layer (whatever comes before it,
    a standardizing batch norm, dropout); 1 for an encoder alone."""
    linear = [k for k, v in state.items() if k.startswith("head.") and k.endswith(".weight") and v.ndim == 2]
    if not linear:
        return 1
    last = max(linear, key=lambda k: [int(p) if p.isdigit() else -1 for p in k.split(".")[1:-1]])
    return state[last].shape[0]


def _load_safetensors_runner(path: Path) -> Runner:
    module = load_safetensors(path)
    return lambda x: module(x)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("torchscript", "model.pt", _save_torchscript, _load_torchscript),
        Format("onnx", "model.onnx", _save_onnx, _load_onnx, ("onnx", "onnxruntime", "onnxscript")),
        Format("safetensors", "model.safetensors", _save_safetensors, _load_safetensors_runner, ("safetensors",)),
    )
}


def formats() -> list[str]:
    return list(FORMATS)


def resolve_formats(names: list[str]) -> list[Format]:
    """The requested formats, or a usage error naming the bad one or the extra to install."""
    if not names:
        raise UsageError(f"export needs at least one --format ({', '.join(formats())})")
    chosen = []
    for name in dict.fromkeys(names):
        if name not in FORMATS:
            raise UsageError(f"unknown export format '{name}'{did_you_mean(name, formats())} (formats: {', '.join(formats())})")
        fmt = FORMATS[name]
        missing = fmt.missing_modules()
        if missing:
            raise UsageError(f"format '{name}' needs {', '.join(missing)}: pip install \"transferctl[onnx]\"")
        chosen.append(fmt)
    return chosen


# --------------------------------------------------------------------------- parity

@dataclass
class Parity:
    """How an exported model's outputs compare with the eager model's on real images."""

    max_abs_diff: float
    top1_agreement: float  # argmax agreement: classes for classifiers, strongest feature for encoders
    images: int
    batch_sizes: list[int]
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_agreement == 1.0


def check_parity(reference: Runner, candidate: Runner, images: torch.Tensor, tolerance: float, batch_sizes: list[int]) -> Parity:
    """Run both on `images`, split into batches of each size in turn, and compare their outputs."""
    worst, agree, count, used = 0.0, 0, 0, []
    with torch.no_grad():
        for size in batch_sizes:
            for start in range(0, len(images), size):
                batch = images[start : start + size]
                expected, actual = reference(batch).float(), candidate(batch).float()
                if actual.shape != expected.shape:
                    raise RunFailed(f"exported model returned shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
                if not (torch.isfinite(expected).all() and torch.isfinite(actual).all()):
                    worst = math.inf  # NaN compares false with everything: never let it pass as "no difference"
                else:
                    worst = max(worst, (expected - actual).abs().max().item())
                agree += (expected.argmax(1) == actual.argmax(1)).sum().item()
                count += len(batch)
            used.append(size)
    return Parity(worst, agree / max(count, 1), len(images), used, tolerance)


# --------------------------------------------------------------------------- the export recipe

@dataclass
class ExportResult:
    run_id: str
    run_dir: Path
    export_dir: Path
    files: dict[str, str]
    parity: dict[str, Parity]
    verified: bool

    @property
    def metrics(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name, parity in self.parity.items():
            flat[f"{name}_max_abs_diff"] = parity.max_abs_diff
            flat[f"{name}_top1_agreement"] = parity.top1_agreement
        return flat

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "status": "completed",
            "export_dir": str(self.export_dir),
            "files": self.files,
            "verified": self.verified,
            "parity": {k: {**asdict(v), "passed": v.passed} for k, v in self.parity.items()},
            "metrics": self.metrics,
        }




def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_run(
    source: str,
    format_names: list[str],
    *,
    output: Path | None = None,
    verify: bool = True,
    tolerance: float = 1e-4,
    verify_images: int = 1000,
    runs_dir: Path = DEFAULT_RUNS_DIR,
) -> ExportResult:
    """Export RUN's model in each format into `output` (default runs/<id>/export/), checked against eager."""
    chosen = resolve_formats(format_names)
    record = read_trained_run(source, runs_dir)
    cfg = load_config(None, base=record.config)
    checkpoint = load_checkpoint(record.checkpoint_path(cfg.eval.checkpoint))
    data = as_trained(load_split(cfg.data, train=False), checkpoint, str(record.path))
    module = trained_model(record, cfg, checkpoint, data)
    images = model_input(data.images[: max(verify_images, TRACE_BATCH)], data.mean, data.std)
    example = images[:TRACE_BATCH]

    export_dir = output or record.path / "export"
    try:
        export_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {export_dir}: cannot create it ({exc.strerror})") from None
    staging = export_dir / f".staging-{os.getpid()}"
    staging.mkdir(exist_ok=True)
    try:
        parity: dict[str, Parity] = {}
        for fmt in chosen:
            staged = staging / fmt.filename
            fmt.save(module, example, staged, cfg)
            if verify:
                # batch sizes other than the traced one, and a single image
                parity[fmt.name] = check_parity(module, fmt.load(staged), images, tolerance, [250, 1 if len(images) < 50 else 7])
        failed = {k: p for k, p in parity.items() if not p.passed}
        if failed:
            detail = "; ".join(f"{k}: max abs diff {p.max_abs_diff:.3g} (tolerance {p.tolerance:g}), top-1 agreement {p.top1_agreement:.4f}" for k, p in failed.items())
            raise RunFailed(f"export of {record.id} failed its parity check: {detail}; nothing was replaced")
        files = {fmt.name: fmt.filename for fmt in chosen}
        card = _model_card(record, cfg, data, module, checkpoint, {k: _sha256(staging / f) for k, f in files.items()}, files, parity, verify)
        atomic_write_bytes(staging / "model_card.json", (json.dumps(card, indent=2) + "\n").encode())
        for name in [*files.values(), "model_card.json"]:
            os.replace(staging / name, export_dir / name)
        for fmt in FORMATS.values():  # files of an earlier export that this card does not describe
            if fmt.name not in files:
                (export_dir / fmt.filename).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = ExportResult(record.id, record.path, export_dir, {k: str(export_dir / f) for k, f in files.items()}, parity, verify)
    atomic_write_bytes(record.path / "export_report.json", (json.dumps(result.to_json(), indent=2) + "\n").encode())
    return result


def _model_card(record, cfg, data: ImageData, module, checkpoint, digests, files, parity, verified) -> dict[str, Any]:
    with torch.no_grad():
        out_dim = module(torch.zeros(1, data.channels, data.image_size, data.image_size)).shape[1]
    return {
        "run_id": record.id,
        "parent": record.summary.get("parent"),
        "kind": "classifier" if cfg.is_classifier else "encoder",
        "method": cfg.method,
        "model": cfg.model.name,
        "checkpoint": {"name": cfg.eval.checkpoint, "epoch": checkpoint.get("epoch"), "step": checkpoint.get("step")},
        "input": {
            "name": "images",
            "shape": ["batch", data.channels, data.image_size, data.image_size],
            "dtype": "float32",
            "preprocessing": "x = (pixels / 255 - mean) / std, per channel, NCHW",
            "mean": list(data.mean),
            "std": list(data.std),
        },
        "output": {"name": "logits" if cfg.is_classifier else "embeddings", "shape": ["batch", out_dim]},
        "classes": list(data.classes) if cfg.is_classifier else None,
        "dataset": cfg.data.name,
        "status": record.summary.get("status"),
        "metrics": record.summary.get("metrics", {}),
        "checkpoint_metrics": checkpoint.get("metrics"),
        "files": {name: {"path": files[name], "sha256": digest} for name, digest in digests.items()},
        "parity": {k: {**asdict(v), "passed": v.passed} for k, v in parity.items()} if verified else None,
        "transferctl": transferctl.__version__,
        "torch": torch.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
