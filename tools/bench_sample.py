#!/usr/bin/env python
"""Sampling speed and memory: seconds per image, peak memory, and the cost of token editing at an
equal number of steps, for one or more batch sizes.

    python tools/bench_sample.py                                   # tiny model, CPU
    python tools/bench_sample.py --model configs/model/nld_8b.yaml --size 1024 --dtype bf16   # on a GPU
    python tools/bench_sample.py --checkpoint ckpt/
    python tools/bench_sample.py --image-vocab 131072 --layers 2 --hidden 64 --patch-size 16 --size 256 --batch 1,8

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
from megamdm.data.synthetic import random_tokenizer
from megamdm.formats.single import Pretrained
from megamdm.gce import GCEGroups
from megamdm.memory import peak_rss_bytes, reset_peak_rss
from megamdm.models.standalone import MDMTransformer
from megamdm.sampling.pipeline import MDMSampler
from megamdm.text import load_text_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def random_pretrained(model_cfg_path: str, patch: int, device: str, dtype: torch.dtype, overrides=()) -> Pretrained:
    cfg = load_config(model_cfg_path, list(overrides))
    with torch.device(device):
        model = MDMTransformer(cfg.model).to(dtype)
    v = cfg.model.image_vocab_size
    tok = random_tokenizer(v, patch)
    groups = GCEGroups.identity(v, cfg.gce.group_sizes, cfg.gce.group_weights)
    return Pretrained(model, cfg, groups, tok, load_text_tokenizer("byte"), Path("."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"))
    ap.add_argument("--patch-size", type=int, default=4, help="tokenizer downsampling f for a random model")
    ap.add_argument("--image-vocab", type=int, default=None, help="override the model's image vocabulary")
    ap.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    ap.add_argument("--hidden", type=int, default=None, help="override the model's width (head dim 16)")
    ap.add_argument("--size", type=int, default=64, help="image height = width")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--batch", default="1", help="images per call; comma-separated for several")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--edit-threshold", type=float, default=0.9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on CUDA)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    batches = [int(b) for b in args.batch.split(",")]
    if args.checkpoint:
        sampler = MDMSampler.from_pretrained(args.checkpoint, device=args.device, dtype=dtype, compile=args.compile)
        label = args.checkpoint
    else:
        tdt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
        ov = []
        if args.image_vocab:
            ov.append(f"model.image_vocab_size={args.image_vocab}")
        if args.layers:
            ov.append(f"model.num_layers={args.layers}")
        if args.hidden:
            heads = load_config(args.model).model.num_attention_heads
            ov += [f"model.hidden_size={args.hidden}", f"model.head_dim={args.hidden // heads}"]
            ov.append(f"model.ffn_hidden_size={3 * args.hidden}")
        sampler = MDMSampler(
            random_pretrained(args.model, args.patch_size, args.device, tdt, ov),
            device=args.device,
            dtype=dtype,
            compile=args.compile,
        )
        label = f"random {Path(args.model).name}"
    rows = []
    for batch in batches:
        prompts = ["a red circle left of a blue square"] * batch
        for name, thr in (("no editing", 0.0), ("editing", args.edit_threshold)):
            kw = dict(
                height=args.size, width=args.size, steps=args.steps, cfg=args.cfg, edit_threshold=thr, seed=0, progress=False
            )
            sampler(prompts, batch_size=batch, **kw)  # warm-up (and compilation)
            times, edits = [], []
            reset_peak(args.device)
            for _ in range(args.repeat):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = sampler(prompts, batch_size=batch, **kw)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                edits.append(sum(map(sum, out.edits_per_step)) / (batch * args.steps))
            rows.append(
                {
                    "batch": batch,
                    "mode": name,
                    "s_per_image": statistics.median(times) / batch,
                    "edits_per_step": statistics.mean(edits),
                    "peak_mem_gb": peak_gb(args.device),
                }
            )
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["mode"] == "no editing")
        r["editing_overhead"] = r["s_per_image"] / base["s_per_image"] - 1
    result = {
        "model": label,
        "device": dev,
        "dtype": dtype,
        "size": args.size,
        "steps": args.steps,
        "cfg": args.cfg,
        "results": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{label} on {dev}, {dtype}, {args.size}px, {args.steps} steps, cfg {args.cfg}")
    peak_kind = "CUDA max allocated" if args.device.startswith("cuda") else "process peak RSS"
    print(f"| batch | mode | s/image | edits/step | editing overhead | peak memory ({peak_kind}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['mode']} | {r['s_per_image']:.3f} | {r['edits_per_step']:.1f} "
            f"| {r['editing_overhead']:+.1%} | {r['peak_mem_gb']:.2f} GB |"
        )
    return 0


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def peak_gb(device: str) -> float:
    return (torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()) / 2**30


if __name__ == "__main__":
    sys.exit(main())
