#!/usr/bin/env python
"""Memory, speed and error of the GCE implementations: naive vs torch vs triton, and with --peers
Liger Kernel and Apple's Cut Cross-Entropy on plain cross-entropy (the same inputs, in the same
process sequence; they run when importable: pip install liger-kernel cut-cross-entropy, GPU only).

    python tools/bench_gce.py                              # CPU size: N=2048 V=65536 d=512 fp32
    python tools/bench_gce.py --n 32768 --v 131072 --d 4096 --dtype bf16 --peers   # paper shape, on a GPU
    python tools/bench_gce.py --n 5500 --v 1536 --d 64 --dtype bf16   # the demo's head, CPU
    python tools/bench_gce.py --json

With --peers the table has two parts: plain cross-entropy (every implementation, group weights 0)
and GCE (ours). "max err" is the largest absolute difference of the loss, dH and dW from the naive
implementation's, relative to the largest absolute value of that naive tensor.

"Extra memory" is the peak during forward+backward minus what every implementation must hold:
the inputs and their gradients. With --sink ours add the weight gradient into an fp32 tensor held
beside the inputs (megatron's main_grad) and the weight gets a placeholder gradient, which counts
as the weight's gradient. On CUDA it comes from the caching allocator's peak; on CPU from
the process's peak resident set (reset through /proc/self/clear_refs), each implementation in a
fresh forked process. Times are the median of --repeat runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from megamdm.gce import gce_loss
from megamdm.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ours: the operator and its gradient filter (triton-filter: Cut Cross-Entropy's bf16 threshold; inexact)
OURS = {"naive": ("naive", 0.0), "torch": ("torch", 0.0), "triton": ("triton", 0.0), "triton-filter": ("triton", 2**-12)}


def _fused(impl: str) -> bool:
    return impl in OURS and OURS[impl][0] != "naive"


def _loss_fn(impl: str, sizes, lams, block_v=None, block_n=None, sink=None):
    if impl in OURS:
        op, grad_filter = OURS[impl]
        kw = {"impl": op, "block_v": block_v}
        if op == "torch":
            kw["block_n"] = block_n
        if _fused(impl):
            kw.update(weight_grad_sink=sink, grad_filter=grad_filter)
        return lambda h, w, y: gce_loss(h, w, y, sizes, lams, **kw)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y)
    raise ValueError(impl)


def measure(impl, n, v, d, dtype, device, sizes, lams, repeat, block_v=None, block_n=None, seed=0, save_to=None, sink=False):
    torch.manual_seed(seed)
    h = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d, device=device) / d**0.5).to(dtype).requires_grad_(True)
    y = torch.randint(0, v, (n,), device=device)
    main_grad = torch.zeros(v, d, device=device) if sink and _fused(impl) else None
    fn = _loss_fn(impl, sizes, lams, block_v, block_n, main_grad)
    esize = torch.empty((), dtype=dtype).element_size()
    must_hold = 2 * (n * d + v * d) * esize  # inputs and their gradients (with a sink: its placeholder)

    def step():
        h.grad = w.grad = None
        if main_grad is not None:
            main_grad.zero_()
        loss = fn(h, w, y)
        loss.backward()
        return loss

    loss = step()  # warm-up (and Triton compilation)
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if save_to is not None:  # this implementation's result, for the error against naive's
        from safetensors.torch import save_file

        save_file(
            {
                "loss": loss.detach().float().reshape(1).cpu(),
                "dh": h.grad.float().cpu(),
                "dw": (w.grad if main_grad is None else main_grad).float().cpu(),
            },
            save_to,
        )
    h.grad = w.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() + (n * d + v * d) * esize
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes()
        reset_peak_rss()
        step()
        extra = peak_rss_bytes() - base - (n * d + v * d) * esize
    return {
        "impl": impl,
        "loss": float(loss.detach()),
        "time_s": statistics.median(times),
        "extra_bytes": max(extra, 0),
        "inputs_and_grads_bytes": must_hold,
    }


def _child(q, *args):
    try:
        q.put(measure(*args))
    except Exception as e:  # noqa: BLE001
        q.put({"impl": args[0], "error": f"{type(e).__name__}: {e}"})


def run_isolated(impl, n, v, d, dtype, device, *rest):
    """``measure(...)``: in this process on CUDA (the allocator's peak is per process; a fork
    cannot use CUDA), in a forked child on CPU (the peak resident set is per process)."""
    args = (impl, n, v, d, dtype, device, *rest)
    if device == "cuda":
        try:
            return measure(*args)
        except torch.cuda.OutOfMemoryError as e:
            return {"impl": impl, "error": f"out of memory: {str(e).splitlines()[0]}"}
        finally:
            torch.cuda.empty_cache()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, *args))
    p.start()
    while True:
        try:
            res = q.get(timeout=5)
            break
        except queue.Empty:  # a child killed before reporting (the OOM killer, at large sizes) never will
            if p.exitcode is not None and q.empty():
                res = {"impl": impl, "error": f"the measuring process died (exit code {p.exitcode})"}
                break
    p.join()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=65536)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--group-sizes", type=int, nargs="*", default=[8])
    ap.add_argument("--group-weights", type=float, nargs="*", default=[0.2])
    ap.add_argument(
        "--impls", nargs="+", default=None, help="ours to run (default: naive torch, +triton on CUDA; also triton-filter)"
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--block-v", type=int, default=None, help="vocabulary chunk of the fused implementations")
    ap.add_argument("--block-n", type=int, default=None, help="token chunk of the torch implementation")
    ap.add_argument("--peers", action="store_true", help="also plain CE, with Liger and CCE where importable")
    ap.add_argument(
        "--sink",
        action="store_true",
        help="ours add dW into an fp32 main_grad as under megatron's DDP (held beside the inputs)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    ours = args.impls or ["naive", "torch"] + (["triton"] if args.device == "cuda" else [])
    sections = [("gce", ours, args.group_sizes, args.group_weights)]
    if args.peers:
        peers = []
        for name, mod in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy")):
            try:
                __import__(mod)
                peers.append(name)
            except ImportError:
                print(f"{name}: not installed ({mod}), left out")
        sections.insert(0, ("plain CE", ours + peers, [], []))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for part, impls, sizes, lams in sections:
            for impl in impls:
                out = str(Path(tmp) / f"{part}-{impl}.safetensors")
                shape_args = (args.n, args.v, args.d, dtype, args.device)
                r = run_isolated(impl, *shape_args, sizes, lams, args.repeat, args.block_v, args.block_n, 0, out, args.sink)
                r["part"] = part
                r["_file"] = out
                rows.append(r)
        for part, *_ in sections:
            naive = next((r for r in rows if r["part"] == part and r["impl"] == "naive" and "error" not in r), None)
            ref = load_file(naive["_file"]) if naive else None
            for r in rows:
                if r["part"] != part or "error" in r or naive is None:
                    continue
                r["extra_vs_naive"] = r["extra_bytes"] / max(naive["extra_bytes"], 1)
                r["speed_vs_naive"] = naive["time_s"] / r["time_s"]
                got = load_file(r["_file"])
                r["max_err"] = max(
                    ((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)).item() for k in ("loss", "dh", "dw")
                )
    for r in rows:
        r.pop("_file", None)
    shape = {
        "n": args.n,
        "v": args.v,
        "d": args.d,
        "dtype": args.dtype,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "group_sizes": args.group_sizes,
        "group_weights": args.group_weights,
        "block_v": args.block_v,
        "block_n": args.block_n,
        "sink": args.sink,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if args.json:
        print(json.dumps({"shape": shape, "results": rows}, indent=2))
        return 0
    print(
        f"GCE fwd+bwd  N={args.n} V={args.v} d={args.d} {args.dtype} on {shape['device_name']} "
        f"groups={args.group_sizes} weights={args.group_weights} block_v={args.block_v or 'default'} "
        f"block_n={args.block_n or 'default'}"
    )
    print(f"{'part':<10}{'impl':<14}{'loss':>12}{'time (s)':>11}{'extra mem':>12}{'vs naive':>10}{'speedup':>9}{'max err':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['part']:<10}{r['impl']:<14}  {r['error']}")
            continue
        print(
            f"{r['part']:<10}{r['impl']:<14}{r['loss']:>12.5f}{r['time_s']:>11.3f}{r['extra_bytes'] / 2**20:>10.1f}MB"
            f"{r.get('extra_vs_naive', float('nan')):>10.1%}{r.get('speed_vs_naive', float('nan')):>8.2f}x"
            f"{r.get('max_err', float('nan')):>10.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
