"""Sampling with token editing (docs/design.md §1.3), one module per part, read in this order:

    settings   SampleSettings, SampleConfig (the ``sample:`` section), the named presets
    schedules  how many tokens each step commits; the stratified policy's orders
    draw       one image's predictions a chunk of positions at a time: filtering, draw, confidence, editing
    loop       sample_tokens: the algorithm, on any model through ``hidden_fn`` / ``head_fn``
    pipeline   MDMSampler: prompts in, PIL images out, from a single-GPU-format checkpoint
    outputs    prompt sources and output layouts (plain, GenEval, DPG-Bench); grid: image grids

The single-GPU pipeline and the in-training sampler (``training/samples.py``) share the loop. The
names below are imported on first use: the config schema imports :mod:`.settings`, and importing it
must not pull in the pipeline (which loads checkpoints, and so imports the config).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MDMSampler": "pipeline",
    "SamplerOutput": "pipeline",
    "sample_tokens": "loop",
    "SampleResult": "loop",
    "SampleSettings": "settings",
    "SampleConfig": "settings",
    "SAMPLE_PRESETS": "settings",
    "preset_settings": "settings",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
