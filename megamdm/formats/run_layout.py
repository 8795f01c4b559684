"""A training run directory on disk: ``iter_NNNNNNN/`` folders and the ``latest`` tracker.

``latest_checkpointed_iteration.txt`` (Megatron-LM's name) is written last and atomically (a
temporary file, then a rename), so a crash during a save never leaves a half-written checkpoint as
the latest one. Shared by training (which writes runs) and conversion (which reads and writes them);
:func:`resolve_iteration_dir` is the one way a path given by a user becomes the checkpoint to read.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MegamdmError

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(run_dir, iteration: int) -> Path:
    return Path(run_dir) / f"iter_{iteration:07d}"


def finalize_tracker(run_dir, iteration: int) -> None:
    """Point ``latest`` at ``iteration``: atomic, and only after the checkpoint is complete."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{TRACKER}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, run_dir / TRACKER)


class RunLayoutError(MegamdmError):
    """A run directory whose ``latest`` tracker does not name a checkpoint that is there."""


def latest_iteration(run_dir) -> int | None:
    """The iteration ``latest`` names (None: no tracker), checked to be a number whose
    ``iter_NNNNNNN`` folder exists."""
    p = Path(run_dir) / TRACKER
    if not p.is_file():
        return None
    text = p.read_text().strip()
    if not text.isdigit():
        raise RunLayoutError(
            f"{p} holds {text[:40]!r}, not an iteration number; training writes it (restore it, or point at "
            "an iter_NNNNNNN folder)"
        )
    it = int(text)
    if not (iteration_dir(run_dir, it) / ".metadata").is_file():
        raise RunLayoutError(
            f"{p} names iteration {it}, but {iteration_dir(run_dir, it).name} is not a complete checkpoint there; "
            "point at an iter_NNNNNNN folder that is"
        )
    return it


def resolve_iteration_dir(path) -> Path:
    """The ``iter_NNNNNNN`` directory a path names: a run directory's latest complete checkpoint, or
    the iteration directory itself; :class:`RunLayoutError` for anything else."""
    p = Path(path)
    it = latest_iteration(p)
    if it is not None:
        return iteration_dir(p, it)
    if (p / ".metadata").is_file():
        return p
    raise RunLayoutError(f"{p}: neither a training run directory (no {TRACKER}) nor a torch_dist iteration directory")
