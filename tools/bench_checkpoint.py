#!/usr/bin/env python
"""Host memory and time of one training-checkpoint save, per rank, for each optimizer format.

    python tools/bench_checkpoint.py                 # DP 2 on CPU: the tests' tiny model and a 0.2B one
    python tools/bench_checkpoint.py --sizes tiny --dp 4

Each data-parallel rank (forked, gloo) builds the model with megatron-core's distributed optimizer
(Adam moments allocated), then saves through megamdm's ``Checkpointer`` once per format:
``dp_reshardable`` (periodic saves) and ``fully_reshardable`` (``checkpoint.reshardable``). The peak
resident memory a save adds to the rank (Linux ``VmHWM``, reset before each save) is printed beside
what the format has to hold: 12 bytes (fp32 parameter + two Adam moments) per parameter of the
rank's DP shard for ``dp_reshardable``, of the whole TP/PP shard on DP rank 0 for ``fully_reshardable``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # name: (layers, hidden, ffn, heads, kv heads, image vocab); tiny is tests/test_train.py's model
    "tiny": (2, 64, 128, 4, 2, 64),
    "0.2B": (8, 1024, 4096, 8, 4, 16384),
}


class _Position:
    """The data-loader position a checkpoint records (a bench has no data)."""

    def state_dict(self) -> dict:
        return {"step": 0}


def _rank(rank: int, world: int, port: int, size: str, out: str, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from megamdm.compat.dist_ckpt import writer_queue
    from megamdm.compat.megatron_cpu import megatron_on_cpu
    from megamdm.compat.quiet import library_notices_hidden
    from megamdm.config import Config, ModelConfig, ParallelConfig, TrainConfig
    from megamdm.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from megamdm.models.mcore.model import build_model
    from megamdm.objective import LossSpec
    from megamdm.training import parallel
    from megamdm.training.checkpoint import Checkpointer
    from megamdm.training.optim import build_optimizer, init_torch_adam_state, wrap_model

    layers, d, ffn, heads, groups, vocab = SIZES[size]
    cfg = Config(
        model=ModelConfig(
            num_layers=layers,
            hidden_size=d,
            ffn_hidden_size=ffn,
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=d // heads,
            image_vocab_size=vocab,
        ),
        train=TrainConfig(precision="fp32"),
        parallel=ParallelConfig(use_distributed_optimizer=True),
    )
    with library_notices_hidden(), megatron_on_cpu(), writer_queue():
        dist.init_process_group("gloo", rank=rank, world_size=world)
        parallel.init_model_parallel(1, 1)
        parallel.seed_model_parallel(0, "cpu")
        model = build_model(cfg, LossSpec([8], [0.2]), device="cpu", use_te=False)
        ddp = wrap_model(model, model.config, cfg.parallel, "cpu")
        opt, sched = build_optimizer(ddp, model.config, cfg.optim, cfg.parallel, 10)
        init_torch_adam_state(opt)  # the moments, as after a first step
        n_params = sum(p.numel() for p in model.parameters())
        rows = []
        for mode, reshardable in (("dp_reshardable", "dp"), ("fully_reshardable", "always")):
            ck = Checkpointer(Path(out) / mode, keep_last=1, reshardable=reshardable)
            dist.barrier()
            reset_peak_rss()
            before = rss_bytes()
            t0 = time.perf_counter()
            ck.save(1, ddp.module, opt, sched, _Position(), "model: {}\n")
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "size": size,
                    "format": mode,
                    "rank": rank,
                    "params": n_params,
                    "peak_added_mb": (peak_rss_bytes() - before) / 2**20,
                    "save_s": seconds,
                    "format_holds_mb": 12 * n_params / (world if mode == "dp_reshardable" else 1) / 2**20
                    if mode == "dp_reshardable" or rank == 0
                    else 0.0,
                }
            )
            ck.close()
    queue.put(rows)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, default=2, help="data-parallel ranks (forked processes)")
    ap.add_argument("--sizes", default="tiny,0.2B", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        print(f"error: unknown size {bad[0]!r}; allowed: {', '.join(SIZES)}", file=sys.stderr)
        return 2
    ctx = mp.get_context("fork")
    rows = []
    for size in sizes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as out:
            procs = [ctx.Process(target=_rank, args=(r, args.dp, port, size, out, queue)) for r in range(args.dp)]
            for p in procs:
                p.start()
            for _ in procs:
                rows += queue.get(timeout=1800)
            for p in procs:
                p.join()
                if p.exitcode:
                    print(f"error: a rank exited with {p.exitcode}", file=sys.stderr)
                    return 1
    rows.sort(key=lambda r: (sizes.index(r["size"]), r["format"], r["rank"]))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| model | parameters | optimizer format | DP rank | peak RSS added by the save | the format holds | save s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['params'] / 1e6:.2f}M | {r['format']} | {r['rank']} | {r['peak_added_mb']:.1f} MB "
            f"| {r['format_holds_mb']:.1f} MB | {r['save_s']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
