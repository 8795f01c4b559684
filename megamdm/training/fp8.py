"""Which FP8 recipes a GPU runs, by compute capability (checked before the first FP8 forward).

FP8 needs Ada / Hopper (8.9, 9.0) or newer; MXFP8 (microscaled blocks) is Blackwell's (10.0+) and fails
at the first FP8 GEMM on Hopper. ``tensorwise`` (current scaling) is what Megatron-Bridge runs on H100.
"""

from __future__ import annotations

from ..config import ConfigError

MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


def allowed_recipes(capability: tuple[int, int]) -> list[str]:
    return [r for r, need in MIN_CAPABILITY.items() if capability >= need]


def check_fp8_recipe(recipe: str, capability: tuple[int, int], device_name: str = "this GPU") -> None:
    """ConfigError, one line, when ``recipe`` does not run on a GPU of ``capability``."""
    if capability >= MIN_CAPABILITY[recipe]:
        return
    need = ".".join(map(str, MIN_CAPABILITY[recipe]))
    have = ".".join(map(str, capability))
    allowed = allowed_recipes(capability)
    raise ConfigError(
        f"train.fp8_recipe={recipe} needs compute capability {need}; {device_name} has {have}, where "
        + (f"train.fp8_recipe may be {', '.join(allowed)}" if allowed else "FP8 does not run (train.precision bf16)")
    )
