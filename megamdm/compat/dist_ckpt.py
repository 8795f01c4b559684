"""A fork-context results queue for megatron's torch_dist writer, for the length of a save session.

Upstream creates a spawn-context ``Manager`` on the first save of each process: ~4 s, and it
re-imports ``__main__``. A fork-context one starts in ~0.1 s. :func:`writer_queue` installs one and,
when the block ends, shuts it down and puts back what megatron had. The manager process ignores the
signals meant for the trainer (SLURM sends SIGUSR1 / SIGTERM to every process of a step): the
preemption save that follows them still needs it; it ends with the block.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
from collections.abc import Iterator
from multiprocessing.managers import SyncManager


def _ignore_trainer_signals() -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def writer_queue() -> Iterator[None]:
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if fa._results_queue is not None:  # an enclosing session (or megatron itself) has one
        yield
        return
    manager = SyncManager(ctx=mp.get_context("fork"))
    manager.start(_ignore_trainer_signals)
    fa._results_queue = manager.Queue()
    try:
        yield
    finally:
        fa._results_queue = None
        manager.shutdown()
