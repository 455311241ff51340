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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import transferctl
from transferctl import agreement
from transferctl.build import Trained, build_network, load_trained, modality_of_config
from transferctl.config import load_config
from transferctl.errors import RunFailed, UsageError
from transferctl.fileio import atomic_write_bytes
from transferctl.methods import Export, method_of
from transferctl.modalities import dataset_modality
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
    # input name -> the axis that varies with an input's length, left dynamic where the run's outputs take any length
    length_axes: Mapping[str, int] = field(default_factory=dict)

    def dynamic_shapes(self, batch: Any) -> tuple[dict[int, Any], ...]:
        """Each input's dynamic axes for `torch.onnx.export`: the batch, and its length where it may vary."""
        shapes = []
        for name in self.input_names:
            axes = {0: batch}
            if name in self.length_axes:
                axes[self.length_axes[name]] = torch.export.Dim(f"{name}_length", min=2, max=1 << 20)
            shapes.append(axes)
        return tuple(shapes)


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
            dynamic_shapes=exported.dynamic_shapes(batch),
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
    task = method_of(cfg).task
    core = network.encoder if encoder_only else task.served(network) if task is not None else network
    module = modality_of_config(cfg).served(core, fitted) if fitted else core  # 0.3.0 kept no fitted state: the module alone
    if set(state) == set(core.state_dict()) != set(module.state_dict()):
        module = core  # an image export before 0.10: the module alone, which takes normalized images
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
    """How an exported model's outputs compare with the eager model's on real samples: the largest difference of
    their values, and the shares of the comparisons that the run's method or task counts (`Export.compare`: each
    row's class, each pixel's, ...), each against its minimum."""

    max_abs_diff: float
    agreement: dict[str, float]  # e.g. top1_agreement, pixel_agreement
    images: int
    batch_sizes: list[int]
    tolerance: float
    minimum_agreement: dict[str, float] = field(default_factory=dict)
    compares_values: bool = True  # False: the agreement alone decides (detections: rows may come and go)

    @property
    def passed(self) -> bool:
        agrees = all(self.agreement.get(name, 0.0) >= minimum for name, minimum in self.minimum_agreement.items())
        return (self.max_abs_diff <= self.tolerance or not self.compares_values) and agrees

    @property
    def top1_agreement(self) -> float | None:
        return self.agreement.get("top1_agreement")

    def describe(self) -> str:
        shares = "".join(f", {name.replace('_', ' ')} {share:.5f}" for name, share in self.agreement.items())
        return f"max abs diff {self.max_abs_diff:.2g}{shares}"

    def to_json(self) -> dict[str, Any]:
        """`top1_agreement` is always present (null for outputs without classes), as exports have reported it since 0.1."""
        return {
            "max_abs_diff": self.max_abs_diff,
            "top1_agreement": None,
            **self.agreement,
            "images": self.images,
            "batch_sizes": self.batch_sizes,
            "tolerance": self.tolerance,
            "passed": self.passed,
        }


