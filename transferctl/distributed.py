"""Multi-process training on torch.distributed (launched with torchrun): who this process is, and the
few collectives transferctl needs. With one process every helper is a no-op.

    torchrun --nproc_per_node=2 -m transferctl pretrain -c configs/simclr_mnist.yaml

NCCL on GPUs, Gloo on CPUs. Rank 0 alone writes the run directory and prints; `data.batch_size` is the
global batch, split evenly over the ranks.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_from_env() -> World:
    """Join the process group torchrun describes in the environment (idempotent); one process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        # Left to interpreter shutdown, Gloo's worker threads can release tensors after Python is gone: a
        # SIGABRT ("terminate called without an active exception") on an exit that should be clean.
        atexit.register(leave)
    return world()


def leave() -> None:
    """Destroy this process's group (idempotent): at exit, while the interpreter can still release what it holds."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> World:
    """This process's place; one process when no process group was started (torch is not imported then)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "torch.distributed" not in sys.modules:
        return World()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size())


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not world().distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (rank 0 has written what the others read next)."""
    if world().distributed:
        import torch.distributed as dist

        dist.barrier()


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over all ranks (a copy; `value` is left alone)."""
    if not world().distributed:
        return value
    import torch.distributed as dist

    total = value.clone()
    dist.all_reduce(total)
    return total


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any: so that all ranks stop at the same step."""
    if not world().distributed:
        return flag
    import torch

    return bool(all_sum(torch.tensor(float(flag), device=device)).item() > 0)


def rank_share(n: int) -> range:
    """This rank's contiguous share of `n` items, for sharded evaluation: all of them with one process, or with
    fewer items than ranks (then every rank takes all, and `gather_rows` leaves them as they are)."""
    ranks = world()
    if not ranks.distributed or n < ranks.size:
        return range(n)
    return range(ranks.rank * n // ranks.size, (ranks.rank + 1) * n // ranks.size)


def sum_over_shares(value: torch.Tensor, n: int) -> torch.Tensor:
    """The sum over the ranks of what each computed on its `rank_share(n)`; `value` itself when the ranks did
    not share the items out (one process, or fewer items than ranks: every rank took all)."""
    ranks = world()
    return all_sum(value) if ranks.distributed and n >= ranks.size else value


def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's rows for its `rank_share(n)`, concatenated in rank order: the rows of all `n` items."""
    ranks = world()
    if not ranks.distributed or n < ranks.size:
        return x
    import torch
    import torch.distributed as dist

    counts = [(r + 1) * n // ranks.size - r * n // ranks.size for r in range(ranks.size)]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x`, concatenated in rank order; gradients flow back to each rank's own part."""
    if not world().distributed:
        return x
    import torch
    import torch.distributed.nn.functional as distributed_fn

    return torch.cat(distributed_fn.all_gather(x))
