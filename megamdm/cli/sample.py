#!/usr/bin/env python
"""Text-to-image sampling with token editing from a single-GPU-format checkpoint.

    megamdm-sample --checkpoint ckpt/ --prompt "a red circle" --out samples/
    megamdm-sample --checkpoint ckpt/ --geneval-metadata evaluation_metadata.jsonl --out geneval/ \\
        --num-images-per-prompt 4 --steps 20 --cfg 5 --edit-threshold 0.9
    megamdm-sample --checkpoint ckpt/ --dpg-prompts dpg_bench/prompts/ --out dpg/
    megamdm-sample --checkpoint ckpt/ --prompt "a blue square" --init-image in.png --mask mask.png --out edit/
    megamdm-sample --checkpoint ckpt/ --prompt "a wide beach" --init-image in.png --outpaint 128,0,128,0 --out wide/
    megamdm-sample --checkpoint release/ --prompt "a corgi on a beach" --preset nld --out samples/  # NVIDIA's sampler

Output layouts (megamdm/sampling/outputs.py, also for MDMSampler users):
  plain     OUT/NNNNN_JJ.png
  GenEval   OUT/NNNNN/metadata.jsonl (that prompt's JSON object) + OUT/NNNNN/samples/JJJJ.png
  DPG-Bench OUT/<id>.png, a 2x2 grid of 4 samples (the folder holds nothing else)
Each PNG carries the prompt and every setting in its text chunks. Files are written atomically and
a GenEval folder appears under its final name only when complete, so a rerun skips finished work.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from megamdm.errors import MegamdmError
from megamdm.finetune.lora import apply_lora_adapter
from megamdm.formats.single import fingerprint, load_single
from megamdm.options import DTYPES, ArgumentParser, add_flags, given
from megamdm.sampling.outputs import SampleWriter, load_prompts
from megamdm.sampling.pipeline import MDMSampler
from megamdm.sampling.settings import SAMPLE_PRESETS, SampleConfig, SampleSettings

CANVAS = ("height", "width", "seed")  # SampleConfig's fields beyond the settings of one call


def parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="single-GPU-format directory")
    src = ap.add_argument_group("prompts (one source)")
    src.add_argument("--prompt", action="append", default=[], help="repeatable")
    src.add_argument("--prompts", help="text file, one prompt per line")
    src.add_argument("--geneval-metadata", help="GenEval evaluation_metadata.jsonl")
    src.add_argument("--dpg-prompts", help="DPG-Bench prompts directory of <id>.txt files")
    ap.add_argument("--out", required=True)
    settings = ap.add_argument_group(
        "sampler settings (default: the checkpoint's sample settings in its config.json, or --preset's)"
    )
    add_flags(settings, SampleConfig, names=CANVAS, with_defaults=False)
    add_flags(settings, SampleSettings, with_defaults=False)
    settings.add_argument(
        "--preset", choices=list(SAMPLE_PRESETS), help="start from a named sampler instead of the checkpoint's settings"
    )
    ap.add_argument("--negative-prompt", help="the unconditional branch of guidance (default: the masked prompt)")
    ap.add_argument("--num-images-per-prompt", type=int, help="default: 1 (4 for --dpg-prompts, a 2x2 grid)")
    ap.add_argument("--batch-size", type=int, help="images per forward pass (default: as many as fit in memory)")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    ap.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA, fp32 on CPU (as MDMSampler's)"
    )
    ap.add_argument("--lora", help="a LoRA adapter (megamdm-finetune's lora_adapter.safetensors) merged into the checkpoint")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--init-image", help="inpainting / masked editing: the starting image")
    ap.add_argument("--mask", help="with --init-image: white pixels are regenerated")
    ap.add_argument("--outpaint", type=_margins, help="with --init-image: LEFT,TOP,RIGHT,BOTTOM pixels to extend the canvas by")
    ap.add_argument(
        "--edit-border", type=int, default=2, help="with --init-image: tokens around the new region editing may revise"
    )
    ap.add_argument("--overwrite", action="store_true", help="redo finished samples made with other prompts or settings")
    ap.add_argument("--quiet", action="store_true")
    return ap


def _margins(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated pixel counts, got {text!r}") from None


def as_flags(message: str) -> str:
    """A sampler error in this command's words: the call's `argument` becomes its --argument."""
    return re.sub(r"`(\w+)`", lambda m: "--" + m.group(1).replace("_", "-"), message)


def _file_id(path) -> str | None:
    """What identifies an input file in the PNGs' record: a hash of its bytes (None: no such input)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None