def check_parity(
    reference: Runner,
    candidate: Runner,
    images: torch.Tensor | Inputs,
    tolerance: float,
    batch_sizes: list[int],
    compare: agreement.Compare = agreement.top1,
    minimum_agreement: Mapping[str, float] | None = None,
    compares_values: bool = True,
) -> Parity:
    """Run both on `images` (the export's input, or its inputs), split into batches of each size in turn, and
    compare their outputs: the values, and what `compare` counts (default: each row's argmax, which must agree
    everywhere)."""
    inputs = images if isinstance(images, tuple) else (images,)
    minimum = dict({"top1_agreement": 1.0} if minimum_agreement is None else minimum_agreement)
    total = len(inputs[0])
    worst, counts, used = 0.0, {}, []
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
                counts = agreement.add(counts, compare(expected, actual))
            used.append(size)
    return Parity(worst, agreement.shares(counts), total, used, tolerance, minimum, compares_values)


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
            flat |= {f"{name}_{share}": value for share, value in parity.agreement.items()}
        return flat

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "status": "completed",
            "export_dir": str(self.export_dir),
            "files": self.files,
            "verified": self.verified,
            "parity": {k: v.to_json() for k, v in self.parity.items()},
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
    _refuse_side_inputs(trained.network, cfg.model.name, modality.fed_side_inputs())
    fitted = modality.fitted_state(data)
    module = modality.served(trained.served(), fitted)
    checked = data.subset(torch.arange(min(len(data), max(verify_images, TRACE_BATCH))))
    inputs = modality.export_input(checked.inputs, checked)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    spec = trained.method.export()
    num_outputs = trained.method.num_outputs(data)
    example = tuple(x[:TRACE_BATCH] for x in inputs)
    lengths = modality.length_axes if spec.variable_length else {}
    exported = Exported(
        module, example, spec, modality.export_input_names(data), cfg.to_dict(), num_outputs, data.sample_shape, fitted, lengths
    )

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
                parity[fmt.name] = check_parity(
                    module,
                    fmt.load(staged),
                    inputs,
                    tolerance,
                    sizes,
                    compare=spec.compare,
                    minimum_agreement=spec.minimum_agreement,
                    compares_values=spec.compares_values,
                )
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


def _refuse_side_inputs(network: nn.Module, model: str, fed: frozenset[str] = frozenset()) -> None:
    """An export takes the modality's inputs alone: a network whose encoder or head needs side information beside
    them (word ids) cannot be exported as it is, unless the modality's export computes it (`fed`: audio's lengths)."""
    wanted = sorted({*getattr(network.encoder, "side_inputs", ()), *getattr(network.head, "side_inputs", ())} - fed)
    if wanted:
        raise UsageError(
            f"export: model '{model}' takes side information ({', '.join(wanted)}) beside its inputs, and an export takes the "
            f"modality's inputs alone; serve the run with transferctl instead"
        )


def _input_of(trained: Trained, data) -> dict[str, Any]:
    """The card's `input`: the modality's description, and for texts the columns of a CSV or JSONL file they come from."""
    described = trained.modality.describe_input(data)
    if trained.modality.reads_texts:
        described["text_columns"] = list(trained.cfg.data.options.get("text_columns", ["text"]))
    return described


def _model_card(trained: Trained, data, digests, files, parity, verified) -> dict[str, Any]:
    record, cfg, checkpoint, spec = trained.record, trained.cfg, trained.checkpoint, trained.method.export()
    with torch.no_grad():
        out_shape = list(trained.served()(trained.modality.example_input(data, 1)).shape[1:])
    task = trained.method.task
    return {
        "run_id": record.id,
        "parent": record.summary.get("parent"),
        "kind": spec.kind,
        "method": cfg.method.name,
        "task": cfg.task.name if cfg.task is not None else None,
        "modality": dataset_modality(cfg.data.name),
        "model": cfg.model.name,
        # how the encoder was built and what it started from (a timm model's pretrained_cfg, a checkpoint's processor)
        "model_options": cfg.model.options,
        "model_weights": cfg.model.weights,
        "checkpoint": {"name": record.checkpoint_name(cfg.eval.checkpoint), "epoch": checkpoint.epoch, "step": checkpoint.step},
        "input": _input_of(trained, data),
        "output": {"name": spec.output, "shape": ["batch", *out_shape]},
        **trained.method.card(data),
        "dataset": cfg.data.name,
        "status": record.summary.get("status"),
        "metrics": record.summary.get("metrics", {}),
        "checkpoint_metrics": checkpoint.metrics,
        # what predict reads new inputs and decodes outputs with, from this folder alone
        "fitted_state": trained.modality.card_fitted(trained.fitted),
        "task_options": cfg.task.options if task is not None and cfg.task is not None else None,
        "task_state": checkpoint.task if task is not None else None,
        "files": {name: {"path": files[name], "sha256": digest} for name, digest in digests.items()},
        "parity": {k: v.to_json() for k, v in parity.items()} if verified else None,
        "transferctl": transferctl.__version__,
        "torch": torch.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
