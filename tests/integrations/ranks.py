"""What the integrations' multi-process tests share: spawning the ranks with a launcher's environment (each rank's
output kept in a log that a failing spawn reports), and one case's results from every rank (failing the test with a
rank's traceback when it raised)."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.workers import rank_logs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no process listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, body, world: int, port: int, out_dir: str, args: tuple) -> None:
    """One spawned rank: its stdout and stderr (file descriptors, so C++ aborts too) to ``out_dir/rank<r>.log``, the
    variables ``torchrun`` sets, ``body(rank, out_dir, *args)``, then a barrier and the process group destroyed, so
    that no rank exits while another still talks to it."""
    log = os.open(os.path.join(out_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    body(rank, out_dir, *args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def spawn_ranks(body, world: int, out_dir: Path, *args) -> list[dict]:
    """Runs ``body(rank, out_dir, *args)`` on ``world`` spawned processes, each saving its ``{case: result}`` to
    ``out_dir/rank<r>.pt``; returns them by rank. A rank that dies fails the test with every rank's log."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(_rank_main, args=(body, world, free_port(), str(out_dir), args), nprocs=world, join=True)
    except mp.ProcessExitedException as error:
        pytest.fail(f"{error}\n{rank_logs(out_dir, world)}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def case_results(ranks, name):
    """The results of case ``name`` on every rank (``ranks``: each rank's {case: result}); fails the test naming the
    rank when one raised."""
    per_rank = [r[name] for r in ranks]
    for rank, res in enumerate(per_rank):
        if "error" in res:
            pytest.fail(f"rank {rank} raised in case {name}:\n{res['error']}")
    return per_rank
