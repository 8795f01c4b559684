#!/usr/bin/env python
"""Prompt adherence on ShapesWorld, measured from pixels.

    megamdm-eval-shapes samples/                 # PNGs written by tools/sample.py (prompt in the PNG)
    megamdm-eval-shapes --ground-truth 2000      # the generator's own images: must be ~1.0

Each object's colour (nearest palette colour), shape (how much of its bounding box it fills) and
position (centre) are detected; a prompt counts only if the count, every colour and shape, and the
relation are right. Prints accuracy on single-object and two-object prompts; --json for a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from megamdm.demo import shapesworld as shapes
from megamdm.options import ArgumentParser


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="?", help="a folder of PNGs with a 'prompt' text chunk")
    ap.add_argument("--ground-truth", type=int, default=0, help="score this many generated scenes instead")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--show-errors", type=int, default=5)
    args = ap.parse_args(argv)
    if args.ground_truth:
        results = [shapes.score(shapes.render(o), shapes.caption(o)) for o in shapes.scenes(args.seed, args.ground_truth)]
    elif args.images:
        files = sorted(Path(args.images).glob("*.png"))
        if not files:
            print(f"error: no PNG files in {args.images}", file=sys.stderr)
            return 2
        results = []
        for f in files:
            im = Image.open(f)
            prompt = im.info.get("prompt")
            if prompt is None:
                print(f"error: {f} has no 'prompt' text chunk (write samples with megamdm-sample)", file=sys.stderr)
                return 2
            results.append(shapes.score(im, prompt))
    else:
        ap.error("give an images folder or --ground-truth N")
    summary = shapes.summarize(results)
    if summary.get("n_unscorable"):
        first = next(r["prompt"] for r in results if r.get("unscorable"))
        print(
            f"warning: {summary['n_unscorable']} prompts are not ShapesWorld captions (e.g. {first!r}); left out of the scores",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(summary))
        return 0
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(
        f"single-object {fmt(summary['single'])} ({summary['n_single']} prompts) | "
        f"two-object {fmt(summary['two'])} ({summary['n_two']}) | overall {fmt(summary['overall'])}"
    )
    for r in [r for r in results if not r["correct"]][: args.show_errors]:
        print(
            f"  wrong: {r['prompt']!r}: detected {r['detected']}"
            + (f", relation {r.get('relation')}" if "relation" in r else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
