"""Graceful stops: the first SIGINT or SIGTERM asks the training loop to checkpoint and stop."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopOnSignal:
    """While active, SIGINT/SIGTERM set `signum` instead of killing the process; the loop polls
    `requested()` after each step. A second SIGINT raises KeyboardInterrupt at once (files stay whole:
    every write is atomic)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
