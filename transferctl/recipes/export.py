"""Export a run's model to TorchScript, ONNX or safetensors, and check every export against the eager model.

The run's method says what an export holds (`Method.export`): a trained head's whole network (classifier:
normalized images -> logits) or the encoder alone (SimCLR: normalized images -> embeddings); the modality says
what its input is and what the export holds around the module (`Modality.served`: audio puts its front end in
front, so its exports take waveforms). Files are staged in a private folder and checked; only then is each moved into place with an
atomic rename, so a failed export replaces nothing and no file is ever half-written. The model card beside the
files says how to feed the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import transferctl
from transferctl.build import Trained, build_network, load_trained, modality_of_config
from transferctl.config import load_config
from transferctl.errors import RunFailed, UsageError
from transferctl.fileio import atomic_write_bytes
from transferctl.methods import Export
from transferctl.registry import did_you_mean
from transferctl.runs import DEFAULT_RUNS_DIR, read_trained_run

TRACE_BATCH = 16
ONNX_OPSET = 18  # the lowest opset torch's dynamo exporter emits; onnxruntime has run it since 1.14

Runner = Callable[..., torch.Tensor]  # the export's inputs (one tensor, or several: text's ids and mask) -> its output
Inputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Exported:
    """What a format writes: the module, an example input to trace, and what the files record about them."""

    module: nn.Module  # what takes the export's inputs: the network or encoder, behind the modality's front end if it has one
    example: Inputs
    spec: Export  # encoder alone or the whole network, and the output's name
    input_names: tuple[str, ...]
    config: dict[str, Any]
    num_outputs: int  # of the head the network was built with (safetensors rebuilds it)
    sample_shape: tuple[int, ...]  # of the network's inputs (safetensors rebuilds it)
    fitted: dict[str, Any]  # the modality's fitted state (safetensors rebuilds its front end)


@dataclass(frozen=True)
class Format:
    """One export format: how to write it and how to run what was written without transferctl."""

    name: str
    filename: str
    save: Callable[[Exported, Path], None]
    load: Callable[[Path], Runner]
    modules: tuple[str, ...] = ()  # optional packages it needs, all from the [onnx] extra

    def missing_modules(self) -> list[str]:
        return [m for m in self.modules if importlib.util.find_spec(m) is None]


# --------------------------------------------------------------------------- torchscript


def _save_torchscript(exported: Exported, path: Path) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the one loadable format
        torch.jit.save(torch.jit.trace(exported.module, exported.example), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_torchscript(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path), map_location="cpu")
    scripted.eval()
    return lambda *x: scripted(*x)


# --------------------------------------------------------------------------- onnx


def _save_onnx(exported: Exported, path: Path) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    module = exported.module
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # keep stdout for --json
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            exported.example,
            dynamo=True,
            input_names=list(exported.input_names),
            output_names=[exported.spec.output],
            dynamic_shapes=tuple({0: batch} for _ in exported.example),
            opset_version=ONNX_OPSET,
            verbose=False,
        )
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(path, proto.SerializeToString())


def _load_onnx(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda *x: torch.from_numpy(session.run(None, {name: t.numpy() for name, t in zip(names, x, strict=True)})[0])


# --------------------------------------------------------------------------- safetensors


def _save_safetensors(exported: Exported, path: Path) -> None:
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in exported.module.state_dict().items()}
    metadata = {
        "transferctl_config": json.dumps(exported.config),
        "input_shape": json.dumps(list(exported.sample_shape)),
        "num_outputs": json.dumps(exported.num_outputs),
        "encoder_only": json.dumps(exported.spec.encoder_only),
        "fitted_state": json.dumps(exported.fitted),
    }
    atomic_write_bytes(path, save(state, metadata=metadata))


def load_safetensors(path: str | Path) -> nn.Module:
    """Rebuild an exported model with transferctl from its .safetensors file alone (also one that transferctl
    0.1.0 wrote, whose metadata lacks `num_outputs` and `encoder_only`; and 0.3.0's, without `fitted_state`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    cfg = load_config(None, base=json.loads(metadata["transferctl_config"]))
    state = load_file(str(path))
    sample_shape = tuple(json.loads(metadata["input_shape"]))
    encoder_only = json.loads(metadata["encoder_only"]) if "encoder_only" in metadata else not any(k.startswith("head.") for k in state)
    num_outputs = json.loads(metadata["num_outputs"]) if "num_outputs" in metadata else _head_outputs(state)
    fitted = json.loads(metadata.get("fitted_state", "{}"))
    network = build_network(cfg, sample_shape, num_outputs, fitted)
    module = modality_of_config(cfg).served(network.encoder if encoder_only else network, fitted)
    module.load_state_dict(state)
    return module.eval()


def _head_outputs(state: dict[str, torch.Tensor]) -> int:
    """For files without `num_outputs`: the rows of the head's last linear layer (whatever comes before it,
    a standardizing batch norm, dropout); 1 for an encoder alone."""
    linear = [k for k, v in state.items() if k.startswith("head.") and k.endswith(".weight") and v.ndim == 2]
    if not linear:
        return 1
    last = max(linear, key=lambda k: [int(p) if p.isdigit() else -1 for p in k.split(".")[1:-1]])
    return state[last].shape[0]


def _load_safetensors_runner(path: Path) -> Runner:
    module = load_safetensors(path)
    return lambda *x: module(*x)


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
    top1_agreement: float | None  # argmax agreement: classes for classifiers, strongest feature for encoders; None: values
    images: int
    batch_sizes: list[int]
    tolerance: float
    pixel_agreement: float | None = None  # the share of pixels whose argmax class agrees (segmentation)

    @property
    def passed(self) -> bool:
        pixels_agree = self.pixel_agreement is None or self.pixel_agreement >= PIXEL_AGREEMENT
        return self.max_abs_diff <= self.tolerance and self.top1_agreement in (None, 1.0) and pixels_agree

    def describe(self) -> str:
        top1 = f", top-1 agreement {self.top1_agreement:.4f}" if self.top1_agreement is not None else ""
        pixels = f", pixel agreement {self.pixel_agreement:.5f}" if self.pixel_agreement is not None else ""
        return f"max abs diff {self.max_abs_diff:.2g}{top1}{pixels}"


PIXEL_AGREEMENT = 0.999  # a logit within tolerance can still flip the argmax of a pixel on a class boundary


def check_parity(
    reference: Runner,
    candidate: Runner,
    images: torch.Tensor | Inputs,
    tolerance: float,
    batch_sizes: list[int],
    agreement: str | None = "top1",
) -> Parity:
    """Run both on `images` (the export's input, or its inputs), split into batches of each size in turn, and
    compare their outputs (and their argmax: each row's with `agreement="top1"`, each pixel's with "pixels")."""
    inputs = images if isinstance(images, tuple) else (images,)
    total = len(inputs[0])
    worst, agree, count, used = 0.0, 0, 0, []
    same_pixels, pixels = 0, 0
    with torch.no_grad():
        for size in batch_sizes:
            for start in range(0, total, size):
                batch = tuple(x[start : start + size] for x in inputs)
                expected, actual = reference(*batch).float(), candidate(*batch).float()
                if actual.shape != expected.shape:
                    raise RunFailed(f"exported model returned shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
                if not (torch.isfinite(expected).all() and torch.isfinite(actual).all()):
                    worst = math.inf  # NaN compares false with everything: never let it pass as "no difference"
                else:
                    worst = max(worst, (expected - actual).abs().max().item())
                same = expected.argmax(1) == actual.argmax(1)
                if agreement == "pixels":
                    same_pixels, pixels = same_pixels + same.sum().item(), pixels + same.numel()
                else:
                    agree += same.sum().item()
                count += len(batch[0])
            used.append(size)
    top1 = agree / max(count, 1) if agreement == "top1" else None
    return Parity(worst, top1, total, used, tolerance, same_pixels / max(pixels, 1) if agreement == "pixels" else None)


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
            if parity.top1_agreement is not None:
                flat[f"{name}_top1_agreement"] = parity.top1_agreement
            if parity.pixel_agreement is not None:
                flat[f"{name}_pixel_agreement"] = parity.pixel_agreement
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
    trained = load_trained(record, cfg, device=torch.device("cpu"), splits=("test",))
    data, modality = trained.split(train=False), trained.modality
    fitted = modality.fitted_state(data)
    module = modality.served(trained.served(), fitted)
    inputs = modality.export_input(data.inputs[: max(verify_images, TRACE_BATCH)], data)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    spec = trained.method.export()
    num_outputs = trained.method.num_outputs(data)
    example = tuple(x[:TRACE_BATCH] for x in inputs)
    exported = Exported(module, example, spec, modality.export_input_names(), cfg.to_dict(), num_outputs, data.sample_shape, fitted)

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
            fmt.save(exported, staged)
            if verify:
                # batch sizes other than the traced one, and a single sample
                sizes = [250, 1 if len(inputs[0]) < 50 else 7]
                parity[fmt.name] = check_parity(module, fmt.load(staged), inputs, tolerance, sizes, agreement=spec.agreement)
        failed = {k: p for k, p in parity.items() if not p.passed}
        if failed:
            detail = "; ".join(f"{k}: {p.describe()} (tolerance {p.tolerance:g})" for k, p in failed.items())
            raise RunFailed(f"export of {record.id} failed its parity check: {detail}; nothing was replaced")
        files = {fmt.name: fmt.filename for fmt in chosen}
        companions = modality.companion_files(fitted)  # text: tokenizer.json, which callers encode with
        for name, content in companions.items():
            atomic_write_bytes(staging / name, content)
        listed = {**files, **{name: name for name in companions}}
        digests = {k: _sha256(staging / f) for k, f in listed.items()}
        card = _model_card(trained, data, digests, listed, parity, verify)
        atomic_write_bytes(staging / "model_card.json", (json.dumps(card, indent=2) + "\n").encode())
        for name in [*files.values(), *companions, "model_card.json"]:
            os.replace(staging / name, export_dir / name)
        for fmt in FORMATS.values():  # files of an earlier export that this card does not describe
            if fmt.name not in files:
                (export_dir / fmt.filename).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = ExportResult(record.id, record.path, export_dir, {k: str(export_dir / f) for k, f in files.items()}, parity, verify)
    atomic_write_bytes(record.path / "export_report.json", (json.dumps(result.to_json(), indent=2) + "\n").encode())
    return result


def _model_card(trained: Trained, data, digests, files, parity, verified) -> dict[str, Any]:
    record, cfg, checkpoint, spec = trained.record, trained.cfg, trained.checkpoint, trained.method.export()
    with torch.no_grad():
        out_shape = list(trained.served()(trained.modality.example_input(data, 1)).shape[1:])
    return {
        "run_id": record.id,
        "parent": record.summary.get("parent"),
        "kind": spec.kind,
        "method": cfg.method.name,
        "task": cfg.task.name if cfg.task is not None else None,
        "model": cfg.model.name,
        "checkpoint": {"name": cfg.eval.checkpoint, "epoch": checkpoint.epoch, "step": checkpoint.step},
        "input": trained.modality.describe_input(data),
        "output": {"name": spec.output, "shape": ["batch", *out_shape]},
        **trained.method.card(data),
        "dataset": cfg.data.name,
        "status": record.summary.get("status"),
        "metrics": record.summary.get("metrics", {}),
        "checkpoint_metrics": checkpoint.metrics,
        "files": {name: {"path": files[name], "sha256": digest} for name, digest in digests.items()},
        "parity": {k: {**asdict(v), "passed": v.passed} for k, v in parity.items()} if verified else None,
        "transferctl": transferctl.__version__,
        "torch": torch.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
