"""The checkpoint schema, versioned, written and read here alone.

Format 3 (`checkpoints/last.pt` and `best.pt`), a mapping that loads with `torch.load(..., weights_only=True)`:

    format        3
    transferctl   the version that wrote it
    config        the run's resolved config
    model         the network's weights for use (evaluation, export, fine-tuning): the weight average, if kept
    network       what rebuilding the network needs beyond the config and `data` (`build.rebuild`, no data set read):
                  sample_shape (one model input's shape, a list) and num_outputs (the head's outputs)
    data          the training split's classes (and target_names, for values) and the modality's fitted state, which
                  records how inputs are decoded: images: mean, std, image_size, channels, resize (crop | stretch |
                  letterbox), interpolation; audio: front_end (sample_rate, n_fft, win_length, hop_length, n_mels,
                  kind; format 2 also clip_samples), clip_samples (None: any length), mean, std, max_samples; text:
                  tokenizer, max_length, truncation, padding
    task          the task's fitted state (empty for classification)
    epoch, step   where training stood
    metrics       best.pt: the epoch's row that made it best; else absent
    training      last.pt: what resuming needs: position, optimizer, scheduler, scaler, rng, objective state,
                  world_size, device_type and, with weight averaging, trained_model and averaged_steps

Format 2 had no `network`, and `data` recorded no decoding (images: mean and std alone; audio: no max_samples;
text: no padding): a rebuild sizes its network from the config, the fitted state and, for images without a
configured image size, the test split (`build.load_trained`). Format 1 (transferctl 0.1.0) also kept the training
entries at the top level and had no `task`. Both are read into the current schema (`network` None, `format` the
file's); a run resumed from one writes format 3. Any other format is refused with a one-line error that names it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transferctl
from transferctl.errors import UsageError

FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
_FORMAT_1_TRAINING_KEYS = (
    "position",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "world_size",
    "device_type",
    "trained_model",
    "averaged_steps",
)


@dataclass
class Checkpoint:
    """One checkpoint, in the current schema (see the module docstring)."""

    config: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    epoch: int
    step: int
    task: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    network: dict[str, Any] | None = None  # sample_shape and num_outputs (None: read from an older format)
    format: int = FORMAT  # the format of the file it was read from

    @property
    def position(self) -> dict[str, Any]:
        """Where training stood (last.pt): step, completed epochs, batches into the next, ... ({} for best.pt)."""
        return (self.training or {}).get("position", {})

    def trained_by(self) -> tuple[int, str | None]:
        """(processes, device type) that trained a last.pt: an exact resume needs the same."""
        training = self.training or {}
        return training.get("world_size", 1), training.get("device_type")

    def encoder(self) -> dict[str, Any]:
        """The encoder's weights, without the `encoder.` prefix (what fine-tuning starts from)."""
        return encoder_part(self.model)

    def to_file(self) -> dict[str, Any]:
        saved: dict[str, Any] = {
            "format": FORMAT,
            "transferctl": transferctl.__version__,
            "config": self.config,
            "model": self.model,
            "network": self.network,
            "data": self.data,
            "task": self.task,
            "epoch": self.epoch,
            "step": self.step,
        }
        if self.metrics is not None:
            saved["metrics"] = self.metrics
        if self.training is not None:
            saved["training"] = self.training
        return saved

    @classmethod
    def from_file(cls, saved: dict[str, Any]) -> Checkpoint:
        """A checkpoint as `torch.load` returned it, in any readable format."""
        if saved.get("format") == 1:
            training = {k: saved[k] for k in _FORMAT_1_TRAINING_KEYS if k in saved}
            saved = {**saved, "task": {}, "training": training or None}
        return cls(
            config=saved["config"],
            model=saved["model"],
            data=saved["data"],
            epoch=saved["epoch"],
            step=saved["step"],
            task=saved.get("task", {}),
            metrics=saved.get("metrics"),
            training=saved.get("training"),
            network=saved["network"] if saved["format"] >= 3 else None,
            format=saved["format"],
        )


def encoder_part(weights: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}


def to_bytes(checkpoint: Checkpoint) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(checkpoint.to_file(), buffer)
    return buffer.getvalue()


def read(path: Path) -> Checkpoint:
    """Load a checkpoint safely (weights_only); a missing, corrupt or unknown-format file is a usage error."""
    import torch

    if not path.is_file():
        raise UsageError(f"{path}: checkpoint missing; the run did not finish an epoch (check its summary.json)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise UsageError(f"{path}: not a readable checkpoint ({type(exc).__name__}); it may be truncated or corrupt") from None
    version = saved.get("format") if isinstance(saved, dict) else None
    if version not in READABLE_FORMATS:
        raise UsageError(
            f"{path}: checkpoint format {version if version is not None else 'unknown'} is not one that transferctl "
            f"{transferctl.__version__} reads (formats {', '.join(map(str, READABLE_FORMATS))}); use the transferctl that wrote it"
        )
    try:
        return Checkpoint.from_file(saved)
    except KeyError as exc:
        raise UsageError(f"{path}: checkpoint format {version} lacks {exc}; the file is damaged") from None
