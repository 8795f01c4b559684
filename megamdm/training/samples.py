"""Periodic sample images of fixed prompts during training, through the distributed model.

Every rank runs the same sampling loop (``sampling.sample_tokens``) on the same logits: the last
pipeline stage computes them (cond + uncond in one micro-batch) and broadcasts them to the other
stages, so the random draws, which come from per-image generators, agree everywhere."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _stage_logits(model, ids, pad, x, device):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, h, w = x.shape
    inner = model.module.module if hasattr(model.module, "module") else model.module  # DDP(Float16Module(m))

    def step(it, mdl):
        batch = next(it)
        out = mdl(*batch)

        def loss_func(hidden):
            return hidden.new_zeros(()), {"logits": inner.logits(hidden).float()}

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
    v = inner.mdm.image_vocab_size
    logits = res[0]["logits"] if ps.is_pipeline_last_stage() else torch.empty(b, h, w, v, device=device)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(logits, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return logits


@torch.no_grad()
def sample_images(
    model, cfg, groups, text_tokenizer, image_tokenizer, prompts, *, device: str, grid: tuple[int, int], seed: int = 0
):
    """Images (PIL) of ``prompts`` with the checkpoint's sampling settings; identical on every rank."""
    from ..sampling import cfg_combine, sample_tokens
    from ..text import format_prompt, masked_prompt, tokenize_prompts
    from ..vq import tensor_to_pil

    settings = cfg.sample.settings()
    f = image_tokenizer.downsample
    texts = [
        format_prompt(
            p,
            width=grid[1] * f,
            height=grid[0] * f,
            score=cfg.text.default_score,
            micro_conditioning=cfg.text.micro_conditioning,
        )
        for p in prompts
    ]
    ids, pad = tokenize_prompts(text_tokenizer, texts, cfg.text.max_len)
    uid, upad = masked_prompt(text_tokenizer, len(prompts), cfg.text.max_len)
    both_ids, both_pad = torch.cat([ids, uid]).to(device), torch.cat([pad, upad]).to(device)
    b = len(prompts)
    was_training = model.training
    model.eval()

    def logits_fn(x):
        z = _stage_logits(model, both_ids, both_pad, torch.cat([x, x]), device)
        return cfg_combine(z[:b], z[b:], settings.cfg)

    init = torch.full((b, *grid), cfg.model.image_mask_id, dtype=torch.long, device=device)
    gens = [torch.Generator(device).manual_seed(seed + i) for i in range(b)]
    res = sample_tokens(logits_fn, init, cfg.model.image_mask_id, settings, gens)
    model.train(was_training)
    tok = groups.to_tokenizer(res.tokens.cpu())
    return tensor_to_pil(image_tokenizer.decode(tok.to(device)).float().cpu())
