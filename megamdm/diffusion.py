"""Masked-diffusion corruption for training and the unmask-count schedules for sampling.

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


def unmask_counts(
    num_tokens: int, steps: int, schedule: str = "shift", shift: float = 3.0, counts_rule: str = "megamdm"
) -> list[int]:
    """How many masked tokens to commit at each of ``steps`` steps; the counts sum to ``num_tokens``.

    ``shift``: ``sigma(t) = s t / (1 + (s - 1) t)`` on ``t = linspace(0, 1, steps + 1)``; the counts are
    the differences of ``floor(sigma N)``, reversed, so few tokens are committed early and many late.
    ``cosine``: the fraction still masked after step k is ``cos(pi/2 k/steps)``.
    ``counts_rule`` (``schedule_counts``): ``megamdm`` computes in float64, and when ``steps <= num_tokens``
    moves one token from the largest step into every empty one; ``nld`` is NL-Diffusion-Image's rule for
    ``shift``: float32, truncated, at most ``num_tokens`` steps (the rest commit nothing), every count
    raised to at least 1 and the excess taken back one token at a time from the last step towards the
    first, skipping steps at 1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if schedule == "shift" and shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if counts_rule == "nld" and schedule == "shift":
        return _nld_shift_counts(num_tokens, steps, shift)
    ts = [k / steps for k in range(steps + 1)]
    if schedule == "shift":
        cum = [math.floor(shift * t / (1 + (shift - 1) * t) * num_tokens + 1e-9) for t in ts]
        counts = [cum[i + 1] - cum[i] for i in range(steps)][::-1]
    elif schedule == "cosine":
        done = [num_tokens - math.floor(num_tokens * math.cos(math.pi / 2 * t) + 1e-9) for t in ts]
        done[-1] = num_tokens
        counts = [done[i + 1] - done[i] for i in range(steps)]
    else:
        raise ValueError(f"unknown unmask schedule {schedule!r}; allowed: shift, cosine")
    if steps <= num_tokens:  # move one token from the largest step into every empty one
        for i in range(steps):
            if counts[i] == 0:
                j = max(range(steps), key=lambda m: counts[m])
                counts[j] -= 1
                counts[i] += 1
    assert sum(counts) == num_tokens
    return counts


def _nld_shift_counts(num_tokens: int, steps: int, shift: float) -> list[int]:
    n = min(steps, num_tokens)
    if n == 0:
        return [0] * steps
    t = torch.linspace(0, 1, n + 1, dtype=torch.float32)
    sigma = shift * t / (1.0 + (shift - 1.0) * t)
    cum = (sigma * num_tokens).to(torch.int64)
    rising = (cum[1:] - cum[:-1]).clamp(min=1).tolist()  # in the order of sigma: the last step first
    excess, j = sum(rising) - num_tokens, 0
    while excess > 0:
        if rising[j % n] > 1:
            rising[j % n] -= 1
            excess -= 1
        j += 1
    return rising[::-1] + [0] * (steps - n)
