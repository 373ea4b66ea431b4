"""What the integrations' multi-process tests share: a free port for the ranks' rendezvous, and one case's results
from every rank (failing the test with a rank's traceback when it raised)."""

import socket

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no process listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case_results(ranks, name):
    """The results of case ``name`` on every rank (``ranks``: each rank's {case: result}); fails the test naming the
    rank when one raised."""
    per_rank = [r[name] for r in ranks]
    for rank, res in enumerate(per_rank):
        if "error" in res:
            pytest.fail(f"rank {rank} raised in case {name}:\n{res['error']}")
    return per_rank
