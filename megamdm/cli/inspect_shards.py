#!/usr/bin/env python
"""Summarise a token-shard dataset and write a decoded preview grid.

megamdm-inspect-shards data/shapes.zarr --tokenizer tok/ --preview preview.png
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from megamdm.data.shards import ShardError, TokenShards
from megamdm.options import ArgumentParser
from megamdm.sampling.grid import image_grid
from megamdm.vq import load_image_tokenizer, tensor_to_pil, tokenizer_kind


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--tokenizer", help="image tokenizer directory, to decode a preview")
    ap.add_argument("--preview", help="PNG path for a grid of decoded samples")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    try:
        ds = TokenShards(args.dataset)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a = ds.attrs
    print(
        f"{args.dataset}: {len(a['parts'])} parts, tokenizer {a['tokenizer']} (codebook {a['codebook_hash']}), "
        f"reader {ds.backend}"
    )
    total = sum(ds.counts.values())
    print(f"{'resolution':<12}{'samples':>10}{'share':>8}")
    for rk in ds.resolutions:
        print(f"{rk:<12}{ds.counts[rk]:>10}{ds.counts[rk] / max(total, 1):>8.1%}")
    print(f"skipped: {a.get('skipped') or 'none'}")
    if ds.partial:
        print(
            f"PARTIAL: consolidated with --partial; {len(ds.missing_parts)} expected parts missing ({ds.missing_parts[0]}, ...)"
        )
    if not total:
        print(f"error: {args.dataset} holds no samples (skipped: {a.get('skipped') or 'none'})", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    rk = max(ds.counts, key=ds.counts.get)
    idx = np.sort(rng.choice(ds.counts[rk], size=min(args.samples, ds.counts[rk]), replace=False))
    for i, cap in zip(idx[:5], ds.captions(rk, idx[:5])):
        print(f"  [{rk} #{i}] {cap}")
    if args.preview:
        if not args.tokenizer:
            print("error: --preview needs --tokenizer", file=sys.stderr)
            return 2

        tok = load_image_tokenizer(tokenizer_kind(args.tokenizer), args.tokenizer)
        imgs = tensor_to_pil(tok.decode(torch.from_numpy(ds.tokens(rk, idx).astype(np.int64))))
        grid = image_grid(imgs, pad=0)
        grid.save(args.preview)
        print(f"wrote {args.preview} ({len(imgs)} samples of {rk})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