def _sampler(args) -> MDMSampler:
    pre = load_single(args.checkpoint)
    if args.lora:
        pre.model = apply_lora_adapter(pre.model.float(), args.lora)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return MDMSampler(pre, device=device, dtype=args.dtype, compile=args.compile, preset=args.preset)


def _inputs(args, sampler: MDMSampler, n_per: int, seed: int):
    """The start image, mask and margins, checked by the sampler, and the canvas they give."""
    init_image, mask = sampler.load_images(args.init_image, args.mask)
    height, width = sampler.check_inputs(
        ["-"],
        height=getattr(args, "height", None),
        width=getattr(args, "width", None),
        num_images_per_prompt=n_per,
        seeds=[seed],
        batch_size=args.batch_size,
        negative_prompt=args.negative_prompt,
        init_image=init_image,
        mask=mask,
        outpaint=args.outpaint,
    )
    return init_image, mask, height, width


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        jobs, layout = load_prompts(
            prompts=args.prompt, prompts_file=args.prompts, geneval_metadata=args.geneval_metadata, dpg_prompts=args.dpg_prompts
        )
        n_per = args.num_images_per_prompt if args.num_images_per_prompt is not None else (4 if layout == "dpg" else 1)
        writer = SampleWriter(args.out, layout, images_per_prompt=n_per, checkpoint=args.checkpoint)
        sampler = _sampler(args)
        settings = sampler.default_settings(**given(args, SampleSettings))
        seed = getattr(args, "seed", sampler.cfg.sample.seed)  # a seed not given is the checkpoint's
        init_image, mask, height, width = _inputs(args, sampler, n_per, seed)
        # everything an image depends on, so that a rerun into this --out redoes what differs
        recorded = {
            **sampler.record(settings, height, width),
            "checkpoint_id": fingerprint(args.checkpoint),
            "lora": _file_id(args.lora),
            "negative_prompt": args.negative_prompt,
            "init_image": _file_id(args.init_image),
            "mask": _file_id(args.mask),
            "outpaint": args.outpaint,
            "edit_border": args.edit_border,
        }
        pending = {
            key
            for key, _, _ in writer.pending(jobs, lambda k: {**recorded, "seed": seed + k * n_per}, overwrite=args.overwrite)
        }
        batch_size = args.batch_size or sampler.auto_batch_size(height, width, settings, len(pending) * n_per)
    except (MegamdmError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {as_flags(str(e))}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(k, key, prompt, meta) for k, (key, prompt, meta) in enumerate(jobs) if key in pending]
    done = len(jobs) - len(todo)
    if done and not args.quiet:
        print(f"skipping {done} prompts already finished in {out}")
    t0 = time.time()
    n_images = 0
    edits_total, edit_steps, prompts_cut = 0, 0, 0
    per_call = max(1, batch_size // n_per)
    canvas = {} if init_image is not None else {"height": height, "width": width}  # an init image sets its own
    bar = tqdm(total=len(todo), desc="prompts", unit="prompt", disable=args.quiet)
    for s in range(0, len(todo), per_call):
        batch = todo[s : s + per_call]
        res = sampler(
            [p for _, _, p, _ in batch],
            **canvas,
            num_images_per_prompt=n_per,
            seeds=[seed + k * n_per for k, _, _, _ in batch],
            batch_size=batch_size,
            negative_prompt=args.negative_prompt,
            init_image=init_image,
            mask=mask,
            outpaint=args.outpaint,
            edit_border=args.edit_border,
            progress=False,
            **settings.recorded(),
        )
        prompts_cut += res.prompts_cut
        for e in res.edits_per_step:
            edits_total += sum(e)
            edit_steps += len(e)
        st = {x: v for x, v in res.settings.items() if x not in ("seeds", "negative_prompts")}
        for b, (k, key, prompt, meta) in enumerate(batch):
            imgs = res.images[b * n_per : (b + 1) * n_per]
            writer.write(key, prompt, meta, imgs, {**st, **recorded, "seed": seed + k * n_per})
            n_images += len(imgs)
        bar.update(len(batch))
        bar.set_postfix(edits_per_step=f"{edits_total / max(edit_steps, 1):.1f}")
    bar.close()
    writer.write_manifest(jobs)
    dt = time.time() - t0
    if not args.quiet:
        print(
            f"wrote {n_images} images for {len(todo)} prompts to {out} in {dt:.1f}s "
            f"({dt / max(n_images, 1):.3f} s/image, {edits_total / max(edit_steps, 1):.2f} edits/step/image)"
        )
    if prompts_cut:
        print(f"warning: {prompts_cut} prompts were longer than text.max_len tokens and lost their end", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
