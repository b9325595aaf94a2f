"""Run a function on two CPU processes joined by a gloo process group, from a test.

``torch.multiprocessing.spawn`` re-raises a rank's exception (with its traceback) in the test.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # One thread per rank: two ranks share this machine's cores.
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_two_ranks(fn: Callable[..., None], *args: Any) -> None:
    """Call ``fn(rank, *args)`` on ranks 0 and 1; ``fn`` must be importable (module level)."""
    mp.spawn(_entry, args=(_free_port(), fn, args), nprocs=WORLD, join=True)
