"""The `predict` and `embed` recipes: a trained model applied to new files.

A model comes from a run (PyTorch, with the run's own fitted state and the checkpoint `eval.checkpoint` names, as
evaluate and export read them) or from an export folder alone (the ONNX file with onnxruntime, else the TorchScript
file, with what its model card records of the decoding). Inputs (`transferctl/inputs.py`) are decoded by the
modality's reader exactly as the run's data set decoded its files, a batch at a time in DataLoader workers, so memory
stays bounded whatever their number; the task turns each batch of outputs into records (`Task.decode`), put back on
the input (an image's own pixels). An input that cannot be read fails alone: its record carries `error`.
"""

from __future__ import annotations

import inspect
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferctl.errors import RunFailed, UsageError
from transferctl.inputs import Input, resolve
from transferctl.modalities import Modality
from transferctl.modalities.base import ReadBatch
from transferctl.predictions import ArtifactFolder, RecordWriter, check_embedding_output, inline, safe_stem, write_embeddings
from transferctl.processes import release_inherited_locks
from transferctl.runs import DEFAULT_RUNS_DIR
from transferctl.tasks.base import Task

CARD = "model_card.json"
EXPORT_BATCH = 64  # an export folder's batch size unless one is given (a run's is its data.eval_batch_size)
Progress = Callable[[int, int], None]  # (inputs done, inputs in all)


# --------------------------------------------------------------------------- where the model comes from


@dataclass
class Model:
    """A trained model to apply: what its inputs are (`modality`, `fitted`: the training split's decoding and
    classes), what its outputs mean (`task`; None for a method that trains none), and how to run it."""

    name: str  # the run's id (an export folder's: the run it was exported from)
    modality: Modality
    fitted: dict[str, Any]
    task: Task | None
    method: str
    text_columns: list[str]
    batch_size: int
    run: Callable[[ReadBatch], torch.Tensor]  # a batch of read inputs -> the outputs
    features: Callable[[ReadBatch], torch.Tensor] | None = None  # -> the encoder's pooled features (runs only)

    def inputs(self, arguments: Sequence[str | Path], list_file: Path | None, texts: Sequence[str], stdin: IO[str] | None) -> list[Input]:
        """What `arguments`, the --list file, the texts and standard input name, as this model reads them."""
        if type(self.modality).reader is Modality.reader:  # a plugin modality that reads no files: one line, not a crash
            name = type(self.modality).__name__
            raise UsageError(f"{name} implements no Modality.reader, so predict and embed cannot read its files; add one (docs/plugins.md)")
        return resolve(arguments, self.modality, list_file=list_file, texts=texts, stdin=stdin, text_columns=self.text_columns)


def open_model(source: str | Path, *, runs_dir: Path = DEFAULT_RUNS_DIR, device: str | None = None) -> Model:
    """The model of a run (a directory or a bare id under `runs_dir`) or of an export folder."""
    path = Path(source)
    if path.is_dir() and not (path / "summary.json").is_file():
        if not (path / CARD).is_file():
            raise UsageError(f"--from {source}: neither a run (no summary.json) nor an export folder (no {CARD}); pass one of those")
        return _export_model(path, device)
    return _run_model(str(source), runs_dir, device)


def _device(name: str | None) -> torch.device:
    from transferctl.engine.train import pick_device

    try:
        return pick_device(name or "auto")
    except UsageError as exc:
        raise UsageError(str(exc).replace("train.device=", "--device ").replace("train.device", "--device")) from None


