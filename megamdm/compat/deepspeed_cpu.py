"""DeepSpeed on CPU without its shared-memory all-reduce op.

For CPU-only training DeepSpeed JIT-compiles a shared-memory all-reduce (35-80 s per fresh
environment); gloo does the same collectives. :func:`no_shm_comm` declares that op unavailable
until the block ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def no_shm_comm() -> Iterator[None]:
    import deepspeed

    table = deepspeed.ops.__compatible_ops__
    had, old = "deepspeed_shm_comm" in table, table.get("deepspeed_shm_comm")
    table["deepspeed_shm_comm"] = False
    try:
        yield
    finally:
        if had:
            table["deepspeed_shm_comm"] = old
        else:
            table.pop("deepspeed_shm_comm", None)
