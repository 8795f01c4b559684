"""Which dtype this CPU multiplies matrices fastest in: measured, not assumed.

On x86 CPUs with AVX-512 BF16 (or AMX) oneDNN runs bf16 matrix products at ~2x the fp32 rate; on
AVX2-only CPUs torch falls back to a scalar bf16 kernel that runs ~30-60x *slower* than fp32, and a
bf16 run there takes hours instead of minutes. :func:`probe` times both dtypes on the demo's layer
shapes (about 0.3 s in all) and :func:`resolve_cpu_precision` turns ``precision: auto`` into the
faster one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# (rows, inner, cols): the demo's attention/MLP projections and its 1536-way head, at 2048 tokens
SHAPES = ((2048, 64, 160), (2048, 160, 64), (2048, 64, 1536))


@dataclass(frozen=True)
class CpuMatmulProbe:
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", ...
    bf16_gflops: float
    fp32_gflops: float

    @property
    def fast_dtype(self) -> str:
        """bf16 when it is at least as fast as fp32 (it rounds, so it must pay for itself)."""
        return "bf16" if self.bf16_gflops >= self.fp32_gflops else "fp32"

    def describe(self) -> str:
        return (
            f"CPU {self.capability}: bf16 matmul {self.bf16_gflops:.1f} GFLOP/s, fp32 {self.fp32_gflops:.1f} "
            f"GFLOP/s per thread -> {self.fast_dtype}"
        )


def _gflops(dtype: torch.dtype, seconds: float) -> float:
    flops, spent = 0.0, 0.0
    g = torch.Generator().manual_seed(0)
    for m, k, n in SHAPES:
        a = torch.randn(m, k, generator=g).to(dtype)
        b = torch.randn(k, n, generator=g).to(dtype)
        a @ b  # first call: kernel selection, allocation
        t0, reps = time.perf_counter(), 0
        while True:
            a @ b
            reps += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / len(SHAPES):
                break
        flops += 2.0 * m * k * n * reps
        spent += dt
    return flops / spent / 1e9


def probe(seconds: float = 0.15) -> CpuMatmulProbe:
    """Time bf16 and fp32 matrix products on one thread, ``seconds`` per dtype."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bf16 = _gflops(torch.bfloat16, seconds)
        fp32 = _gflops(torch.float32, seconds)
    finally:
        torch.set_num_threads(threads)
    return CpuMatmulProbe(torch.backends.cpu.get_cpu_capability(), bf16, fp32)


def resolve_cpu_precision(precision: str) -> tuple[str, CpuMatmulProbe | None]:
    """``auto`` -> the probe's faster dtype (with the probe, for the log); anything else as it is."""
    if precision != "auto":
        return precision, None
    p = probe()
    return p.fast_dtype, p
