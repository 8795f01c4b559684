#!/usr/bin/env python
"""Training throughput of a config, and where one step's time goes (megamdm/training/step_profile.py).

    python tools/bench_train.py --config configs/model/tiny.yaml data.shards=[data/toy.zarr]   # CPU, one process
    torchrun --nproc-per-node 8 tools/bench_train.py --config configs/pretrain_1024.yaml \\
        --set model.num_layers=8 --set train.steps=100 --warmup 3 --steps 3 [--json out.json]

Runs ``--warmup`` training steps, then ``--steps`` under torch.profiler, and prints one table: step
time, real tokens/s (prompt tokens without padding plus image tokens), model TFLOP/s per GPU and MFU
(training/flops.py, as the training log counts them), and the step split into body, core attention,
GCE head, optimizer and data wait. Nothing is saved (checkpoint.save_dir is ignored).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from megamdm.config import add_config_args, parse_config_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=2, help="steps before profiling")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps")
    ap.add_argument("--json", help="also write the figures to this file")
    add_config_args(ap)
    args, cfg = parse_config_args(ap, argv)
    res = bench(cfg, args.warmup, args.steps)
    if res is None:  # not the reporting rank
        return 0
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def bench(cfg, warmup: int, steps: int) -> dict | None:
    """``warmup`` + ``steps`` steps of ``cfg``; the figures on the last rank, None elsewhere."""
    from megamdm.compat.quiet import library_notices_hidden
    from megamdm.training.parallel import teardown
    from megamdm.training.step_profile import profile_steps
    from megamdm.training.trainer import Trainer

    cfg.checkpoint.save_dir, cfg.checkpoint.resume = None, "none"
    cfg.train.steps = max(cfg.train.steps, warmup + steps)
    cfg.logging.sample_interval = 0
    with library_notices_hidden():
        try:
            with Trainer(cfg) as tr:
                for _ in range(warmup):
                    tr.train_step()
                res = profile_steps(tr, steps)
                res.update(
                    device=tr.device,
                    precision=tr.cfg.train.precision,
                    layout=f"TP {cfg.parallel.tensor_parallel} PP {cfg.parallel.pipeline_parallel} world {tr.world}",
                )
                last = tr.rank == tr.world - 1
        finally:
            teardown()
    return res if last else None


def table(r: dict) -> str:
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a (no peak for this device)"
    lines = [
        f"megamdm training step: {r['layout']}, {r['device']}, {r['precision']}, {r['samples']:.0f} samples/step",
        f"{'step time':<28}{r['step_s']:>12.3f} s",
        f"{'tokens/s (real)':<28}{r['tokens_per_s']:>12,.0f}   ({r['real_tokens']:,.0f} per step: prompts unpadded + image)",
        f"{'model TFLOP/s per GPU':<28}{r['tflops_per_gpu']:>12.4f}   ({r['flops'] / 1e12:.4f} TFLOP per step)",
        f"{'MFU':<28}{mfu:>12}",
        "breakdown of one step:",
    ]
    for k, label in (
        ("body", "body"),
        ("attention", "core attention"),
        ("gce_head", "GCE head"),
        ("optimizer", "optimizer"),
        ("data_wait", "data wait"),
    ):
        lines.append(f"  {label:<26}{r[k]:>12.4f} s {r[k] / r['step_s']:>7.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
