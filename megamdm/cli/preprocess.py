#!/usr/bin/env python
"""Tokenise img2dataset webdataset shards into a zarr token-shard dataset.

    python tools/preprocess.py --input 'laion/*.tar' --out data/laion_256.zarr --tokenizer tok/ --resolution 256
    torchrun --nproc-per-node 8 tools/preprocess.py --input ... --device cuda     # one GPU per rank
    srun ... python tools/preprocess.py --input ...
    python tools/preprocess.py --input ... --out ... --tokenizer tok/ --consolidate     # after all ranks
    python tools/preprocess.py --input ... --out data/laion.zarr ... --resolution 512 --add-buckets

Each rank takes a slice of the input shards (RANK/WORLD_SIZE from torchrun or srun, or --rank/--world)
and writes its own parts; --workers runs several local processes. Finished parts are skipped on a
rerun with the same options; other options are refused, or with --add-buckets written as new bucket
sizes beside the existing ones (one dataset for a 256 -> 512 -> 1024 curriculum). Corrupt,
uncaptioned and too-small samples are skipped and counted in the part attrs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from megamdm.config import PreprocessConfig
from megamdm.data.preprocess import env_rank, finalize, plan_parts, rank_slice, run
from megamdm.data.shards import ShardError
from megamdm.options import ArgumentParser, add_flags, given
from megamdm.vq import check_image_size, load_image_tokenizer, tokenizer_kind


def parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="*", default=[], help="tar files or glob patterns")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="image tokenizer directory")
    add_flags(ap.add_argument_group("preprocessing settings"), PreprocessConfig)
    ap.add_argument("--workers", type=int, default=1, help="local worker processes")
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--world", type=int, default=None)
    ap.add_argument("--consolidate", action="store_true", help="only write the index (with the --input it was made from)")
    ap.add_argument("--partial", action="store_true", help="with --consolidate: index the finished parts, mark partial")
    ap.add_argument(
        "--add-buckets",
        action="store_true",
        help="into an existing dataset: add these options' bucket sizes (e.g. another --resolution) beside its own",
    )
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    out, tok = Path(args.out), Path(args.tokenizer)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is an existing file; give a folder (the dataset is a zarr directory)")
        tars = sorted({p for pat in args.input for p in (glob.glob(pat) or [pat])})
        if args.consolidate:
            if not tars and not args.partial:
                raise ValueError(
                    "--consolidate needs the --input the dataset was made from (to know which parts to expect), "
                    "or --partial to index the finished parts and mark the dataset partial"
                )
            index = finalize(out, tok, [Path(t) for t in tars] if tars else None, partial=args.partial)
            print(
                f"consolidated {out}: {len(index['parts'])} parts, {index['totals']} samples, skipped {index['skipped']}"
                + (f", PARTIAL: {len(index['missing_parts'])} expected parts missing" if index["partial"] else "")
            )
            return 0
        missing = [t for t in tars if not Path(t).is_file()]
        if not tars or missing:
            print(
                f"error: no input tar files{' (not found: ' + ', '.join(missing[:3]) + ')' if missing else ''}", file=sys.stderr
            )
            return 2
        opts = PreprocessConfig(**given(args, PreprocessConfig))
        if not tok.is_dir():
            raise FileNotFoundError(f"image tokenizer folder not found: {tok}")
        tokenizer = load_image_tokenizer(tokenizer_kind(tok), tok)
        check_image_size(opts.resolution, opts.resolution, tokenizer.downsample)
        rank, world = env_rank()
        rank = args.rank if args.rank is not None else rank
        world = args.world if args.world is not None else world
        mine = rank_slice([Path(t) for t in tars], rank, world)
        plan = plan_parts(out, mine, tokenizer, opts, add_buckets=args.add_buckets)
        stats = run(plan, out, tok, opts, workers=args.workers, progress=not args.quiet)
        if len(mine) > len(plan):
            stats["parts_already_done"] = len(mine) - len(plan)
        print(f"rank {rank}/{world}: {json.dumps(stats)}")
        if world > 1 and "MASTER_ADDR" in os.environ:
            dist.init_process_group("gloo")
            dist.barrier()
            if rank == 0:
                index = finalize(out, tok, [Path(t) for t in tars])
                print(f"consolidated {out}: {index['totals']} samples, skipped {index['skipped']}")
            dist.barrier()
            dist.destroy_process_group()
        elif world == 1:
            index = finalize(out, tok, [Path(t) for t in tars])
            print(f"consolidated {out}: {index['totals']} samples, skipped {index['skipped']}")
        else:
            print(
                f"rank {rank} done; when all ranks are: tools/preprocess.py --out {out} --tokenizer {tok} "
                f"--input {' '.join(args.input)} --consolidate"
            )
    except (ShardError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
