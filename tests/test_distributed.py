"""Two processes on Gloo (CPU) compute what one process computes with the same global batch."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import write_config
from transferctl.losses import nt_xent

# No batch norm (SyncBatchNorm is CUDA-only): an mlp encoder and a projection head without it.
CONFIG = """\
method: simclr
model: {{name: mlp, hidden_dim: 32}}
head: {{name: projection, hidden_dim: 32, out_dim: 16, batch_norm: false}}
optimizer: {{name: sgd, lr: 0.1}}
data: {{name: mnist, root: {root}, batch_size: 64}}
train: {{max_steps: 6, log_every: 1, device: cpu}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transferctl(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
        if nproc > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "transferctl", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def step_losses(stderr: str) -> list[float]:
    return [float(m) for m in re.findall(r"^step \d+/\d+\s+loss ([\d.]+)", stderr, flags=re.M)]


def weights(run_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_root):
    """The same run on one process and on two, then each extended by --resume."""
    base = tmp_path_factory.mktemp("ddp")
    config = write_config(base / "c.yaml", CONFIG.format(root=digits_root))
    out = {}
    for nproc in (1, 2):
        # the 2-process run starts through the --nproc convenience flag, and resumes under torchrun itself
        first = transferctl("pretrain", "-c", config, "--runs-dir", base / f"runs{nproc}", "--json", "--nproc", str(nproc))
        assert first.returncode == 0, first.stderr
        result = json.loads(first.stdout)
        resumed = transferctl(
            "pretrain", "--resume", result["run_dir"], "train.max_steps=9", "--runs-dir", base / f"runs{nproc}", "--json", nproc=nproc
        )
        assert resumed.returncode == 0, resumed.stderr
        out[nproc] = {"first": first, "result": result, "resumed": resumed, "runs": base / f"runs{nproc}"}
    return out


def test_two_processes_match_one_at_every_step(runs):
    one, two = step_losses(runs[1]["first"].stderr), step_losses(runs[2]["first"].stderr)
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, abs=2e-4)  # printed with 4 decimals
    assert runs[1]["result"]["metrics"]["train_loss"] == pytest.approx(runs[2]["result"]["metrics"]["train_loss"], rel=1e-5)
    w1, w2 = weights(runs[1]["result"]["run_dir"]), weights(runs[2]["result"]["run_dir"])
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=1e-5), key


def test_only_rank_0_writes_and_the_layout_is_the_same(runs):
    for nproc in (1, 2):
        assert [p.name for p in runs[nproc]["runs"].iterdir()] == [runs[nproc]["result"]["run_id"]]
        assert runs[nproc]["first"].stdout.count("\n") == 1  # one JSON object, from rank 0
    layout = [
        sorted(str(p.relative_to(runs[n]["result"]["run_dir"])) for p in Path(runs[n]["result"]["run_dir"]).rglob("*")) for n in (1, 2)
    ]
    assert layout[0] == layout[1]
    env = json.loads((Path(runs[2]["result"]["run_dir"]) / "environment.json").read_text())
    assert env["world_size"] == 2


def test_a_two_process_run_resumes(runs):
    for nproc in (1, 2):
        assert json.loads(runs[nproc]["resumed"].stdout)["metrics"]["step"] == 9
    w1, w2 = weights(runs[1]["result"]["run_dir"]), weights(runs[2]["result"]["run_dir"])
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def _gathered_gradient(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shard = slice(rank * len(z1) // world, (rank + 1) * len(z1) // world)
        a, b = z1[shard].clone().requires_grad_(), z2[shard].clone().requires_grad_()
        loss = nt_xent(0.5)(a, b, gather=True)
        loss.backward()
        out[rank] = (loss.item(), a.grad, b.grad)
    finally:
        dist.destroy_process_group()


def test_gathered_nt_xent_loss_and_gradient_equal_one_process():
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    expected = nt_xent(0.5)(a, b)
    expected.backward()

    results = mp.Manager().dict()
    mp.spawn(_gathered_gradient, args=(2, free_port(), z1, z2, results), nprocs=2, join=True)
    for rank in (0, 1):
        loss, grad_a, grad_b = results[rank]
        shard = slice(rank * 4, rank * 4 + 4)
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        # every rank holds the global loss, so the gather's backward sums 2 equal copies; DDP's mean undoes it
        assert torch.allclose(grad_a / 2, a.grad[shard], atol=1e-7) and torch.allclose(grad_b / 2, b.grad[shard], atol=1e-7)


def _joins_and_leaves_at_exit(rank: int, world: int, port: int, out: dict) -> None:
    import atexit

    from transferctl import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    joined = distributed.init_from_env()
    distributed.all_sum(torch.ones(1))
    before = dist.is_initialized()
    atexit._run_exitfuncs()  # what interpreter shutdown runs first
    out[rank] = (joined.size, before, dist.is_initialized())


def test_a_process_leaves_its_group_at_exit():
    """A Gloo group left to interpreter shutdown can abort the process (SIGABRT) after a run that went well."""
    results = mp.Manager().dict()
    mp.spawn(_joins_and_leaves_at_exit, args=(2, free_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: (2, True, False), 1: (2, True, False)}


def test_a_torchrun_worker_leaves_its_group_and_exits_with_its_code(cli, monkeypatch):
    """Python's finalization can abort a Gloo worker after a run that went well (SIGABRT, now and then on a busy
    machine): a worker leaves its group and exits at once, with the command's exit code, its output flushed."""
    from transferctl import cli as cli_module
    from transferctl import distributed

    left, exits = [], []
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank=1, size=2))
    monkeypatch.setattr(distributed, "leave", lambda: left.append(True))

    def exit_now(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli_module.os, "_exit", exit_now)
    assert cli("--version").code == 0 and cli("pretrain").code == 2
    assert left == [True, True] and exits == [0, 2]
