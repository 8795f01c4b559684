#!/usr/bin/env python
"""Fine-tune a single-GPU-format checkpoint on token shards with DeepSpeed ZeRO.

    deepspeed --num_gpus 8 tools/finetune.py --checkpoint release/ --out ft/ \\
        --deepspeed-config configs/deepspeed/zero2.json data.shards=[data/mine.zarr] data.global_batch_size=256
    torchrun --nproc-per-node 8 tools/finetune.py --checkpoint release/ --out ft/ --lora-rank 16 ...
    megamdm-finetune ...                         # one process

The data, diffusion and GCE sections come from --config / key=value overrides (as for training);
the model, text and tokenizers come from the checkpoint. Steps, learning rate, precision, EMA,
checkpoints and logging are the train / optim / checkpoint / logging sections pretraining uses, with
fine-tuning's defaults (megamdm.finetune.DEFAULTS); every flag below is one of those settings. The
result, LoRA merged, is written to OUT/single in the single-GPU format (with LoRA, the adapters alone
also go to OUT/lora_adapter.safetensors); DeepSpeed checkpoints go to OUT/deepspeed and a rerun resumes.
"""

from __future__ import annotations

import argparse
import os
import sys

from megamdm.config import (
    CheckpointConfig,
    FinetuneConfig,
    LoggingConfig,
    OptimConfig,
    TrainConfig,
    add_config_args,
    parse_config_args,
)
from megamdm.errors import MegamdmError
from megamdm.finetune import DEFAULTS, finetune
from megamdm.options import ArgumentParser, add_flags

# the settings of the shared sections that fine-tuning reads, as flags (the rest: --set section.key=value)
SHARED = (
    (TrainConfig, "train", ("steps", "precision", "seed", "ema_decay", "ema_warmup")),
    (OptimConfig, "optim", ("lr", "min_lr", "warmup_steps", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2")),
    (CheckpointConfig, "checkpoint", ("save_interval", "keep_last", "resume")),
    (LoggingConfig, "logging", ("log_interval", "wandb_mode", "wandb_project", "wandb_name")),
)


def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="single-GPU-format directory to start from")
    ap.add_argument(
        "--out", dest="checkpoint.save_dir", default=argparse.SUPPRESS, help="checkpoint.save_dir: checkpoints and the export"
    )
    add_flags(ap.add_argument_group("fine-tuning (finetune.*)"), FinetuneConfig, section="finetune")
    for cls, section, names in SHARED:
        group = ap.add_argument_group(f"shared with pretraining ({section}.*; fine-tuning's defaults shown)")
        own = {k.split(".", 1)[1]: v for k, v in DEFAULTS.items() if k.startswith(section + ".")}
        add_flags(group, cls, section=section, names=names, defaults=own)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_config_args(ap)
    return ap


def parse(argv=None):
    """The command line and the config it gives: fine-tuning's defaults, the file, --set, then the flags."""
    sections = [(FinetuneConfig, "finetune")] + [(c, s) for c, s, _ in SHARED]  # --out: the checkpoint section's
    return parse_config_args(parser(), argv, defaults=DEFAULTS, flag_sections=sections)


def main(argv=None) -> int:
    args, cfg = parse(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        finetune(args.checkpoint, cfg)
    except MegamdmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
