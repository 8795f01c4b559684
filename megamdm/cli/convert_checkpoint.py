#!/usr/bin/env python
"""Convert checkpoints between megatron-core torch_dist (training), the single-GPU format
(sampling, fine-tuning) and Hugging Face LLMs (initialisation).

    # a training run (latest iteration) or one iter_NNNNNNN directory -> single-GPU format
    megamdm-convert to-single --checkpoint runs/pretrain_1024 --out release/
    # single-GPU format -> a model-only torch_dist checkpoint, loadable by training at any TP/PP
    megamdm-convert from-single --checkpoint release/ --out runs/finetune_init
    # a Llama / Mistral-style HF LLM -> a single-GPU-format MDM (backbone + text embeddings from the LLM)
    megamdm-convert from-hf --hf Llama-dir/ --image-tokenizer tok/ --gce-groups g.safetensors \\
        --out init/ [--config configs/pretrain_256.yaml] [--mask-token "<|reserved_special_token_0|>"]
    # NVIDIA's released NL-Diffusion-Image folder (weights, tokenizers) -> single-GPU format
    megamdm-convert from-nld --nld NL-Diffusion-Image/ --out release/ [--gce-groups g.safetensors] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import sys
import time

from megamdm.config import load_config
from megamdm.convert import from_hf, from_nld, from_single, to_single
from megamdm.convert.megatron import WEIGHTS
from megamdm.errors import MegamdmError
from megamdm.gce import GCEGroups
from megamdm.options import DTYPES, ArgumentParser, torch_dtype
from megamdm.vq import load_image_tokenizer, tokenizer_kind


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-single", help="torch_dist -> single-GPU format")
    a.add_argument("--checkpoint", required=True, help="run directory or iter_NNNNNNN directory")
    a.add_argument("--out", required=True)
    a.add_argument("--config", help="training config (default: the config.yaml saved with the checkpoint)")
    a.add_argument("--dtype", choices=DTYPES, help="cast weights (default: as stored)")
    a.add_argument("--weights", choices=WEIGHTS, default="auto", help="EMA or last-step weights (auto: EMA when saved)")
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("from-single", help="single-GPU format -> model-only torch_dist")
    b.add_argument("--checkpoint", "--single", dest="single", required=True, help="single-GPU-format directory")
    b.add_argument("--out", required=True, help="a new run directory")
    b.add_argument("--dtype", choices=DTYPES)
    b.add_argument("--overwrite", action="store_true", help="replace the training run in --out")
    c = sub.add_parser("from-hf", help="Hugging Face Llama/Mistral LLM -> single-GPU-format MDM")
    c.add_argument("--hf", required=True)
    c.add_argument("--image-tokenizer", required=True)
    c.add_argument("--gce-groups", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--config", help="a megamdm config for the text / sampling sections")
    c.add_argument("--mask-token", help="the text token used as MASK (default: the tokenizer's mask_token)")
    c.add_argument("--dtype", choices=DTYPES)
    c.add_argument("--overwrite", action="store_true")
    n = sub.add_parser("from-nld", help="NVIDIA's NL-Diffusion-Image release folder -> single-GPU format")
    n.add_argument("--nld", required=True, help="the downloaded nvidia/NL-Diffusion-Image folder")
    n.add_argument("--out", required=True)
    n.add_argument("--gce-groups", help="GCE groups for fine-tuning (default: group_ce_weight over consecutive ids)")
    n.add_argument("--dtype", choices=DTYPES)
    n.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    dtype = torch_dtype(args.dtype) if args.dtype else None
    t0 = time.time()
    try:
        if args.cmd == "to-single":
            cfg = load_config(args.config) if args.config else None
            out = to_single(args.checkpoint, args.out, dtype=dtype, config=cfg, overwrite=args.overwrite, weights=args.weights)
        elif args.cmd == "from-single":
            out = from_single(args.single, args.out, dtype=dtype, overwrite=args.overwrite)
        elif args.cmd == "from-nld":
            groups = GCEGroups.load(args.gce_groups) if args.gce_groups else None
            out = from_nld(args.nld, args.out, groups=groups, dtype=dtype, overwrite=args.overwrite)
        else:
            tok = load_image_tokenizer(tokenizer_kind(args.image_tokenizer), args.image_tokenizer)
            groups = GCEGroups.load(args.gce_groups)
            cfg = load_config(args.config) if args.config else None
            if cfg is not None:
                cfg.image_tokenizer.path = args.image_tokenizer
            out = from_hf(
                args.hf,
                args.out,
                image_tokenizer=tok,
                groups=groups,
                config=cfg,
                text_mask_token=args.mask_token,
                dtype=dtype,
                overwrite=args.overwrite,
            )
    except (MegamdmError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.cmd}: wrote {out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
