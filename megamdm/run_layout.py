"""A training run directory on disk: ``iter_NNNNNNN/`` folders and the ``latest`` tracker.

``latest_checkpointed_iteration.txt`` (Megatron-LM's name) is written last and atomically (a
temporary file, then a rename), so a crash during a save never leaves a half-written checkpoint as
the latest one. Shared by training (which writes runs) and conversion (which reads and writes them).
"""

from __future__ import annotations

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
