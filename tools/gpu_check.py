#!/usr/bin/env python
"""The cluster path's GPU check, in one call: under 8 minutes on one H100/H200, results as JSON.

    python tools/gpu_check.py --out "$OUT"                 # on a GPU machine
    python tools/gpu_check.py --smoke --out /tmp/check     # on CPU: the same steps at toy sizes

1. ``pytest -m gpu`` (the tests that need CUDA; not with ``--smoke``).
2. The real training loop (``Trainer``) at 1024 px with the 8B shapes cut to ``--layers`` layers, on
   synthetic 64x64 token shards: steady-state samples/s, tokens/s, TFLOP/s, MFU and peak memory
   (the steps after ``--warmup``).
3. The in-training sampler (``training/samples.py``) at 1024 px on 4 prompts with guidance, 20
   steps: seconds and peak memory, beside the 17.2 GB that the fp32 logits alone took before
   guidance moved to the head input and logits to chunks of positions.

Writes ``<out>/gpu_check.json`` and prints a table. Transformer Engine and apex are used where they
import (the JSON says which); without them the layers are megatron-core's local ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_tests(out: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'gpu_tests.xml'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    tail = (r.stdout + r.stderr).strip().splitlines()
    return {"returncode": r.returncode, "summary": tail[-1] if tail else "", "seconds": time.perf_counter() - t0}


def train_and_sample(args, work: Path) -> dict:
    from megamdm.config import load_config
    from megamdm.data.synthetic import synthetic_overrides
    from megamdm.memory import reset_peak_rss, rss_bytes
    from megamdm.training.metrics import MetricsWindow, peak_memory_gb
    from megamdm.training.samples import sample_images
    from megamdm.training.trainer import Trainer

    if args.smoke:
        base, grid, vocab, f = ROOT / "configs/model/tiny.yaml", 8, 1024, 4
        ov = {"model.num_layers": 2, "data.micro_batch_size": 2, "data.global_batch_size": 4, "train.device": "cpu"}
    else:
        base, grid, vocab, f = ROOT / "configs/pretrain_1024.yaml", 64, 131072, 16
        ov = {
            "model.num_layers": args.layers,
            "data.micro_batch_size": args.micro_batch,
            "data.global_batch_size": args.micro_batch * args.micro_batches,
            "train.device": "cuda",
            "parallel.tensor_parallel": 1,
            "parallel.sequence_parallel": False,
        }
    ov.update(synthetic_overrides(work, vocab=vocab, patch=f, size=grid * f, n=max(64, 4 * int(ov["data.global_batch_size"]))))
    ov.update(
        {
            "data.num_workers": 0 if args.smoke else 2,
            "logging.sample_interval": 0,
            "train.steps": args.warmup + args.steps,
            "sample.height": grid * f,
            "sample.width": grid * f,
            "sample.steps": args.sample_steps,
        }
    )
    cfg = load_config(base, [f"{k}={v}" for k, v in ov.items()])
    res: dict = {}
    with Trainer(cfg) as t:
        res["layers"] = "transformer_engine" if t.use_te else "megatron-core local"
        res["precision"] = t.cfg.train.precision
        res["parameters"] = sum(p.numel() for p in t.model.parameters())
        window = None
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                if t.device == "cuda":
                    torch.cuda.synchronize()
                window = MetricsWindow()
            r = t.train_step()
            if window is not None:
                window.add(r, t.cfg.data.global_batch_size, r.flops(t.cfg.model))
        if t.device == "cuda":
            torch.cuda.synchronize()
        res["train"] = window.summary(world=t.world, peak=t.peak)
        prompts = ["a red apple on a wooden table", "a corgi on a beach", "two cats on a sofa", "a city at night"]
        # the sampler's own memory: its peak over what training leaves resident (weights, gradients and
        # the optimizer state stay allocated here, and would otherwise count as the sampler's)
        if t.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated() / 2**30
        else:
            reset_peak_rss()
            resident = rss_bytes() / 2**30
        before = peak_memory_gb()
        t0 = time.perf_counter()
        images = sample_images(
            t.ddp, t.cfg, t.groups, t.text_tok, t.image_tok, prompts, device=t.device, grid=(grid, grid), seed=0
        )
        if t.device == "cuda":
            torch.cuda.synchronize()
        old_logits_gb = 2 * len(prompts) * grid * grid * vocab * 4 / 2**30
        res["sample"] = {
            "images": len(images),
            "size": images[0].size[0],
            "steps": t.cfg.sample.steps,
            "cfg": t.cfg.sample.cfg,
            "seconds": time.perf_counter() - t0,
            "peak_mem_gb": peak_memory_gb(),
            "peak_mem_before_gb": before,
            "resident_gb": resident,
            "sampler_extra_gb": peak_memory_gb() - resident,
            "old_path_logits_gb": old_logits_gb,
        }
        images[0].save(Path(args.out) / "sample0.png")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU: checks that the script runs")
    ap.add_argument("--layers", type=int, default=6, help="layers of the 8B shapes (6 fit one H200 with room to spare)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sample-steps", type=int, default=20)
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke to check the script on CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    for mod in ("megatron.core", "transformer_engine", "apex", "triton"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            env[mod] = getattr(m, "__version__", "present")
        except ImportError:
            env[mod] = None
    report: dict = {"env": env}
    if not args.smoke:
        report["gpu_tests"] = gpu_tests(out)
    from megamdm.compat.quiet import library_notices_hidden

    with tempfile.TemporaryDirectory() as work, library_notices_hidden():
        report.update(train_and_sample(args, Path(work)))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    tr, sm = report["train"], report["sample"]
    mfu = "n/a" if tr["mfu"] is None else f"{tr['mfu']:.1%}"
    rows = [
        ("device", env.get("device", "cpu")),
        ("TE / apex / megatron-core", f"{env['transformer_engine']} / {env['apex']} / {env['megatron.core']}"),
        ("gpu tests", report.get("gpu_tests", {}).get("summary", "not run (--smoke)")),
        ("layers, precision, parameters", f"{report['layers']}, {report['precision']}, {report['parameters'] / 1e6:,.1f} M"),
        ("train samples/s, tokens/s", f"{tr['samples_per_s']:.2f}, {tr['tokens_per_s']:,.0f}"),
        ("train TFLOP/s per GPU, MFU", f"{tr['tflops_per_gpu']:.1f}, {mfu}"),
        ("train step s, peak memory", f"{tr['step_time_s']:.3f} s, {tr['peak_mem_gb']:.1f} GB"),
        (
            f"sampler {sm['images']} x {sm['size']} px, {sm['steps']} steps, CFG {sm['cfg']}",
            f"{sm['seconds']:.1f} s, {sm['sampler_extra_gb']:.2f} GB over the {sm['resident_gb']:.1f} GB training "
            f"leaves resident (old path's logits alone: {sm['old_path_logits_gb']:.1f} GB)",
        ),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
