#!/usr/bin/env python
"""Build the GCE vocabulary permutation from an image tokenizer's codebook.

megamdm-build-gce-groups --tokenizer DIR --group-sizes 8 --group-weights 0.2 --out gce_groups.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time

from megamdm.gce import build_groups
from megamdm.options import ArgumentParser
from megamdm.vq import codebook_hash, load_image_tokenizer, tokenizer_kind


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="image tokenizer directory (k-means or diffusers VQModel)")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[8], help="increasing, each dividing the next")
    ap.add_argument("--group-weights", type=float, nargs="+", default=[0.2])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if len(args.group_sizes) != len(args.group_weights):
        ap.error("--group-sizes and --group-weights need the same number of values")
    tok = load_image_tokenizer(tokenizer_kind(args.tokenizer), args.tokenizer)
    cb = tok.codebook()
    t0 = time.time()
    try:
        groups = build_groups(cb, args.group_sizes, args.group_weights, seed=args.seed, codebook_hash=codebook_hash(cb))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    groups.save(args.out)
    # how much closer are group members than random pairs?
    x = cb.float()
    g = args.group_sizes[0]
    blocks = x[groups.perm].view(-1, g, x.shape[1])
    within = (blocks - blocks.mean(1, keepdim=True)).pow(2).sum(-1).mean().item()
    total = (x - x.mean(0)).pow(2).sum(-1).mean().item()
    print(
        f"wrote {args.out}: V={groups.vocab_size} levels={args.group_sizes} in {time.time() - t0:.1f}s; "
        f"within-group variance {within:.4g} vs overall {total:.4g} ({within / max(total, 1e-12):.1%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
