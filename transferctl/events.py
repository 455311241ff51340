"""TensorBoard event files: `train.tensorboard: true` (needs `pip install "transferctl[tensorboard]"`).

Scalars go to runs/<id>/tensorboard/: `step/loss`, `step/lr`, `step/samples_per_s` every `train.log_every`
steps, and every number of each epoch's metrics row as `epoch/<name>` (at that epoch's last step).
Event files are TensorBoard's append-only format, written by its SummaryWriter (like log.txt, not
rewritten atomically); `tensorboard --logdir runs` shows every run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from transferctl.errors import ConfigError


def check_available(tensorboard: bool) -> None:
    """A config that asks for TensorBoard on a machine without it fails before its run exists."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            'train.tensorboard: true needs the tensorboard package: pip install "transferctl[tensorboard]" (or set it to false)'
        )


class TensorBoardReporter:
    """A Reporter that forwards everything to `inner` and writes the same numbers as TensorBoard scalars."""

    def __init__(self, inner: Any, log_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.inner = inner
        # a resumed run repeats the steps after its checkpoint: TensorBoard drops what it logged for them
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)

    def start(self, total_steps: int, description: str) -> None:
        self.inner.start(total_steps, description)

    def progress(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"step/{key}", value, step)
        self.inner.progress(step, values)

    def epoch(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, row.get("step"))
        self.inner.epoch(row)

    def note(self, message: str) -> None:
        self.inner.note(message)

    def finish(self) -> None:
        self.inner.finish()
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
