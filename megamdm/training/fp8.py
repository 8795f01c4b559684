"""Which FP8 recipes a GPU runs, by compute capability and CUDA version (checked before the first FP8
forward), following Transformer Engine's own gates (``transformer_engine/pytorch/quantization.py``):

* ``delayed`` and ``tensorwise`` (current scaling, what Megatron-Bridge runs on H100): Hopper (9.0) or
  newer, or Ada (8.9) with CUDA 12.1+;
* ``blockwise`` (DeepSeek-style 128-blocks): 9.0 or newer with CUDA 12.9+;
* ``mxfp8`` (microscaled blocks): data-centre Blackwell, 10.x and 11.x; TE refuses it on 12.x
  (consumer Blackwell) and it fails at the first FP8 GEMM on Hopper.
"""

from __future__ import annotations

from ..config import ConfigError

RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def _cuda(version: str | None) -> tuple[int, int]:
    major, minor = (version or "0.0").split(".")[:2]
    return int(major), int(minor)


def why_not(recipe: str, capability: tuple[int, int], cuda: str | None) -> str | None:
    """What keeps ``recipe`` from running on a GPU of ``capability`` with CUDA ``cuda`` (None: it runs)."""
    cc, cu = tuple(capability), _cuda(cuda)
    if recipe in ("delayed", "tensorwise"):
        if cc >= (9, 0) or (cc >= (8, 9) and cu >= (12, 1)):
            return None
        return "compute capability 9.0 (8.9 with CUDA 12.1)"
    if recipe == "blockwise":
        return None if cc >= (9, 0) and cu >= (12, 9) else "compute capability 9.0 and CUDA 12.9"
    return None if (10, 0) <= cc < (12, 0) else "compute capability 10.x or 11.x (data-centre Blackwell)"


def allowed_recipes(capability: tuple[int, int], cuda: str | None) -> list[str]:
    return [r for r in RECIPES if why_not(r, capability, cuda) is None]


def check_fp8_recipe(recipe: str, capability: tuple[int, int], cuda: str | None, device_name: str = "this GPU") -> None:
    """ConfigError, one line, when ``recipe`` does not run on a GPU of ``capability`` with CUDA ``cuda``."""
    need = why_not(recipe, capability, cuda)
    if need is None:
        return
    have = f"{'.'.join(map(str, capability))} with CUDA {cuda}"
    allowed = allowed_recipes(capability, cuda)
    raise ConfigError(
        f"train.fp8_recipe={recipe} needs {need}; {device_name} has {have}, where "
        + (f"train.fp8_recipe may be {', '.join(allowed)}" if allowed else "FP8 does not run (train.precision bf16)")
    )
