"""Fork distributed test ranks from pytest: one gloo process group per call, no torchrun.

Forking reuses the parent's imported modules (torch, megatron), so a 2-rank test costs well
under a second instead of the 7-8 s of a torchrun launch. On GPU machines ranks are spawned
instead: a fork of a process that has touched CUDA (or run autograd on it) cannot use CUDA, and
megatron's checkpointing synchronises CUDA whenever it is available."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, queue, args, kwargs):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, True, fn(*args, **kwargs)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
        code = 1
    finally:
        try:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()
        # put() hands the result to a feeder thread; os._exit would kill it mid-write and leave the
        # parent waiting for (or blocked inside) a message that never completes
        queue.close()
        queue.join_thread()
        os._exit(code)


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked ranks; return the per-rank results."""
    import torch

    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args, kwargs)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed test failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
