"""Human output on stderr: a rich progress bar on a terminal, plain lines otherwise, nothing when quiet."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


ROUTINE = ("step", "lr", "samples_per_s", "epoch_time_s")  # an epoch row's fields that its progress line already says


class ConsoleReporter:
    """The engine's Reporter for the CLI. On a terminal, a progress bar with each epoch's row above it; in a log (no
    terminal), one line every `train.log_every` steps alone, whatever the epoch length: an epoch that ends on such a
    step adds its row (its validation) to that step's line, and the other rows stay in metrics.jsonl."""

    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False)
        self.live = self.console.is_terminal and not quiet
        self._progress: Progress | None = None
        self._task: Any = None
        self._total = 0
        self._pending: tuple[int, str] | None = None  # a log's last progress line, held for its step's epoch row

    def info(self, message: str) -> None:
        self._flush()
        self._print(message)

    def _print(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, soft_wrap=True)

    def _flush(self) -> None:
        if self._pending is not None:
            self._print(self._pending[1])
            self._pending = None

    def start(self, total_steps: int, description: str) -> None:
        self._total = total_steps
        if self.live and total_steps:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(description, total=total_steps, stats="")
        else:
            self.info(f"{description}: {total_steps} steps" if total_steps else description)

    def progress(self, step: int, values: dict[str, float]) -> None:
        stats = f"loss {values['loss']:.4f}  lr {values['lr']:.3g}  {values['samples_per_s']:.0f} samples/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        else:
            self._flush()
            self._pending = (step, f"step {step}/{self._total}  {stats}")

    def epoch(self, row: dict[str, Any]) -> None:
        line = "  ".join(f"{k} {_fmt(v)}" for k, v in row.items())
        if self._progress is not None:
            self._progress.console.print(line, markup=False, soft_wrap=True)
        elif not self._total:  # a row without steps (evaluate's): itself
            self.info(line)
        elif self._pending is not None and self._pending[0] == row.get("step"):
            extra = "  ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k not in ROUTINE)
            self._print(f"{self._pending[1]}  {extra}")
            self._pending = None

    def note(self, message: str) -> None:
        """A one-line note on an option that has no effect as configured."""
        self.info(f"note: {message}")

    @contextmanager
    def counting(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """A progress bar for work counted in items (`data pack`): yields `update(done, total)`; silent off a terminal."""
        if not self.live:
            yield lambda done, total: None
            return
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console) as bar:
            task = bar.add_task(description, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)

    def finish(self) -> None:
        self._flush()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def columns(self, title: str | None, headers: list[str], rows: list[list[Any]]) -> None:
        """A table with a header row. Off a terminal it is as wide as its content, not cut at 80 columns
        (log files and pipes have no width)."""
        self._flush()
        if self.quiet:
            return
        table = Table(title=title)
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*("-" if v is None else _fmt(v) for v in row))
        console = self.console if self.console.is_terminal else Console(file=self.console.file, highlight=False, width=400)
        console.print(table)

    def table(self, title: str, rows: dict[str, Any]) -> None:
        self._flush()
        if self.quiet:
            return
        table = Table(title=title, show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value")
        for key, value in rows.items():
            table.add_row(key, _fmt(value))
        self.console.print(table)
