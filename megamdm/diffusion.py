"""Masked-diffusion corruption for training (the sampler's unmask counts: ``sampling/schedules.py``).

Training (docs/design.md §1.2), per sample:
  * draw ``t`` from a schedule, ``p = (1 - eps) t + eps``, mask exactly ``max(1, round(p N))`` tokens;
  * flip a fraction ``flip_ratio`` of the *visible* tokens to another token (``uniform`` over the
    vocabulary or ``group``: a neighbour in the same level-0 GCE group); they are what teaches
    token editing and their loss is weighted ``edit_loss_weight``;
  * with probability ``prompt_drop`` replace the whole prompt by the text MASK.

Every random draw of a sample comes from that sample's own generator, seeded from
``(seed, epoch, sample index)`` by the data loader. The corruption of a sample therefore does not
depend on the batch it lands in, the data-parallel size or the number of workers: a run resumed
at another parallel layout sees the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import DiffusionConfig
from .text import masked_prompt


@dataclass
class Corrupted:
    """One training batch after corruption; all tensors share the leading batch dimension."""

    text_ids: torch.Tensor  # [B, L] long
    text_pad_mask: torch.Tensor  # [B, L] bool, True = padding
    image_input: torch.Tensor  # [B, h, w] long, model-order ids with MASK = V
    target: torch.Tensor  # [B, h, w] long, model-order clean ids
    loss_weight: torch.Tensor  # [B, h, w] float: 1 masked, edit_loss_weight flipped, 0 otherwise
    is_masked: torch.Tensor  # [B, h, w] bool
    is_flipped: torch.Tensor  # [B, h, w] bool
    mask_ratio: torch.Tensor  # [B] float, the drawn t

    def to(self, device) -> Corrupted:
        return Corrupted(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


def sample_mask_ratio(cfg: DiffusionConfig, generator: torch.Generator) -> float:
    """One draw of ``t`` in [0, 1] from the configured schedule."""
    u = float(torch.rand((), generator=generator))
    if cfg.t_schedule == "uniform":
        return u
    if cfg.t_schedule == "cosine":  # MaskGIT: mask ratio cos(pi/2 u), skewed towards heavy masking
        return math.cos(math.pi / 2 * u)
    if cfg.t_schedule == "logit_normal":
        z = float(torch.randn((), generator=generator)) * cfg.logit_normal_std + cfg.logit_normal_mean
        return 1.0 / (1.0 + math.exp(-z))
    raise ValueError(f"unknown t_schedule {cfg.t_schedule!r}; allowed: uniform, cosine, logit_normal")


def num_masked(t: float, num_tokens: int, eps: float) -> int:
    p = (1.0 - eps) * t + eps
    return min(num_tokens, max(1, round(p * num_tokens)))


def _flip_values(orig: torch.Tensor, mode: str, vocab_size: int, group_size: int, gen: torch.Generator):
    """Another token for each entry of ``orig``: never the same id."""
    if mode == "uniform":
        r = torch.randint(0, vocab_size - 1, orig.shape, generator=gen)
        return r + (r >= orig).long()
    if mode == "group":
        base = orig - orig % group_size
        r = torch.randint(0, group_size - 1, orig.shape, generator=gen)
        return base + r + (r >= orig % group_size).long()
    raise ValueError(f"unknown flip_mode {mode!r}; allowed: uniform, group")


def corrupt_sample(
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    text_pad_mask: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    vocab_size: int,
    text_mask_id: int,
    flip_group_size: int,
    generator: torch.Generator,
    mask_ratio: float | None = None,
    drop_len: int = 0,
    drop_keep_last: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Corrupt one sample. ``image_ids`` are model-order ids of any shape; returns
    (text_ids, text_pad_mask, image_input, loss_weight, is_masked, is_flipped, t). ``mask_ratio``
    fixes ``t`` instead of drawing it (validation). A dropped prompt is :func:`megamdm.text.masked_prompt`'s
    (``drop_len``: 0 MASKs at every position, n the first n, -1 the prompt's own tokens but its last
    ``drop_keep_last``)."""
    flat = image_ids.reshape(-1)
    n = flat.numel()
    t = sample_mask_ratio(cfg, generator) if mask_ratio is None else float(mask_ratio)
    k = num_masked(t, n, cfg.eps)
    order = torch.randperm(n, generator=generator)
    masked = torch.zeros(n, dtype=torch.bool)
    masked[order[:k]] = True
    flipped = torch.zeros(n, dtype=torch.bool)
    n_flip = round(cfg.flip_ratio * (n - k))
    inp = flat.clone()
    inp[masked] = vocab_size  # MASK id
    if n_flip > 0:
        pos = order[k : k + n_flip]
        flipped[pos] = True
        inp[pos] = _flip_values(flat[pos], cfg.flip_mode, vocab_size, flip_group_size, generator)
    weight = masked.float() + flipped.float() * cfg.edit_loss_weight
    if cfg.prompt_drop > 0 and float(torch.rand((), generator=generator)) < cfg.prompt_drop:
        ids, pad = masked_prompt(text_mask_id, text_ids[None], text_pad_mask[None], drop_len, drop_keep_last)
        text_ids, text_pad_mask = ids[0], pad[0]
    shape = image_ids.shape
    return (text_ids, text_pad_mask, inp.view(shape), weight.view(shape), masked.view(shape), flipped.view(shape), t)


def corrupt_batch(
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    text_pad_mask: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    vocab_size: int,
    text_mask_id: int,
    flip_group_size: int,
    seeds: Sequence[int],
    mask_ratio: float | None = None,
    drop_len: int = 0,
    drop_keep_last: int = 0,
) -> Corrupted:
    """Corrupt a batch ``[B, h, w]`` with one generator per sample, seeded by ``seeds[i]`` (at a
    fixed ``t = mask_ratio`` when given)."""
    if cfg.flip_ratio > 0 and cfg.flip_mode == "group" and flip_group_size < 2:
        raise ValueError("diffusion.flip_mode=group needs a level-0 GCE group size of at least 2")
    if len(seeds) != image_ids.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {image_ids.shape[0]}")
    outs = []
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        outs.append(
            corrupt_sample(
                image_ids[i],
                text_ids[i],
                text_pad_mask[i],
                cfg,
                vocab_size=vocab_size,
                text_mask_id=text_mask_id,
                flip_group_size=flip_group_size,
                generator=g,
                mask_ratio=mask_ratio,
                drop_len=drop_len,
                drop_keep_last=drop_keep_last,
            )
        )
    cols = list(zip(*outs))
    return Corrupted(
        text_ids=torch.stack(cols[0]),
        text_pad_mask=torch.stack(cols[1]),
        image_input=torch.stack(cols[2]),
        target=image_ids.clone(),
        loss_weight=torch.stack(cols[3]),
        is_masked=torch.stack(cols[4]),
        is_flipped=torch.stack(cols[5]),
        mask_ratio=torch.tensor(cols[6], dtype=torch.float32),
    )
