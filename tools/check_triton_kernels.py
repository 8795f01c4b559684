#!/usr/bin/env python
"""Compile the fused GCE's Triton kernels for a GPU, on a machine without one, and report what the
compiler made of them: registers, spilled bytes, shared memory, tensor-core instructions and
pipelined loads, for every tile configuration the autotuner would try.

    python tools/check_triton_kernels.py                       # sm_90 (H100/H200), the paper's head
    python tools/check_triton_kernels.py --arch 80 --sms 108   # A100
    python tools/check_triton_kernels.py --n 4096 --v 65536 --d 4096 --levels 0 1 --json

The real operator (``gce_loss(impl="triton")``, forward and backward; plain, with the fp32
``main_grad`` sink and with gradient filtering) runs on the meta device: shapes and dtypes, no
memory, and the operator's GPU paths (everything not on the CPU takes them). Each kernel launch
it makes is compiled by Triton's own JIT for the chosen architecture (an autotuned launch: every
configuration) instead of being run, with the argument specialisation a GPU launch gets (16-byte
aligned pointers, unit strides folded in). The matmuls between the kernels run their meta
functions, so their shapes and dtypes are checked too.

A configuration fails the check when it spills registers or needs more shared memory than the
architecture has; a half-precision kernel must also use the architecture's tensor-core
instruction (``wgmma`` on sm_90, ``tcgen05`` on sm_100, ``mma.sync`` on the others) and, from sm_90,
asynchronously pipelined loads. Timing needs the GPU itself (tools/bench_gce.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from megamdm.gce import gce_loss, triton_kernels

# Shared memory one block may use (bytes, CUDA programming guide, "technical specifications").
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 103: 232448, 120: 101376}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Compiled:
    case: str
    kernel: str
    blocks: str  # BLOCK_N x BLOCK_V x BLOCK_D
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int  # per thread; spilled registers (the kernels keep no local arrays)
    spill_stores: int  # local-memory store instructions in the SASS
    shared_bytes: int
    mma: str  # the tensor-core instruction its PTX uses and how often: wgmma (sm_90), tcgen05 (sm_100), mma.sync
    async_loads: int  # loads the pipeliner turned into asynchronous copies
    problems: str  # why the configuration fails the check; empty when it passes


class _OfflineDriver(DriverBase):
    """Triton's view of a GPU that is not there: a target to compile for, nothing to run on."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("an offline target cannot run kernels")

    def get_current_device(self):
        # A key of its own, so Triton's per-device caches never hand these kernels to a real device.
        return f"offline-sm{self.target.arch}"

    def get_current_stream(self, device=None):
        return 0


def _cubin_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, spill-store instructions) of the cubin Triton built: cuobjdump's
    resource usage and the local stores (``STL``) in its SASS. These kernels keep no local
    arrays, so their stack holds spilled registers only."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = os.path.join(BIN, "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return int(m[1]), int(m[2]), len(re.findall(r"\bSTL(\.\S+)?\s", sass))


def _examine(case: str, kernel, kwargs, arch: int, half: bool) -> Compiled:
    ttgir = kernel.asm["ttgir"]
    regs, stack, spills = _cubin_usage(kernel.asm["cubin"])
    shared = kernel.metadata.shared
    ptx = kernel.asm["ptx"]
    kinds = {
        "wgmma": ptx.count("wgmma.mma_async"),
        "tcgen05": ptx.count("tcgen05.mma"),
        "mma.sync": ptx.count("mma.sync.aligned"),
    }
    used = [f"{kind} x{count}" for kind, count in kinds.items() if count]
    expected = {90: "wgmma", 100: "tcgen05", 103: "tcgen05"}.get(arch, "mma.sync")  # sm_120 has neither
    async_loads = ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy")
    problems = []
    if spills or stack:
        problems.append(f"spills ({stack} B stack, {spills} stores)")
    if shared > SMEM_LIMIT.get(arch, 0):
        problems.append(f"shared {shared} B > {SMEM_LIMIT.get(arch, 0)} B")
    if half and not kinds[expected]:
        problems.append(f"no {expected}")
    if arch >= 90 and half and not async_loads:
        problems.append("loads not pipelined")
    return Compiled(
        case=case,
        kernel=kernel.metadata.name,
        blocks=f"{kwargs['BLOCK_N']}x{kwargs['BLOCK_V']}x{kwargs['BLOCK_D']}",
        num_warps=kernel.metadata.num_warps,
        num_stages=kernel.metadata.num_stages,
        registers=regs,
        stack_bytes=stack,
        spill_stores=spills,
        shared_bytes=shared,
        mma=", ".join(used) or "none",
        async_loads=async_loads,
        problems=", ".join(problems),
    )


