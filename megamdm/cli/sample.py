#!/usr/bin/env python
"""Text-to-image sampling with token editing from a single-GPU-format checkpoint.

    megamdm-sample --checkpoint ckpt/ --prompt "a red circle" --out samples/
    megamdm-sample --checkpoint ckpt/ --geneval-metadata evaluation_metadata.jsonl --out geneval/ \\
        --num-images-per-prompt 4 --steps 20 --cfg 5 --edit-threshold 0.9
    megamdm-sample --checkpoint ckpt/ --dpg-prompts dpg_bench/prompts/ --out dpg/
    megamdm-sample --checkpoint ckpt/ --prompt "a blue square" --init-image in.png --mask mask.png --out edit/
    megamdm-sample --checkpoint ckpt/ --prompt "a wide beach" --init-image in.png --outpaint 128,0,128,0 --out wide/
    megamdm-sample --checkpoint release/ --prompt "a corgi on a beach" --preset nld --out samples/  # NVIDIA's sampler

Output layouts (megamdm/sample_outputs.py, also for MDMSampler users):
  plain     OUT/NNNNN_JJ.png
  GenEval   OUT/NNNNN/metadata.jsonl (that prompt's JSON object) + OUT/NNNNN/samples/JJJJ.png
  DPG-Bench OUT/<id>.png, a 2x2 grid of 4 samples (the folder holds nothing else)
Each PNG carries the prompt and every setting in its text chunks. Files are written atomically and
a GenEval folder appears under its final name only when complete, so a rerun skips finished work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from megamdm.config import SAMPLE_PRESETS
from megamdm.pretrained import CheckpointError
from megamdm.sample_outputs import SampleWriter, load_prompts
from megamdm.sampling import POLICIES, SCHEDULES, MDMSampler


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="single-GPU-format directory")
    src = ap.add_argument_group("prompts (one source)")
    src.add_argument("--prompt", action="append", default=[], help="repeatable")
    src.add_argument("--prompts", help="text file, one prompt per line")
    src.add_argument("--geneval-metadata", help="GenEval evaluation_metadata.jsonl")
    src.add_argument("--dpg-prompts", help="DPG-Bench prompts directory of <id>.txt files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--schedule", help=f"{' | '.join(SCHEDULES)}")
    ap.add_argument("--shift", type=float)
    ap.add_argument("--policy", help=f"{' | '.join(POLICIES)}")
    ap.add_argument("--gumbel-temperature", type=float)
    ap.add_argument("--edit-threshold", type=float, help="<= 0 disables token editing")
    ap.add_argument("--cfg-interval", help="LO,HI: guidance only at steps k with LO <= k/steps < HI (default 0,1)")
    ap.add_argument("--negative-prompt", help="the unconditional branch of guidance (default: the masked prompt)")
    ap.add_argument("--filter-order", help="temperature_first | filter_first (top-k/top-p before the temperature)")
    ap.add_argument("--confidence", help="sampled | raw (untempered, unfiltered probabilities)")
    ap.add_argument(
        "--final-prediction", action="store_true", default=None, help="with editing: end with the last step's prediction"
    )
    ap.add_argument("--schedule-counts", help="megamdm | nld (NL-Diffusion-Image's rounding of the shift schedule)")
    ap.add_argument("--maskgit-draw", help="confidence | softmax (maskgit draws by softmax(confidence / gumbel temperature))")
    ap.add_argument("--gumbel-temperature-schedule", help="constant | linear | cosine | shift | exp (falls over the steps)")
    ap.add_argument("--min-gumbel-temperature", type=float, help="where the schedule ends, times --gumbel-temperature")
    ap.add_argument("--stratified-order", help="halton | pmj (the release's progressive multi-jittered order)")
    ap.add_argument("--cfg-interval-rule", help="megamdm | nld (guided at 1-based steps int(lo n)..int(hi n))")
    ap.add_argument(
        "--preset", help=f"start from a named sampler ({' | '.join(SAMPLE_PRESETS)}) instead of the checkpoint's settings"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images-per-prompt", type=int)
    ap.add_argument("--batch-size", type=int, help="images per forward pass (default: as many as fit in memory)")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--init-image", help="inpainting / masked editing: the starting image")
    ap.add_argument("--mask", help="with --init-image: white pixels are regenerated")
    ap.add_argument("--outpaint", help="with --init-image: LEFT,TOP,RIGHT,BOTTOM pixels to extend the canvas by")
    ap.add_argument(
        "--edit-border", type=int, default=2, help="with --init-image: tokens around the new region editing may revise"
    )
    ap.add_argument("--overwrite", action="store_true", help="redo finished samples made with other prompts or settings")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def parse_floats(text: str | None, flag: str, count: int) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise ValueError(f"{flag} takes {count} comma-separated numbers, got {text!r}")
    return values


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        jobs, layout = load_prompts(
            prompts=args.prompt, prompts_file=args.prompts, geneval_metadata=args.geneval_metadata, dpg_prompts=args.dpg_prompts
        )
        n_per = args.num_images_per_prompt if args.num_images_per_prompt is not None else (4 if layout == "dpg" else 1)
        writer = SampleWriter(args.out, layout, images_per_prompt=n_per, checkpoint=args.checkpoint)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
        sampler = MDMSampler.from_pretrained(
            args.checkpoint, device=device, dtype=dtype, compile=args.compile, preset=args.preset
        )
        settings = sampler.default_settings(
            steps=args.steps,
            cfg=args.cfg,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            schedule=args.schedule,
            shift=args.shift,
            policy=args.policy,
            gumbel_temperature=args.gumbel_temperature,
            edit_threshold=args.edit_threshold,
            cfg_interval=parse_floats(args.cfg_interval, "--cfg-interval", 2),
            filter_order=args.filter_order,
            confidence=args.confidence,
            final_prediction=args.final_prediction,
            schedule_counts=args.schedule_counts,
            maskgit_draw=args.maskgit_draw,
            gumbel_temperature_schedule=args.gumbel_temperature_schedule,
            min_gumbel_temperature=args.min_gumbel_temperature,
            stratified_order=args.stratified_order,
            cfg_interval_rule=args.cfg_interval_rule,
        )
        init_image = mask = outpaint = None
        if args.init_image:
            init_image = Image.open(args.init_image).convert("RGB")
            if args.outpaint:
                if args.mask:
                    raise ValueError("give --mask (inpainting) or --outpaint (extend the canvas), not both")
                outpaint = [int(v) for v in parse_floats(args.outpaint, "--outpaint", 4)]
                _, _, (height, width) = sampler.prepare_outpainting(init_image, outpaint)  # validates now
            else:
                if not args.mask:
                    raise ValueError("--init-image needs --mask (white = regenerate) or --outpaint")
                mask = Image.open(args.mask)
                height, width = init_image.size[1], init_image.size[0]
                sampler.grid_for(height, width)
                sampler.prepare_inpainting(init_image, mask, height, width)  # validates sizes now
        elif args.mask or args.outpaint:
            raise ValueError("--mask and --outpaint need --init-image")
        else:
            height = args.height or sampler.cfg.sample.height
            width = args.width or sampler.cfg.sample.width
            sampler.grid_for(height, width)
        fields = {f: getattr(settings, f) for f in settings.__dataclass_fields__}
        recorded = {
            **fields,
            "height": height,
            "width": width,
            "dtype": str(sampler.dtype).replace("torch.", ""),
            "checkpoint": args.checkpoint,
        }
        if args.negative_prompt is not None:
            recorded["negative_prompt"] = args.negative_prompt
        if outpaint is not None:
            recorded["outpaint"] = outpaint
        pending = {
            key
            for key, _, _ in writer.pending(
                jobs, lambda k: {**recorded, "seed": args.seed + k * n_per}, overwrite=args.overwrite
            )
        }
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} is not allowed: give 1 or more, or leave it out to fit memory")
        batch_size = args.batch_size or sampler.auto_batch_size(height, width, settings, len(pending) * n_per)
    except (ValueError, CheckpointError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
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
    bar = tqdm(total=len(todo), desc="prompts", unit="prompt", disable=args.quiet)
    for s in range(0, len(todo), per_call):
        batch = todo[s : s + per_call]
        res = sampler(
            [p for _, _, p, _ in batch],
            height=height,
            width=width,
            num_images_per_prompt=n_per,
            seeds=[args.seed + k * n_per for k, _, _, _ in batch],
            batch_size=batch_size,
            negative_prompt=args.negative_prompt,
            init_image=init_image,
            mask=mask,
            outpaint=outpaint,
            edit_border=args.edit_border,
            progress=False,
            **fields,
        )
        prompts_cut += res.prompts_cut
        for e in res.edits_per_step:
            edits_total += sum(e)
            edit_steps += len(e)
        for b, (k, key, prompt, meta) in enumerate(batch):
            imgs = res.images[b * n_per : (b + 1) * n_per]
            st = {x: v for x, v in res.settings.items() if x not in ("seeds", "negative_prompts")}
            st["seed"] = args.seed + k * n_per
            if args.negative_prompt is not None:
                st["negative_prompt"] = args.negative_prompt
            writer.write(key, prompt, meta, imgs, st)
            n_images += len(imgs)
        bar.update(len(batch))
        bar.set_postfix(edits_per_step=f"{edits_total / max(edit_steps, 1):.1f}")
    bar.close()
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
