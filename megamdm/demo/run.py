#!/usr/bin/env python
"""The ShapesWorld demo: the whole system end to end on one CPU machine, no GPU, no data, no SLURM.

    make demo                     # = megamdm-demo --config configs/demo.yaml (megamdm-demo)
    megamdm-demo --quick          # a minute-long version (the CI test)

  1. generate ShapesWorld as img2dataset webdataset shards (the held-out prompts never appear)
  2. fit the k-means patch tokenizer (4x4 patches -> 16x16 tokens) and a word-level text tokenizer
  3. build the GCE groups
  4. preprocess the shards through DALI into zarr token shards
  5. train the MDM with megatron-core: torchrun, 2 processes, data parallel, gloo
  6. convert the distributed checkpoint to the single-GPU format
  7. sample the held-out prompts with token editing off and on (megamdm-sample) -> demo_out/grid.png
  8. score prompt adherence from pixels (megamdm-eval-shapes)

It runs from any folder: configs/demo.yaml is the shipped config, demo_out/ is made in the working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from megamdm.compat.cpu_precision import resolve_cpu_precision
from megamdm.config import load_config
from megamdm.demo import shapesworld as shapes
from megamdm.gce import build_groups
from megamdm.options import ArgumentParser
from megamdm.sampling.grid import image_grid
from megamdm.vq import KMeansPatchTokenizer, codebook_hash, pil_to_tensor

# everything a demo writes under --out; a fresh run replaces them (a stale run/ would be resumed),
# but only in a directory the demo marked as its own
OUTPUTS = (
    "data",
    "tokenizer",
    "text_tokenizer",
    "gce_groups.safetensors",
    "run",
    "release",
    "samples",
    "prompts.txt",
    "grid.png",
    "scores.json",
)
MARKER = ".megamdm-demo"
QUICK = {
    "out": "demo_quick",
    "images": 1500,
    "vocab": 512,
    "steps": 30,
    "n_single": 4,
    "n_two": 4,
    "per_prompt": 1,
    "sample_steps": 6,
}


class Stages:
    def __init__(self, total: int):
        self.total, self.k, self.t0 = total, 0, time.time()

    def start(self, title: str) -> float:
        self.k += 1
        print(f"\n[{self.k}/{self.total}] {title}  (at {time.time() - self.t0:.0f}s)", flush=True)
        return time.time()

    @staticmethod
    def done(t: float, what: str = "") -> None:
        print(f"      done in {time.time() - t:.1f}s{'  ' + what if what else ''}", flush=True)


def run(cmd: list, **kw) -> None:
    """Run a subprocess with its output streamed; stop the demo with its exit code on failure."""
    r = subprocess.run([str(c) for c in cmd], **kw)
    if r.returncode:
        print(f"error: {' '.join(str(c) for c in cmd[:4])} ... failed with exit code {r.returncode}", file=sys.stderr)
        sys.exit(r.returncode)


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml", help="(the shipped one from any folder: megamdm/configs)")
    ap.add_argument("--out", default="demo_out", help="default: demo_out (with --quick: demo_quick, so a finished demo stays)")
    ap.add_argument("--images", type=int, default=20000, help="ShapesWorld images to generate")
    ap.add_argument(
        "--two-prob",
        type=float,
        default=0.8,
        help="share of two-object scenes (0.8 learns relations better than 0.6: docs/experiments/shapesworld.md)",
    )
    ap.add_argument("--vocab", type=int, default=1536, help="k-means codebook size")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--nproc", type=int, default=2, help="training processes (data parallel)")
    ap.add_argument("--n-single", type=int, default=18, help="held-out single-object prompts")
    ap.add_argument("--n-two", type=int, default=48, help="held-out two-object prompts")
    ap.add_argument("--per-prompt", type=int, default=2, help="images per prompt and mode")
    ap.add_argument("--sample-steps", type=int, default=None)
    ap.add_argument("--edit-threshold", type=float, default=None, help="default: the config's sample.edit_threshold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a tiny run of every stage (for CI)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted demo in --out (default: start fresh, replacing its outputs)",
    )
    args = ap.parse_args(argv)
    if args.quick:  # --quick's sizes (and its own --out) are defaults: flags given with it still win
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    if not 0.0 <= args.two_prob <= 1.0:
        ap.error(f"--two-prob {args.two_prob} must be in [0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = [out / name for name in OUTPUTS if (out / name).exists()]
    if stale and not (out / MARKER).exists() and out.resolve() != Path("demo_out").resolve():
        print(
            f"error: --out {out} already holds {', '.join(p.name for p in stale)}, not written by the demo; "
            "choose an empty or new directory",
            file=sys.stderr,
        )
        return 2
    (out / MARKER).touch()
    if stale and not args.resume:
        print(f"starting fresh: replacing the previous demo's outputs in {out} (--resume continues it instead)")
        for p in stale:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    precision, probe = resolve_cpu_precision(cfg.train.precision)
    print(f"training precision: {precision}" + (f" ({probe.describe()})" if probe else " (as configured)"))
    steps = args.steps or cfg.train.steps
    sample_steps = args.sample_steps or cfg.sample.steps
    threshold = cfg.sample.edit_threshold if args.edit_threshold is None else args.edit_threshold
    st = Stages(8)
    singles, doubles = shapes.heldout_prompts(args.seed + 7, args.n_single, args.n_two)

    t = st.start(
        f"generating {args.images} ShapesWorld images -> {out / 'data/wds'} "
        f"({len(doubles)} held-out two-object captions excluded)"
    )
    wds = out / "data" / "wds"
    with tqdm(total=args.images, unit="img", desc="generate") as bar:
        tars = shapes.write_shards(
            wds, args.seed, args.images, per_shard=1000, two_prob=args.two_prob, exclude=frozenset(doubles), progress=bar
        )
    st.done(t, f"{len(tars)} tar shards")

    t = st.start("fitting the k-means tokenizer on 4x4 patches; word-level text tokenizer")
    fit_images = pil_to_tensor([shapes.render(o) for o in shapes.scenes(args.seed + 1, min(args.images, 8000))])
    # ShapesWorld has ~1600 distinct 4x4 patches; some seeds' fitting images hold fewer than --vocab:
    # then every distinct patch gets its own code (rounded down to whole GCE groups)
    patches = KMeansPatchTokenizer.distinct_patches([fit_images], 4)
    gmax = max(cfg.gce.group_sizes, default=1)
    vocab = min(args.vocab, len(patches) // gmax * gmax)
    note = f" (the fitting images hold {len(patches)} distinct patches)" if vocab < args.vocab else ""
    tok = KMeansPatchTokenizer.fit_patches(patches, vocab, 4, iters=15)
    tok.save(out / "tokenizer")
    shapes.write_text_tokenizer(out / "text_tokenizer")
    err = (tok.decode(tok.encode(fit_images[:500])) - fit_images[:500]).abs().mean().item()
    st.done(t, f"{vocab} codes{note}, mean reconstruction error {err:.4f}")

    t = st.start("building the GCE groups (balanced hierarchical k-means over codebook pixels + ink colour)")
    codebook = tok.codebook()
    groups = build_groups(
        shapes.grouping_features(codebook), cfg.gce.group_sizes, cfg.gce.group_weights, codebook_hash=codebook_hash(codebook)
    )
    groups.save(out / "gce_groups.safetensors")
    st.done(t, f"{tok.vocab_size // cfg.gce.group_sizes[0]} groups of {cfg.gce.group_sizes[0]}")

    t = st.start("preprocessing the shards through DALI into zarr token shards")
    run(
        [
            sys.executable,
            "-m",
            "megamdm.cli.preprocess",
            "--input",
            *tars,
            "--out",
            out / "data/shapes.zarr",
            "--tokenizer",
            out / "tokenizer",
            "--resolution",
            str(shapes.SIZE),
            "--workers",
            "2",
            "--device",
            "cpu",
        ]
    )
    st.done(t)

    t = st.start(f"training the MDM with megatron-core: torchrun, {args.nproc} processes, gloo ({steps} steps)")
    overrides = [
        f"data.shards=[{out / 'data/shapes.zarr'}]",
        f"image_tokenizer.path={out / 'tokenizer'}",
        f"text.tokenizer={out / 'text_tokenizer'}",
        f"gce.groups_file={out / 'gce_groups.safetensors'}",
        f"model.image_vocab_size={tok.vocab_size}",
        f"checkpoint.save_dir={out / 'run'}",
        f"train.steps={steps}",
        f"train.precision={precision}",
        "checkpoint.resume=auto",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(args.nproc),
            "-m",
            "megamdm.train",
            "--config",
            args.config,
            *overrides,
        ],
        env=env,
    )
    st.done(t)

    t = st.start("converting the torch_dist checkpoint to the single-GPU format")
    release = out / "release"
    run(
        [
            sys.executable,
            "-m",
            "megamdm.cli.convert_checkpoint",
            "to-single",
            "--checkpoint",
            out / "run",
            "--out",
            release,
            "--overwrite",
        ]
    )
    st.done(t)

    t = st.start(
        f"sampling {len(singles)} + {len(doubles)} held-out prompts x {args.per_prompt}, "
        f"token editing off and on (threshold {threshold})"
    )
    (out / "prompts.txt").write_text("".join(p + "\n" for p in singles + doubles))
    modes = {"off": 0.0, "on": threshold}
    for mode, thr in modes.items():
        run(
            [
                sys.executable,
                "-m",
                "megamdm.cli.sample",
                "--checkpoint",
                release,
                "--prompts",
                out / "prompts.txt",
                "--out",
                out / "samples" / mode,
                "--steps",
                str(sample_steps),
                "--edit-threshold",
                str(thr),
                "--num-images-per-prompt",
                str(args.per_prompt),
                "--batch-size",
                "64",
                "--device",
                "cpu",
                "--seed",
                str(args.seed),
            ]
        )
    st.done(t)

    t = st.start("scoring prompt adherence from pixels (megamdm-eval-shapes)")
    scores = {}
    for mode in modes:
        r = subprocess.run(
            [sys.executable, "-m", "megamdm.demo.evaluate", out / "samples" / mode, "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        scores[mode] = json.loads(r.stdout)
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")

    show = singles[:4] + doubles[:8]
    panels = []
    for mode in modes:
        files = {Image.open(p).info["prompt"]: p for p in sorted((out / "samples" / mode).glob("*_00.png"))}
        ims = [Image.open(files[p]).convert("RGB") for p in show]
        s = scores[mode]
        title = f"token editing {mode}: single {s['single']:.2f}, two-object {s['two']:.2f}"
        panels.append(image_grid(ims, show, cols=4, scale=2, caption_chars=26, title=title))
    grid = image_grid(panels, cols=len(panels), pad=6)
    grid.save(out / "grid.png")
    st.done(t)

    print("\nShapesWorld prompt adherence on held-out prompts (a prompt counts only if everything in it is right)")
    print(f"{'token editing':<15}{'single-object':>15}{'two-object':>12}{'overall':>10}")
    for mode in modes:
        s = scores[mode]
        print(f"{mode:<15}{s['single']:>15.3f}{s['two']:>12.3f}{s['overall']:>10.3f}")
    print(f"\npicture: {out / 'grid.png'}   scores: {out / 'scores.json'}   total {time.time() - st.t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