@dataclass
class Record:
    """What :func:`offline_compilation` found, each kernel under the case that first launched it."""

    case: str = ""
    found: list[Compiled] = field(default_factory=list)


@contextlib.contextmanager
def offline_compilation(arch: int, sms: int, half: bool):
    """Within the block, every Triton launch compiles for ``sm_<arch>`` instead of running (an
    autotuned launch: each of its configurations), and each kernel compiled goes into the
    :class:`Record` it yields once, under its ``case`` at the time. Everything is restored on exit."""
    record, seen, run = Record(), set(), JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel.hash not in seen:  # a loop of launches (the backward's chunks) compiles once
            seen.add(kernel.hash)
            record.found.append(_examine(record.case, kernel, kwargs, arch, half))
        return kernel

    def every_config(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))  # as Autotuner.run sets it for the pruning
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, grid=(1,), warmup=True, **kwargs, **config.all_kwargs())

    previous = driver._active
    driver.set_active(_OfflineDriver(arch))
    try:
        with (
            mock.patch.object(JITFunction, "run", compile_only),
            mock.patch.object(Autotuner, "run", every_config),
            mock.patch.object(triton_kernels, "_sm_count", lambda device: sms),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
            yield record
    finally:
        driver._active = previous


def check(n: int, v: int, d: int, dtype: str, levels: list[int], arch: int, sms: int, grad_filter: float) -> list[Compiled]:
    """Forward and backward of the Triton GCE at each group-level count (g = 8, 64, ..., weight 0.2),
    then at the most levels with the weight gradient into an fp32 sink and with gradient
    filtering, compiled for ``sm_<arch>``."""
    cases = [(f"{k} level{'s' * (k != 1)}", k, 0.0, False) for k in levels]
    cases.append((f"{max(levels)} level(s), main_grad", max(levels), 0.0, True))
    if grad_filter > 0:
        cases.append((f"{max(levels)} level(s), filtered", max(levels), grad_filter, False))
    with offline_compilation(arch, sms, dtype != "fp32") as record:
        for name, k, eps, sink_too in cases:
            record.case = name
            hidden = torch.empty(n, d, device="meta", dtype=DTYPES[dtype], requires_grad=True)
            weight = torch.empty(v, d, device="meta", dtype=DTYPES[dtype], requires_grad=True)
            target = torch.zeros(n, device="meta", dtype=torch.long)
            sink = torch.empty(v, d, device="meta") if sink_too else None
            sizes, weights = [8 * 8**i for i in range(k)], [0.2] * k
            try:
                loss = gce_loss(hidden, weight, target, sizes, weights, impl="triton", weight_grad_sink=sink, grad_filter=eps)
            except RuntimeError as e:  # the operator refuses what this Triton cannot compile
                print(f"{name}: refused: {e}", file=sys.stderr)
                continue
            loss.backward()
            assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    return record.found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="tokens")
    p.add_argument("--v", type=int, default=131072, help="vocabulary (one tensor-parallel shard)")
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--levels", type=int, nargs="+", default=[0, 1], help="group-level counts to compile")
    p.add_argument("--grad-filter", type=float, default=2**-12, help="0 skips the filtered backward")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10: 80 A100, 90 H100/H200, 100 B200")
    p.add_argument("--sms", type=int, default=132, help="the GPU's SM count (sets the forward's vocabulary splits)")
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # read when the kernels are defined: they would not compile
        p.error("the kernels are compiled here, not interpreted: unset TRITON_INTERPRET")
    if args.arch not in SMEM_LIMIT:
        p.error(f"--arch {args.arch} is not one of {sorted(SMEM_LIMIT)}")
    found = check(args.n, args.v, args.d, args.dtype, args.levels, args.arch, args.sms, args.grad_filter)
    if args.json:
        print(json.dumps([asdict(c) for c in found], indent=1))
    else:
        print(f"sm_{args.arch}, N={args.n} V={args.v} d={args.d} {args.dtype}, Triton {triton.__version__}")
        cols = [("case", "<24"), ("kernel", "<26"), ("tiles", "<12"), ("warps", ">5"), ("stages", ">6"), ("regs", ">4")]
        cols += [("stack B", ">7"), ("STL", ">4"), ("smem KiB", ">8"), ("mma", "<13"), ("async", ">5"), ("problems", "")]
        print(" ".join(f"{name:{fmt}}" for name, fmt in cols))
        for c in found:
            row = (c.case, c.kernel, c.blocks, c.num_warps, c.num_stages, c.registers, c.stack_bytes, c.spill_stores)
            row += (f"{c.shared_bytes / 1024:.0f}", c.mma, c.async_loads, c.problems or "ok")
            print(" ".join(f"{value:{fmt}}" for value, (_, fmt) in zip(row, cols)))
    return 1 if any(c.problems for c in found) else 0


if __name__ == "__main__":
    sys.exit(main())
