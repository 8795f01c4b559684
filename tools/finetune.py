#!/usr/bin/env python
"""Fine-tune a single-GPU-format checkpoint on token shards with DeepSpeed ZeRO.

    deepspeed --num_gpus 8 tools/finetune.py --checkpoint release/ --out ft/ \\
        --deepspeed configs/deepspeed/zero2.json data.shards=[data/mine.zarr] data.global_batch_size=256
    torchrun --nproc-per-node 8 tools/finetune.py --checkpoint release/ --out ft/ --lora-rank 16 ...
    python tools/finetune.py ...                         # one process

The data, diffusion and GCE sections come from --config / key=value overrides (as for training);
the model, text and tokenizers come from the checkpoint. The result, LoRA merged, is written to
OUT/single in the single-GPU format (with LoRA, the adapters alone also go to OUT/lora_adapter.safetensors);
DeepSpeed checkpoints go to OUT/deepspeed and a rerun resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from megamdm.config import add_config_args, parse_config_args
    from megamdm.finetune import FinetuneOptions, finetune

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="single-GPU-format directory to start from")
    ap.add_argument("--out", required=True)
    ap.add_argument("--deepspeed", default="configs/deepspeed/zero2.json", help="DeepSpeed JSON (ZeRO stage, buckets)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--min-lr", type=float, default=1e-6)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--offload-optimizer", action="store_true", help="keep optimizer state in CPU memory")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute each block's activations in backward: memory for ~30%% more compute")
    ap.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--save-interval", type=int, default=500)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_config_args(ap)
    args, cfg = parse_config_args(ap, argv)
    if args.local_rank is not None:
        import os

        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    opts = FinetuneOptions(deepspeed_config=args.deepspeed, out=args.out, steps=args.steps, lr=args.lr,
                           min_lr=args.min_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                           precision=args.precision, offload_optimizer=args.offload_optimizer,
                           gradient_checkpointing=args.gradient_checkpointing,
                           lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, save_interval=args.save_interval,
                           log_interval=args.log_interval, export=not args.no_export)
    finetune(args.checkpoint, cfg, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
