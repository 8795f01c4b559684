"""Periodic sample images of fixed prompts during training, through the distributed model.

The sampling loop is :func:`megamdm.sampling.loop.sample_tokens`, the standalone sampler's. Each step
runs one forward-only pass of the pipeline (cond and uncond in one micro-batch); the last stage
applies guidance to the head input and samples, with logits computed a chunk of positions at a time
(each TP rank computes its vocabulary shard, gathered per chunk), then sends the integer token grid
to the other stages. Every random draw comes from a per-image generator, so all TP and DP ranks of
the last stage draw the same tokens."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..sampling.draw import chunk_rows
from ..sampling.loop import cfg_combine, sample_tokens
from ..text import format_prompt, masked_prompt, template_tail, tokenize_prompts
from ..vq import tensor_to_pil


def _stage_hidden(model, ids, pad, x):
    """One forward-only pass of the pipeline; the image hidden states ``[b, h, w, d]`` on the last
    stage, ``None`` elsewhere."""
    b, h, w = x.shape

    def step(it, mdl):
        batch = next(it)
        out = mdl(*batch)

        def loss_func(hidden):
            return hidden.new_zeros(()), {"hidden": hidden}

        return out, loss_func

    res = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([(ids, pad, x)]),
        model=[model],
        num_microbatches=1,
        seq_length=ids.shape[1] + h * w // 4,
        micro_batch_size=b,
        forward_only=True,
    )
    return res[0]["hidden"] if ps.is_pipeline_last_stage() else None


@torch.no_grad()
def sample_images(
    model, cfg, groups, text_tokenizer, image_tokenizer, prompts, *, device: str, grid: tuple[int, int], seed: int = 0
):
    """Images (PIL) of ``prompts`` with the checkpoint's sampling settings; identical on every rank."""
    f = image_tokenizer.downsample
    x = sample_token_grid(
        model, cfg, text_tokenizer, prompts, device=device, grid=grid, size=(grid[0] * f, grid[1] * f), seed=seed
    )
    tok = groups.to_tokenizer(x.cpu())
    return tensor_to_pil(image_tokenizer.decode(tok.to(device)).float().cpu())


@torch.no_grad()
def sample_token_grid(
    model, cfg, text_tokenizer, prompts, *, device: str, grid: tuple[int, int], size: tuple[int, int], seed: int = 0
) -> torch.Tensor:
    """Model-order tokens ``[b, h, w]`` of ``prompts`` (image ``i`` drawn with seed ``seed + i``, as
    :class:`~megamdm.sampling.pipeline.MDMSampler` does) on every rank; ``size`` is the (height, width) in
    pixels that the prompts' micro-conditioning states. ``model``: megatron's wrappers or the bare model."""

    settings = cfg.sample.settings()
    texts = [
        format_prompt(
            p,
            width=size[1],
            height=size[0],
            score=cfg.text.default_score,
            micro_conditioning=cfg.text.micro_conditioning,
            template=cfg.text.template,
        )
        for p in prompts
    ]
    b = len(prompts)
    tail = template_tail(text_tokenizer, cfg.text.template, cfg.model.text_after_image)
    ids, pad, _ = tokenize_prompts(text_tokenizer, texts, cfg.text.max_len, tail.kept)
    uid, upad = masked_prompt(text_tokenizer.mask_id, ids, pad, cfg.text.drop_len, tail.kept)
    both_ids, both_pad = torch.cat([ids, uid]).to(device), torch.cat([pad, upad]).to(device)
    ids, pad = ids.to(device), pad.to(device)
    inner = model
    while hasattr(inner, "module"):  # DDP(Float16Module(MDMModel))
        inner = inner.module
    was_training = model.training
    model.eval()

    def hidden_fn(x, step):
        if not settings.guided(step):
            return _stage_hidden(model, ids, pad, x)
        hs = _stage_hidden(model, both_ids, both_pad, torch.cat([x, x]))
        return None if hs is None else cfg_combine(hs[:b].float(), hs[b:].float(), settings.cfg)

    x = torch.full((b, *grid), cfg.model.image_mask_id, dtype=torch.long, device=device)
    pp = ps.get_pipeline_model_parallel_world_size()
    src, group = ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group()
    if ps.is_pipeline_last_stage():
        gens = [torch.Generator(device).manual_seed(seed + i) for i in range(b)]

        def send(_k, tokens):
            if pp > 1:
                dist.broadcast(tokens, src=src, group=group)

        x = sample_tokens(
            hidden_fn,
            inner.logits,
            x,
            cfg.model.image_mask_id,
            settings,
            gens,
            chunk=chunk_rows(cfg.model.image_vocab_size, device),
            on_step=send,
        ).tokens
    else:
        for k in range(settings.steps):
            hidden_fn(x, k)
            dist.broadcast(x, src=src, group=group)
    model.train(was_training)
    return x
