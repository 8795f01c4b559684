"""Distributed checkpoints (megatron-core ``dist_checkpointing``, ``torch_dist``): layout and helpers.

A run directory holds ``iter_NNNNNNN/`` folders and ``latest_checkpointed_iteration.txt``, which is
written last and atomically (write to a temporary file, then rename), so a crash during a save
never leaves a half-written checkpoint as the latest one.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(run_dir, iteration: int) -> Path:
    return Path(run_dir) / f"iter_{iteration:07d}"


def finalize_tracker(run_dir, iteration: int) -> None:
    """Point ``latest`` at ``iteration``: atomic, and only after the checkpoint is complete."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{TRACKER}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, run_dir / TRACKER)


def latest_iteration(run_dir) -> int | None:
    p = Path(run_dir) / TRACKER
    if not p.is_file():
        return None
    return int(p.read_text().strip())


_MANAGER = None


def ensure_writer_queue() -> None:
    """Give megatron's torch_dist writer a results queue from a *fork*-context manager.

    Upstream creates a spawn-context ``Manager`` on the first save of each process: ~4 s, and it
    re-imports ``__main__``. A fork-context one starts in ~0.1 s; it is shut down at exit."""
    global _MANAGER
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if _MANAGER is None:
        _MANAGER = mp.get_context("fork").Manager()
        fa._results_queue = _MANAGER.Queue()
        atexit.register(shutdown_writer_queue)


def shutdown_writer_queue() -> None:
    global _MANAGER
    if _MANAGER is not None:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

        fa._results_queue = None
        _MANAGER.shutdown()
        _MANAGER = None


def load_model_weights(model, checkpoint_dir) -> None:
    """Load only the model weights of a torch_dist checkpoint into an (unwrapped) model at this
    process's TP/PP layout. ``_extra_state`` (TE's FP8 metadata) may be absent: it is then left
    fresh, as after a conversion from the single-GPU format."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    sd = model.sharded_state_dict()
    state, missing, _ = dist_checkpointing.load(sd, str(checkpoint_dir), strict=StrictHandling.RETURN_ALL)
    real_missing = sorted(k for k in missing if "_extra_state" not in k)
    if real_missing:
        raise RuntimeError(f"{checkpoint_dir}: the checkpoint lacks model weights {real_missing[:5]}")
    state = {k: v for k, v in state.items() if "_extra_state" not in k}
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if "_extra_state" not in k]
    if bad or result.unexpected_keys:
        raise RuntimeError(f"{checkpoint_dir}: weights do not fit the model: missing {bad[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