def _run_model(source: str, runs_dir: Path, device_name: str | None) -> Model:
    from transferctl import checkpoints
    from transferctl.build import load_trained, modality_of_config, rebuild, recorded_sizes, trained_fitted
    from transferctl.config import load_config
    from transferctl.methods import method_of
    from transferctl.models.heads import side_for
    from transferctl.runs import read_trained_run

    record = read_trained_run(source, runs_dir)
    cfg = load_config(None, base=record.config)
    method, modality = method_of(cfg), modality_of_config(cfg)
    checkpoint = checkpoints.read(record.checkpoint_path(cfg.eval.checkpoint))
    if method.task is not None:
        method.task.load_fitted(checkpoint.task)
    device = _device(device_name)
    fitted = trained_fitted(checkpoint, cfg)
    if recorded_sizes(checkpoint, cfg, fitted)[0] is None:  # an image run before format 3: sized by its test split, as evaluate is
        trained = load_trained(record, cfg, device=device, splits=("test",))
        method, network, fitted = trained.method, trained.network, trained.fitted
    else:
        network = rebuild(checkpoint, cfg, where=str(record.path)).to(device).eval()

    def inputs_of(batch: ReadBatch, module: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        samples = batch.samples.to(device)
        return modality.model_input(samples.inputs, samples), side_for(module, samples.side)

    served = method.task.served(network) if method.task is not None else network

    @torch.no_grad()
    def run(batch: ReadBatch) -> torch.Tensor:
        x, side = inputs_of(batch, network)
        return served(x, **side).float()

    @torch.no_grad()
    def features(batch: ReadBatch) -> torch.Tensor:
        x, side = inputs_of(batch, network.encoder)
        return network.encoder(x, **side).float()

    columns = list(cfg.data.options.get("text_columns", ["text"]))
    return Model(record.id, modality, fitted, method.task, cfg.method.name, columns, cfg.data.eval_batch_size, run, features)


def _export_model(folder: Path, device_name: str | None) -> Model:
    from transferctl.modalities import dataset_modality, modality_named
    from transferctl.recipes.export import FORMATS
    from transferctl.registry import TASKS

    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--from {folder}: its {CARD} is unreadable ({exc}); export the run again") from None
    if not isinstance(card, dict) or "transferctl" not in card or "input" not in card:
        raise UsageError(f"--from {folder}: its {CARD} was not written by transferctl export; pass a transferctl export folder or run")
    modality = modality_named(card.get("modality") or dataset_modality(card["dataset"]))
    fitted = modality.fitted_from_card(card, folder)
    task = None
    if card.get("task") and card.get("kind") != "encoder":
        task = TASKS.build(card["task"], card.get("task_options") or {})
        if card.get("task_state"):
            task.load_fitted(card["task_state"])
    if device_name not in (None, "auto", "cpu"):
        raise UsageError(f"--device {device_name}: an export folder runs on the CPU (onnxruntime or TorchScript); drop --device")
    chosen = _export_format(folder)
    runner = FORMATS[chosen].load(folder / FORMATS[chosen].filename)

    @torch.no_grad()
    def run(batch: ReadBatch) -> torch.Tensor:
        return runner(*modality.card_input(batch.samples.inputs, batch.samples, card)).float()

    columns = list(card["input"].get("text_columns", ["text"]))
    return Model(card.get("run_id") or folder.name, modality, fitted, task, card.get("method", "?"), columns, EXPORT_BATCH, run)


def _export_format(folder: Path) -> str:
    """The export's ONNX file where onnxruntime is installed, else its TorchScript file, else its safetensors file."""
    from transferctl.recipes.export import FORMATS

    present = [name for name in ("onnx", "torchscript", "safetensors") if (folder / FORMATS[name].filename).is_file()]
    usable = [name for name in present if not FORMATS[name].missing_modules()]
    if not usable:
        if present:
            needs = ", ".join(FORMATS[present[0]].missing_modules())
            raise UsageError(f'--from {folder}: reading its {FORMATS[present[0]].filename} needs {needs}: pip install "transferctl[onnx]"')
        raise UsageError(f"--from {folder}: the folder has a {CARD} but no model file (model.onnx, model.pt); export the run again")
    return usable[0]


# --------------------------------------------------------------------------- reading inputs a batch at a time


class _Batches(Dataset):
    """Batch b of the inputs, decoded (in a DataLoader worker): the positions read, their batch, and the failures."""

    def __init__(self, inputs: Sequence[Input], modality: Modality, fitted: dict[str, Any], batch_size: int):
        self.inputs, self.modality, self.fitted, self.batch_size = inputs, modality, fitted, batch_size
        self.read = modality.reader(fitted)

    def __len__(self) -> int:
        return -(-len(self.inputs) // self.batch_size)

    def __getitem__(self, b: int) -> tuple[list[int], ReadBatch | None, list[tuple[int, str]]]:
        positions = range(b * self.batch_size, min(len(self.inputs), (b + 1) * self.batch_size))
        decoded, kept, failed = [], [], []
        for position in positions:
            item = self.inputs[position]
            try:
                decoded.append(self.read(item.open(), item.id))
                kept.append(position)
            except Exception as exc:  # one input's failure, whatever it is, is its record's error; the others go on
                failed.append((position, _one_line(exc, item)))
        return kept, self.modality.batch_of(decoded, self.fitted) if decoded else None, failed


def _one_line(exc: Exception, item: Input) -> str:
    message = " ".join(str(exc).split())
    if isinstance(exc, UsageError) and item.id in message:
        return message
    return f"cannot read {item.id}: {message or type(exc).__name__}"


def _as_is(batch: Any) -> Any:
    return batch


def default_workers(modality: Modality, batches: int) -> int:
    """Decoding workers: none for texts or a single batch (a worker costs more to start than it saves); else half the
    cores, at most 4. The model keeps every core's thread: workers decode ahead and then wait, so a core kept for
    each would mostly idle (benchmarks/throughput.py --predict measures both)."""
    if not modality.decodes_in_workers or batches <= 1:
        return 0
    return min(4, (os.cpu_count() or 1) // 2)


def read_batches(
    model: Model, inputs: Sequence[Input], batch_size: int, workers: int
) -> Iterator[tuple[list[int], ReadBatch | None, list[tuple[int, str]]]]:
    """The inputs decoded a batch at a time, in order, a few batches ahead in `workers` worker processes."""
    loader = DataLoader(
        _Batches(inputs, model.modality, model.fitted, batch_size),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=workers,
        worker_init_fn=release_inherited_locks,  # a worker must not keep a run's lock
        prefetch_factor=2 if workers else None,
    )
    yield from loader


# --------------------------------------------------------------------------- predict


@dataclass
class Predictions:
    """A predict's inputs and model; `records()` runs it."""

    model: Model
    inputs: list[Input]
    top_k: int = 1
    batch_size: int | None = None
    artifacts: ArtifactFolder | None = None  # where masks go; None: inline in the records
    workers: int | None = None
    drawings: Path | None = None  # where each input goes with its record drawn on it (`Task.draw`: boxes); None: nowhere

    def records(self, progress: Progress | None = None) -> Iterator[dict[str, Any]]:
        """One record per input, in input order: what names it, then what the task decodes, or its `error`."""
        model, task, size = self.model, self.model.task, self.batch_size or self.model.batch_size
        done = 0
        workers = default_workers(model.modality, -(-len(self.inputs) // size)) if self.workers is None else self.workers
        for kept, batch, failed in read_batches(model, self.inputs, size, workers):
            records: dict[int, dict[str, Any]] = {p: {**self.inputs[p].describe(), "error": error} for p, error in failed}
            if batch is not None:
                decoded = _decoded(task, model.run(batch).cpu(), model.fitted, self.top_k, batch)
                for position, fields, record in zip(kept, batch.fields, decoded, strict=True):
                    records[position] = {**self.inputs[position].describe(), **fields, **record}
            for position in sorted(records):
                record = records[position]
                if self.drawings is not None and "error" not in record:
                    record["drawn"] = str(self._draw(position, record))
                yield self.artifacts.save(record, position, self.inputs[position].stem) if self.artifacts else inline(record)
            done += len(records)
            if progress is not None:
                progress(done, len(self.inputs))

    def _draw(self, position: int, record: dict[str, Any]) -> Path:
        """The input image with its record drawn on it, as a PNG in `drawings`."""
        from PIL import Image

        source = self.inputs[position].open()
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            drawn = self.model.task.draw(image.convert("RGB"), record)
        try:
            self.drawings.mkdir(parents=True, exist_ok=True)
            path = self.drawings / f"{position:06d}_{safe_stem(self.inputs[position].stem)}.png"
            drawn.save(path)
        except OSError as exc:
            raise UsageError(f"--save-images {self.drawings}: cannot write there ({exc.strerror})") from None
        return path


def _decoded(task: Task, outputs: torch.Tensor, fitted: dict[str, Any], top_k: int, batch: ReadBatch) -> list[dict[str, Any]]:
    """`task.decode`, given the batch as read where it takes one (a plugin task of 0.9 decodes without it)."""
    if "batch" in inspect.signature(task.decode).parameters:
        return task.decode(outputs, fitted, top_k, batch=batch)
    return task.decode(outputs, fitted, top_k)


def prepare_predict(
    source: str | Path,
    inputs: Sequence[str | Path] = (),
    *,
    list_file: Path | None = None,
    texts: Sequence[str] = (),
    stdin: IO[str] | None = None,
    top_k: int = 1,
    batch_size: int | None = None,
    device: str | None = None,
    masks: Path | None = None,
    save_images: Path | None = None,
    runs_dir: Path = DEFAULT_RUNS_DIR,
) -> Predictions:
    """Everything a predict needs, checked before anything is read or written: the model, which must train a task,
    and the inputs. `masks`: where files a record points at go (default: predictions/<run id>/). `save_images`: where
    each input goes with its record drawn on it (detection: its boxes)."""
    if top_k < 1:
        raise UsageError(f"--top-k {top_k}: give 1 or more")
    model = open_model(source, runs_dir=runs_dir, device=device)
    if model.task is None:
        raise UsageError(
            f"--from {source}: method '{model.method}' trains no task, so its model predicts nothing; use `transferctl embed` for "
            f"its features, or `transferctl finetune --from` it to train a task"
        )
    if masks is not None and masks.exists() and not masks.is_dir():
        raise UsageError(f"--masks {masks} is a file; give a folder for the mask PNGs")
    if save_images is not None and (type(model.task).draw is Task.draw or save_images.is_file()):
        why = "is a file; give a folder" if save_images.is_file() else f"the task ({type(model.task).__name__}) draws nothing on its inputs"
        raise UsageError(f"--save-images {save_images}: {why} (detection draws its boxes)")
    resolved = model.inputs(inputs, list_file, texts, stdin)
    folder = masks if masks is not None else Path("predictions") / model.name
    return Predictions(model, resolved, top_k, batch_size, ArtifactFolder(folder), drawings=save_images)


def predict(source: str | Path, inputs: Sequence[str | Path] = (), **options: Any) -> list[dict[str, Any]]:
    """The records of `inputs` (paths, folders, patterns, shards; a text model's texts as strings) predicted by a run
    or an export folder: one per input, in order; an input that could not be read has `error` (see `prepare_predict`
    for the options)."""
    return list(prepare_predict(source, inputs, **options).records())


@dataclass
class PredictReport:
    """What `transferctl predict` did: counts, where the records and masks went, and the inputs that failed."""

    source: str
    inputs: int
    failed: list[dict[str, Any]]
    output: Path | None
    masks: Path | None

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "completed",
            "source": self.source,
            "inputs": self.inputs,
            "predicted": self.inputs - len(self.failed),
            "failed": len(self.failed),
            "output": str(self.output) if self.output else None,
            "masks": str(self.masks) if self.masks else None,
            "failures": self.failed,
        }


def predict_to(predictions: Predictions, writer: RecordWriter, progress: Progress | None = None) -> PredictReport:
    """Run `predictions` into `writer` (its file replaced only once every record is written)."""
    failed = []
    try:
        for record in predictions.records(progress):
            if "error" in record:
                failed.append({"input": record["input"], "error": record["error"]})
            writer.write(record)
        writer.close()
    except BaseException:
        writer.discard()
        raise
    artifacts = predictions.artifacts
    masks = artifacts.folder if artifacts is not None and artifacts.written else None
    return PredictReport(predictions.model.name, len(predictions.inputs), failed, writer.output, masks)


# --------------------------------------------------------------------------- embed


@dataclass
class Embeddings:
    """The encoder's pooled features of the inputs that could be read (rows in input order), what names each row,
    and the inputs that failed."""

    source: str
    ids: list[dict[str, Any]]
    matrix: np.ndarray
    failed: list[dict[str, Any]]
    normalized: bool
    files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "completed",
            "source": self.source,
            "inputs": len(self.ids) + len(self.failed),
            "embedded": len(self.ids),
            "failed": len(self.failed),
            "dim": int(self.matrix.shape[1]),
            "normalized": self.normalized,
            "output": str(self.files[0]) if self.files else None,
            "files": [str(f) for f in self.files],
            "failures": self.failed,
        }


def compute_embeddings(
    source: str | Path,
    inputs: Sequence[str | Path] = (),
    *,
    list_file: Path | None = None,
    texts: Sequence[str] = (),
    stdin: IO[str] | None = None,
    normalize: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    runs_dir: Path = DEFAULT_RUNS_DIR,
    progress: Progress | None = None,
    before_reading: Callable[[], None] = lambda: None,
) -> Embeddings:
    """The features of `inputs` by a run's encoder (L2-normalized with `normalize`, as evaluate's k-NN takes them).
    `before_reading`: called once the model and inputs are resolved (the CLI checks its output there)."""
    model = open_model(source, runs_dir=runs_dir, device=device)
    if model.features is None:
        raise UsageError(f"--from {source}: embed reads a run's encoder, and this is an export folder; pass the run ({model.name})")
    resolved = model.inputs(inputs, list_file, texts, stdin)
    before_reading()
    size = batch_size or model.batch_size
    ids, rows, failed, done = [], [], [], 0
    workers = default_workers(model.modality, -(-len(resolved) // size))
    for kept, batch, failures in read_batches(model, resolved, size, workers):
        failed += [{**resolved[p].describe(), "error": error} for p, error in failures]
        if batch is not None:
            features = model.features(batch)
            rows.append((F.normalize(features, dim=1) if normalize else features).cpu().numpy())
            ids += [resolved[p].describe() for p in kept]
        done += len(kept) + len(failures)
        if progress is not None:
            progress(done, len(resolved))
    matrix = np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)
    return Embeddings(model.name, ids, matrix.astype(np.float32, copy=False), failed, normalize)


def embed(source: str | Path, inputs: Sequence[str | Path] = (), *, skip_bad: bool = False, **options: Any) -> tuple[list[str], np.ndarray]:
    """(input ids, features (N, D) as float32) of `inputs` by a run's encoder, in input order (see
    `compute_embeddings` for the options). An input that cannot be read is an error unless `skip_bad`, which leaves
    it out."""
    result = compute_embeddings(source, inputs, **options)
    if result.failed and not skip_bad:
        first = result.failed[0]
        raise RunFailed(f"{len(result.failed)} inputs could not be read, the first {first['input']}: {first['error']}")
    return [i["input"] for i in result.ids], result.matrix


def embed_to(output: Path, source: str | Path, inputs: Sequence[str | Path] = (), **options: Any) -> Embeddings:
    """`compute_embeddings`, written to `output` (.npy with a .jsonl index, .safetensors or .csv), checked first."""
    result = compute_embeddings(source, inputs, before_reading=lambda: check_embedding_output(output), **options)
    metadata = {"source": result.source, "normalized": result.normalized}
    result.files = write_embeddings(output, result.ids, result.matrix, metadata)
    return result
