#!/usr/bin/env python
"""Training throughput of a config, and where one step's time goes (megamdm/training/step_profile.py).

    python tools/bench_train.py --config configs/model/tiny.yaml data.shards=[data/toy.zarr]   # CPU, one process
    torchrun --nproc-per-node 8 tools/bench_train.py --config configs/pretrain_1024.yaml \\
        --set model.num_layers=8 --set train.steps=100 --warmup 3 --steps 3 [--json out.json]
    python tools/bench_train.py --config configs/pretrain_1024.yaml --synthetic 1024 \\
        --set model.num_layers=6 --variant "padded: data.trim_text=false" --variant "trimmed:"

Runs ``--warmup`` training steps, then ``--steps`` under torch.profiler, and prints one table: step
time, real tokens/s (prompt tokens without padding plus image tokens), model TFLOP/s per GPU and MFU
(training/flops.py, as the training log counts them), and the step split into body, core attention,
GCE head, optimizer and data wait. Nothing is saved (checkpoint.save_dir is ignored).

``--synthetic PX`` trains on random tokens at PX x PX pixels instead of the config's data: a random
tokenizer of the config's image vocabulary with ``--patch-size`` pixels per token, prompts of 8-60
random words (megamdm/data/synthetic.py). Each ``--variant "NAME: KEY=VALUE KEY=VALUE"`` runs the
same command once more in a process of its own with those overrides on top, and one table compares
them (one process each; under torchrun, run one variant per command).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    from megamdm.config import add_config_args, load_config, parse_config_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=2, help="steps before profiling")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--synthetic", type=int, metavar="PX", help="train on random tokens at PX x PX pixels")
    ap.add_argument("--patch-size", type=int, default=16, help="pixels per token side of --synthetic's tokenizer")
    ap.add_argument("--variant", action="append", default=[], metavar="'NAME: KEY=VALUE ...'", help="repeatable")
    add_config_args(ap)
    args, cfg = parse_config_args(ap, argv)
    overrides = list(args.overrides) + list(args.overrides_positional)
    if args.variant:
        return compare(args, overrides)
    with tempfile.TemporaryDirectory() as work:
        if args.synthetic:
            from megamdm.data.synthetic import synthetic_overrides

            n = synthetic_samples(cfg, args.warmup, args.steps)
            v, f = cfg.model.image_vocab_size, args.patch_size
            data = synthetic_overrides(Path(work), vocab=v, patch=f, size=args.synthetic, n=n)
            cfg = load_config(args.config, [f"{k}={val}" for k, val in data.items()] + overrides)
        res = bench(cfg, args.warmup, args.steps)
    if res is None:  # not the reporting rank
        return 0
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def synthetic_samples(cfg, warmup: int, steps: int) -> int:
    """Samples of the synthetic dataset: the run's global batches, and at least one whole window of
    ``data.group_by_length`` of them (with 2 batches, grouping by 16 regrouped windows of 2)."""
    batches = max(2, warmup + steps, cfg.data.group_by_length)
    return max(64, batches * cfg.data.global_batch_size)


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise SystemExit(f"error: --variant {text!r}: give 'NAME: KEY=VALUE ...' (the overrides may be empty)")
    return name.strip(), rest.split()


def compare(args, overrides: list[str]) -> int:
    """Each variant in a process of its own, then one table of them."""
    variants = [_variant(v) for v in args.variant]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(variants):
            out = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, __file__, "--warmup", str(args.warmup), "--steps", str(args.steps), "--json", str(out)]
            if args.config:
                cmd += ["--config", args.config]
            if args.synthetic:
                cmd += ["--synthetic", str(args.synthetic), "--patch-size", str(args.patch_size)]
            for kv in overrides + extra:
                cmd += ["--set", kv]
            print(f"== {name}: {' '.join(extra) or '(no overrides)'}", flush=True)
            if subprocess.run(cmd).returncode != 0:
                print(f"error: variant {name!r} failed", file=sys.stderr)
                return 1
            rows.append({"variant": name, "overrides": extra, **json.loads(out.read_text())})
    print(comparison(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


PARTS = (
    ("body", "body"),
    ("attention", "core attention"),
    ("gce_head", "GCE head"),
    ("optimizer", "optimizer"),
    ("data_wait", "data wait"),
)


def comparison(rows: list[dict]) -> str:
    head = f"{'variant':<20}{'step s':>9}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}" + "".join(f"{k[:9]:>11}" for k, _ in PARTS)
    lines = [head]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        parts = "".join(f"{r[k] / r['step_s']:>11.1%}" for k, _ in PARTS)
        lines.append(
            f"{r['variant']:<20}{r['step_s']:>9.3f}{r['tokens_per_s']:>12,.0f}{r['tflops_per_gpu']:>10.2f}{mfu:>8}{parts}"
        )
    return "\n".join(lines)


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
    for k, label in PARTS:
        lines.append(f"  {label:<26}{r[k]:>12.4f} s {r[k] / r['step_s']:>7.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
