#!/usr/bin/env python
"""Fine-tune a single-GPU-format checkpoint on token shards with DeepSpeed ZeRO.

    deepspeed --num_gpus 8 tools/finetune.py --checkpoint release/ --out ft/ \\
        --deepspeed configs/deepspeed/zero2.json data.shards=[data/mine.zarr] data.global_batch_size=256
    torchrun --nproc-per-node 8 tools/finetune.py --checkpoint release/ --out ft/ --lora-rank 16 ...
    megamdm-finetune ...                         # one process

The data, diffusion and GCE sections come from --config / key=value overrides (as for training);
the model, text and tokenizers come from the checkpoint. The result, LoRA merged, is written to
OUT/single in the single-GPU format (with LoRA, the adapters alone also go to OUT/lora_adapter.safetensors);
DeepSpeed checkpoints go to OUT/deepspeed and a rerun resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv=None) -> int:
    from megamdm.config import FinetuneConfig, add_config_args, parse_config_args
    from megamdm.finetune import finetune

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="single-GPU-format directory to start from")
    ap.add_argument("--out", required=True)
    ap.add_argument("--deepspeed", dest="deepspeed_config", help="DeepSpeed JSON (ZeRO stage, buckets)")
    for flag, kind in (
        ("--steps", int),
        ("--lr", float),
        ("--min-lr", float),
        ("--warmup-steps", int),
        ("--weight-decay", float),
        ("--lora-rank", int),
        ("--lora-alpha", float),
        ("--save-interval", int),
        ("--log-interval", int),
        ("--ema-decay", float),
    ):
        ap.add_argument(flag, type=kind)
    ap.add_argument("--precision", choices=["bf16", "fp32"])
    ap.add_argument("--offload-optimizer", action="store_true", default=None, help="keep optimizer state in CPU memory")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        help="recompute each block's activations in backward: memory for ~30%% more compute",
    )
    ap.add_argument("--no-export", dest="export", action="store_false", default=None)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_config_args(ap)
    args, cfg = parse_config_args(ap, argv)
    if args.local_rank is not None:
        import os

        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    # flags override the config's finetune section (defaults: megamdm.config.FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        if getattr(args, f.name, None) is not None:
            setattr(cfg.finetune, f.name, getattr(args, f.name))
    finetune(args.checkpoint, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
