#!/usr/bin/env python
"""Training-loader throughput against what training consumes.

    python tools/bench_loader.py --config configs/demo.yaml
    python tools/bench_loader.py --config configs/pretrain_1024.yaml --gpus-per-loader 1 --mfu 0.5

Reports samples/s of one data-parallel rank's loader (reading, text tokenisation, GCE permutation,
corruption, in --workers background processes) and compares it with the samples/s one GPU consumes
when training the configured model at --mfu of --peak-tflops (model FLOPs as in docs/training.md).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    from megamdm.config import add_config_args, parse_config_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=None, help="default: data.num_workers")
    ap.add_argument("--dp-size", type=int, default=1, help="data-parallel ranks sharing the global batch")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU (H100 bf16 dense: 989)")
    ap.add_argument("--mfu", type=float, default=0.5)
    args, cfg = parse_config_args(ap, argv)
    if args.workers is not None:
        cfg.data.num_workers = args.workers

    from megamdm.data.loader import TrainLoader
    from megamdm.data.shards import parse_res
    from megamdm.gce import GCEGroups
    from megamdm.text import load_text_tokenizer
    from megamdm.training.flops import flops_per_sample

    groups = (
        GCEGroups.load(cfg.gce.groups_file)
        if cfg.gce.groups_file
        else GCEGroups.identity(cfg.model.image_vocab_size, cfg.gce.group_sizes, cfg.gce.group_weights)
    )
    loader = TrainLoader(
        cfg, groups, load_text_tokenizer(cfg.text.tokenizer, cfg.text.mask_token), dp_rank=0, dp_size=args.dp_size
    )
    per_step = cfg.data.global_batch_size // args.dp_size
    t0 = time.perf_counter()
    first = next(loader)
    t1 = time.perf_counter()
    res = first[0].resolution
    for _ in range(args.steps):
        next(loader)
    dt = time.perf_counter() - t1
    rate = args.steps * per_step / dt
    h, w = parse_res(res)
    if not cfg.image_tokenizer.path:
        print("error: image_tokenizer.path is not set in the config", file=sys.stderr)
        return 2
    from megamdm.vq import load_image_tokenizer, tokenizer_kind

    down = load_image_tokenizer(tokenizer_kind(cfg.image_tokenizer.path), cfg.image_tokenizer.path).downsample
    fl = flops_per_sample(cfg.model, cfg.text.max_len, h // down, w // down, supervised_fraction=0.6)
    need = args.peak_tflops * 1e12 * args.mfu / fl
    print(
        f"loader: {rate:,.0f} samples/s per rank ({cfg.data.num_workers} workers, {per_step} samples/step, "
        f"bucket {res}, first batch after {t1 - t0:.1f}s)"
    )
    print(
        f"training consumes: {need:,.1f} samples/s per GPU ({fl / 1e12:.2f} TFLOP/sample at "
        f"{args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s)"
    )
    print(f"headroom: {rate / need:,.1f}x" + ("" if rate >= need else "  << the loader would stall training"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
