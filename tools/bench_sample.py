#!/usr/bin/env python
"""Sampling speed: seconds per image, and the cost of token editing at an equal number of steps.

    python tools/bench_sample.py                                   # tiny model, CPU
    python tools/bench_sample.py --model configs/model/nld_8b.yaml --size 1024 --dtype bf16   # on a GPU
    python tools/bench_sample.py --checkpoint ckpt/

Without --checkpoint the model is randomly initialised from --model (speed does not depend on
the weights) with a random k-means codebook of the model's vocabulary and --patch-size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from megamdm.config import load_config
from megamdm.gce import GCEGroups
from megamdm.models.standalone import MDMTransformer
from megamdm.pretrained import Pretrained
from megamdm.sampling import MDMSampler
from megamdm.text import load_text_tokenizer
from megamdm.vq import KMeansPatchTokenizer

ROOT = Path(__file__).resolve().parents[1]


def random_pretrained(model_cfg_path: str, patch: int, device: str, dtype: torch.dtype) -> Pretrained:
    cfg = load_config(model_cfg_path)
    with torch.device(device):
        model = MDMTransformer(cfg.model).to(dtype)
    v = cfg.model.image_vocab_size
    tok = KMeansPatchTokenizer(torch.rand(v, 3 * patch * patch), patch)
    groups = GCEGroups.identity(v, cfg.gce.group_sizes, cfg.gce.group_weights)
    return Pretrained(model, cfg, groups, tok, load_text_tokenizer("byte"), Path("."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"))
    ap.add_argument("--patch-size", type=int, default=4, help="tokenizer downsampling f for a random model")
    ap.add_argument("--size", type=int, default=64, help="image height = width")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=1, help="images per call")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--edit-threshold", type=float, default=0.9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on CUDA)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.checkpoint:
        sampler = MDMSampler.from_pretrained(args.checkpoint, device=args.device, dtype=dtype, compile=args.compile)
        label = args.checkpoint
    else:
        tdt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
        sampler = MDMSampler(
            random_pretrained(args.model, args.patch_size, args.device, tdt),
            device=args.device,
            dtype=dtype,
            compile=args.compile,
        )
        label = f"random {Path(args.model).name}"
    prompts = ["a red circle left of a blue square"] * args.batch
    rows = {}
    for name, thr in (("no editing", 0.0), ("editing", args.edit_threshold)):
        kw = dict(height=args.size, width=args.size, steps=args.steps, cfg=args.cfg, edit_threshold=thr, seed=0, progress=False)
        sampler(prompts, **kw)  # warm-up (and compilation)
        times, edits = [], []
        for _ in range(args.repeat):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = sampler(prompts, **kw)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            edits.append(sum(map(sum, out.edits_per_step)) / (args.batch * args.steps))
        rows[name] = {"s_per_image": statistics.median(times) / args.batch, "edits_per_step": statistics.mean(edits)}
    overhead = rows["editing"]["s_per_image"] / rows["no editing"]["s_per_image"] - 1
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {
        "model": label,
        "device": dev,
        "dtype": dtype,
        "size": args.size,
        "steps": args.steps,
        "cfg": args.cfg,
        "batch": args.batch,
        "results": rows,
        "editing_overhead": overhead,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{label} on {dev}, {dtype}, {args.size}px, {args.steps} steps, cfg {args.cfg}, batch {args.batch}")
    print(f"{'mode':<12}{'s/image':>10}{'edits/step':>12}")
    for name, r in rows.items():
        print(f"{name:<12}{r['s_per_image']:>10.3f}{r['edits_per_step']:>12.1f}")
    print(f"editing overhead at equal steps: {overhead:+.1%} (target <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
