#!/usr/bin/env python
"""One run of the ShapesWorld recipe study: train the standalone model on a finished demo's token
shards on one GPU, sample the demo's held-out prompts with editing off and on, score them from
pixels, print one JSON line. Runs are small, so a dozen share one GPU as separate processes:

    megamdm-demo --quick --out demo_q            # or any finished demo: shards, tokenizers, release/
    megamdm-shapes-study --demo demo_q --name base --steps 2400 &
    megamdm-shapes-study --demo demo_q --name seed1 --steps 2400 --seed 1 &

It uses megamdm's model, corruption, GCE loss, sampler and evaluator with the CPU pipeline's
optimizer settings and warmup-stable-decay schedule, but no megatron-core and no data loader: a
recipe question answered in minutes, not a replacement for the pipeline. The study table of docs/experiments/shapesworld.md
was made with its prototype, which drew the same corruption distribution vectorised on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megamdm.config import ModelConfig
from megamdm.data.shards import TokenShards, parse_res
from megamdm.demo import shapesworld as shapes
from megamdm.diffusion import corrupt_batch
from megamdm.formats.single import load_single
from megamdm.models.standalone import MDMTransformer
from megamdm.objective import LossSpec, loss_parts, select_supervised
from megamdm.options import ArgumentParser
from megamdm.sampling.pipeline import MDMSampler
from megamdm.text import format_prompt, tokenize_prompts


def parse_args(argv):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a demo output directory (megamdm-demo --out)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=160)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--min-lr", type=float, default=None, help="default: lr / 10")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wsd-fraction", type=float, default=0.2, help="the last fraction of steps anneals linearly")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--group-weight", type=float, default=0.2, help="GCE weight of the groups of 8 (0: plain CE)")
    ap.add_argument("--flip-ratio", type=float, default=0.1)
    ap.add_argument("--t-schedule", choices=["cosine", "uniform"], default="cosine")
    ap.add_argument("--prompt-drop", type=float, default=0.1)
    ap.add_argument("--bf16", action="store_true", help="autocast the model to bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=None, help="append the JSON line to this file too")
    return ap.parse_args(argv)


def load_demo(directory: Path, groups, text_tokenizer, max_len: int):
    """Every sample of the demo's token shards: model-order image ids, prompt ids and padding."""
    shards = TokenShards(directory / "data" / "shapes.zarr")
    rk = shards.resolutions[0]
    h, w = parse_res(rk)
    got = shards.read(rk, np.arange(shards.counts[rk]), ("tokens", "captions"))
    texts = [format_prompt(c, width=w, height=h, micro_conditioning=False) for c in got["captions"]]
    ids, pad, _ = tokenize_prompts(text_tokenizer, texts, max_len)
    tokens = groups.to_model(torch.from_numpy(np.stack(got["tokens"]).astype(np.int64)))
    return tokens, ids, pad


def main(argv=None) -> int:
    a = parse_args(argv)

    demo, dev = Path(a.demo), a.device
    pre = load_single(demo / "release")  # the demo's config, GCE groups and tokenizers
    cfg = pre.config
    mc = ModelConfig(
        **{
            **cfg.model.__dict__,
            "hidden_size": a.hidden,
            "num_attention_heads": a.heads,
            "num_query_groups": a.kv_heads,
            "head_dim": a.head_dim,
            "ffn_hidden_size": a.ffn,
            "num_layers": a.layers,
        }
    )
    model = MDMTransformer(mc)
    model.reset_parameters(seed=a.seed)
    model.to(dev)
    tokens, text_ids, text_pad = load_demo(demo, pre.groups, pre.text_tokenizer, cfg.text.max_len)
    n_samples = tokens.shape[0]
    diffusion = dataclasses.replace(cfg.diffusion, t_schedule=a.t_schedule, flip_ratio=a.flip_ratio, prompt_drop=a.prompt_drop)
    spec = LossSpec(list(pre.groups.group_sizes), [a.group_weight] * len(pre.groups.group_sizes), "torch")

    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": a.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=a.lr,
        betas=(0.9, a.beta2),
        eps=1e-8,
    )
    min_lr = a.lr / 10 if a.min_lr is None else a.min_lr
    n_decay = max(1, min(round(a.wsd_fraction * a.steps), a.steps - a.warmup))

    def lr_at(step):  # megatron-core's WSD: linear warmup, constant, linear anneal over the last n_decay steps
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        return a.lr - (a.lr - min_lr) * max(0, step - (a.steps - n_decay)) / n_decay

    g = torch.Generator().manual_seed(1000 + a.seed)

    def corrupt(step, idx):
        """The pipeline's per-sample corruption (one generator per sample, seeded by its position)."""
        c = corrupt_batch(
            tokens[idx],
            text_ids[idx],
            text_pad[idx],
            diffusion,
            vocab_size=mc.image_vocab_size,
            text_mask_id=pre.text_tokenizer.mask_id,
            flip_group_size=spec.group_sizes[0] if spec.group_sizes else 1,
            seeds=[((a.seed * a.steps + step) * a.batch + i) for i in range(len(idx))],
        )
        return c.to(dev)

    t0, ce_log, pos = time.time(), [], n_samples
    for step in range(a.steps):
        if pos + a.batch > n_samples:
            perm, pos = torch.randperm(n_samples, generator=g), 0
        c = corrupt(step, perm[pos : pos + a.batch])
        pos += a.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=a.bf16):
            hidden = model(c.text_ids, c.text_pad_mask, c.image_input)
        hs, ts, ws, fs = select_supervised(hidden, c.target, c.loss_weight, c.is_flipped)
        stats = model.head(hs, ts, ws, group_sizes=spec.group_sizes, group_weights=spec.group_weights, impl="torch")
        parts = loss_parts(stats, fs, spec)
        opt.zero_grad(set_to_none=True)
        parts.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step >= a.steps - 100:
            m = parts.metrics
            ce_log.append((step, float(m["ce_sum"] / m["n_masked"].clamp_min(1))))
    train_s = time.time() - t0

    model.eval()
    pre.model = model.float()
    sampler = MDMSampler(pre, device=dev, dtype="fp32")
    prompts = [p.strip() for p in (demo / "prompts.txt").read_text().splitlines() if p.strip()]
    scores = {}
    for mode, threshold in (("off", 0.0), ("on", cfg.sample.edit_threshold)):
        with torch.no_grad():
            out = sampler(prompts, num_images_per_prompt=2, seed=0, edit_threshold=threshold, progress=False)
        s = shapes.summarize([shapes.score(im, p) for im, p in zip(out.images, [p for p in prompts for _ in range(2)])])
        scores[mode] = {"single": s["single"], "two": s["two"]}
    tail = [c for s_, c in ce_log if s_ >= a.steps - 100]
    line = json.dumps(
        {
            "name": a.name,
            "train_s": round(train_s, 1),
            "final_masked_ce": round(sum(tail) / len(tail), 4),
            "ce_below_0.85_at_step": next((s_ for s_, c in ce_log if c < 0.85), None),
            **scores,
            "args": vars(a),
        }
    )
    print(line, flush=True)
    if a.results:
        with open(a.results, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
