#!/usr/bin/env python
"""How much of a pretraining step is prompt padding, and what trimming each step's prompts saves.

    python tools/bench_prompt_padding.py                       # the three pretraining stages
    python tools/bench_prompt_padding.py --configs configs/pretrain_256.yaml --steps 50

For each stage config, one data-parallel rank's micro-batches of ``--steps`` steps are built with
prompt lengths drawn uniformly from ``--min-len``..``--max-len`` tokens (caption plus
micro-conditioning; 10-80 tokens by default) and the stage's prompt dropout, then cut by the
loader's own ``trim_text``. It prints positions and model FLOPs per step padded to
``text.max_len`` (``data.trim_text: false``), and trimmed with dropped prompts of ``text.max_len``
MASKs (``text.drop_len: 0``, megamdm 0.2's), of their own length (``-1``, the 8B recipe's and
NL-Diffusion-Image's) and of ``--drop-len`` MASKs; with ``data.group_by_length`` (dropped prompts
of their own length); and the floor: each sample's real tokens alone (dropped prompts of their own
length), what packing the micro-batch into one sequence would process.
Nothing is trained: the numbers are counts, so any machine gives the same table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKED = "packed (the floor)"  # the real tokens alone, as THD packing would run them (not built)


def step_micro_batches(cfg, lengths, dropped, drop_len, grid):
    from megamdm.data.loader import MicroBatch
    from megamdm.diffusion import Corrupted

    full, mbs = cfg.text.max_len, cfg.data.micro_batch_size
    out = []
    for s in range(0, len(lengths), mbs):
        n = torch.tensor(lengths[s : s + mbs])
        drop = torch.tensor(dropped[s : s + mbs])
        if drop_len != -1:  # -1: a dropped prompt keeps its own length
            n = torch.where(drop, torch.full_like(n, drop_len or full), n)
        pad = torch.arange(full)[None, :] >= n[:, None]
        b = len(n)
        z = torch.zeros(b, *grid, dtype=torch.long)
        c = Corrupted(torch.zeros(b, full, dtype=torch.long), pad, z, z, z.float(), z.bool(), z.bool(), torch.zeros(b))
        out.append(MicroBatch(c, "x", torch.zeros(b, 2)))
    return out


def data_parallel_size(cfg_path: Path, cfg) -> int:
    """GPUs of the stage's SLURM script (launch/<config name>.sh) over TP x PP; 1 without one."""
    import re

    script = ROOT / "launch" / f"{cfg_path.stem}.sh"
    if not script.is_file():
        return 1
    text = script.read_text()
    nodes = int(re.search(r"--nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"--gpus-per-node=(\d+)", text).group(1))
    return max(1, nodes * gpus // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel))


def measure(cfg_path: Path, steps: int, lo: int, hi: int, drop_len: int, seed: int, group: int = 0) -> dict:
    from megamdm.config import load_config
    from megamdm.data.loader import trim_text
    from megamdm.training.flops import train_flops

    cfg = load_config(cfg_path)
    res = cfg.sample.height  # the stage's resolution
    grid = (res // 16, res // 16)  # f16 tokenizer
    m = grid[0] * grid[1] // 4
    dp = data_parallel_size(cfg_path, cfg)
    per_rank = max(cfg.data.micro_batch_size, cfg.data.global_batch_size // dp)  # one rank's step
    g = torch.Generator().manual_seed(seed)
    layouts = [("padded", 0, False), ("trimmed, drop_len 0", 0, True), ("trimmed, own length", -1, True)]
    layouts.append((f"trimmed, drop_len {drop_len}", drop_len, True))
    rows = {name: [0, 0.0] for name, _, _ in layouts} | {PACKED: [0, 0.0]}
    seq_multiple = cfg.parallel.tensor_parallel if cfg.parallel.sequence_parallel else 1

    def count(name, micro, trim=True):  # positions and FLOPs of one rank-step's micro-batches
        for mb in trim_text(micro, seq_multiple=seq_multiple) if trim else micro:
            b, text_len = mb.corrupted.text_ids.shape
            rows[name][0] += b * (text_len + m)
            rows[name][1] += b * train_flops(cfg.model, text_len, *grid, 0.0)

    for _ in range(steps):
        lengths = torch.randint(lo, hi + 1, (per_rank,), generator=g).clamp(max=cfg.text.max_len).tolist()
        dropped = (torch.rand(per_rank, generator=g) < cfg.diffusion.prompt_drop).tolist()
        for name, dl, trim in layouts:
            count(name, step_micro_batches(cfg, lengths, dropped, dl, grid), trim)
        for n in lengths:  # every sample its own length, dropped ones too: what packing would process
            rows[PACKED][0] += n + m
            rows[PACKED][1] += train_flops(cfg.model, n, *grid, 0.0)
    if group:  # windows of `group` global batches sorted by length, cut, each batch in shuffled order
        gb = cfg.data.global_batch_size
        name = f"trimmed, own length, grouped by {group}"
        rows[name] = [0, 0.0]
        for w in range(-(-steps // group)):
            lengths = torch.randint(lo, hi + 1, (group * gb,), generator=g).clamp(max=cfg.text.max_len).sort().values
            for b in torch.randperm(group, generator=g)[: steps - w * group].tolist():  # batches in epoch order
                batch = lengths[b * gb : (b + 1) * gb]
                rank = batch[torch.randperm(gb, generator=g)[:per_rank]].tolist()  # rank 0's slice
                count(name, step_micro_batches(cfg, rank, [False] * per_rank, -1, grid))
    base = rows["padded"]
    return {
        "config": cfg_path.name,
        "samples_per_rank_step": per_rank,
        "resolution": res,
        "image_positions": m,
        "max_len": cfg.text.max_len,
        "rows": {
            k: {
                "positions_per_step": v[0] / steps,
                "flops_per_step": v[1] / steps,
                "positions_ratio": v[0] / base[0],
                "flops_ratio": v[1] / base[1],
            }
            for k, v in rows.items()
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=[f"configs/pretrain_{r}.yaml" for r in (256, 512, 1024)])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--min-len", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=80)
    ap.add_argument("--drop-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-by-length", type=int, default=16, help="data.group_by_length of the grouped row (0: no row)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    results = [measure(ROOT / c, a.steps, a.min_len, a.max_len, a.drop_len, a.seed, a.group_by_length) for c in a.configs]
    print(f"prompt lengths uniform in {a.min_len}..{a.max_len} tokens, {a.steps} steps of one rank per stage")
    print(", ".join(f"{r['config']}: {r['samples_per_rank_step']} samples per rank-step" for r in results))
    print(f"{'stage':<22}{'layout':<40}{'positions/step':>16}{'ratio':>8}{'TFLOP/step':>12}{'ratio':>8}")
    for r in results:
        for name, row in r["rows"].items():
            print(
                f"{r['config']:<22}{name:<40}{row['positions_per_step']:>16,.0f}{row['positions_ratio']:>8.3f}"
                f"{row['flops_per_step'] / 1e12:>12.1f}{row['flops_ratio']:>8.3f}"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
