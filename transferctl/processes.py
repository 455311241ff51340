"""What a forked worker process must not keep of its parent: the files the parent holds for its own life.

A DataLoader worker is a fork, and inherits every open descriptor. A run's lock is a flock on an open file, which
lives while any copy is open: a worker that kept its copy would keep a killed run locked until it noticed and
exited, and `--resume` would be refused meanwhile. The run store marks its locks (`hold_for_life`); the data
pipelines pass `release_inherited_locks` as their workers' `worker_init_fn`.
"""

from __future__ import annotations

import weakref
from typing import Any

_HELD_LOCKS: weakref.WeakSet[Any] = weakref.WeakSet()  # this process's locks (open files holding a flock)


def hold_for_life(handle: Any) -> None:
    """Mark an open file as a lock this process holds for its life: a forked worker closes its copy."""
    _HELD_LOCKS.add(handle)


def release_inherited_locks(*_: Any) -> None:
    """In a forked child (a DataLoader worker), close its copies of the parent's locks. (The parent's own lock is
    untouched.)"""
    for handle in list(_HELD_LOCKS):
        handle.close()
    _HELD_LOCKS.clear()
