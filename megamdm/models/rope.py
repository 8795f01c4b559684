"""Rotary position angles for the joint text+image sequence, shared by both model implementations.

The angles use the non-interleaved ("rotate half") layout of Llama and megatron-core:
``x * cos(emb) + rotate_half(x) * sin(emb)`` with ``emb = cat(angles, angles)``.

Positions (:func:`sequence_positions`) are those of the sequence as written, whatever padding the
batch carries: a prompt's real tokens are 0..n-1 and its image follows at n.. in raster order of the
merged grid (``model.fixed_image_start = 0``, per-sample positions), or every image starts at one
fixed position (``fixed_image_start = L``, the layout of checkpoints before 0.2, trained with prompts
padded to ``L``). With ``model.text_after_image = a`` the last ``a`` real prompt tokens come after the
image (NL-Diffusion-Image's template closes its assistant turn there), their positions continuing
past it. So padding, trimming a batch's padding and the storage order change no angle.
1-D: position p rotates every frequency by p. 2-D (``rope_2d``): half of the frequencies rotate by
row, half by column; text token p uses (p, p) and image position (r, c) uses (start + r, start + c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Yarn:
    """YaRN frequency interpolation (Peng et al. 2023), as transformers computes it: frequencies that
    turn fewer than ``beta_slow`` times over ``original_max_positions`` are divided by ``factor``,
    those that turn more than ``beta_fast`` times are kept, with a linear ramp between. Only an
    attention factor of 1 is supported (``mscale == mscale_all_dim``, as in NL-Diffusion-Image)."""

    factor: float
    original_max_positions: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    @classmethod
    def of(cls, model_cfg) -> Yarn | None:
        if model_cfg.rope_scaling != "yarn":
            return None
        return cls(
            model_cfg.rope_factor, model_cfg.rope_original_max_positions, model_cfg.rope_beta_fast, model_cfg.rope_beta_slow
        )


def _inv_freq(dim: int, theta: float, device=None, yarn: Yarn | None = None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    if yarn is None or yarn.factor <= 1.0:
        return inv

    def correction_dim(rotations: float) -> float:  # the dimension whose frequency turns this often
        return dim * math.log(yarn.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (the original frequency), 0: interpolate (divided by the factor)
    return inv / yarn.factor * (1.0 - keep) + inv * keep


def sequence_positions(
    text_pad_mask: torch.Tensor, num_image: int, *, fixed_image_start: int = 0, text_after_image: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the prompt tokens ``[B, L]`` and of each image's first position ``[B]`` for prompts
    whose padding mask is ``text_pad_mask [B, L]`` (True = padding, a suffix of each row) and images
    of ``num_image`` merged positions. Padding gets positions too; they are never attended to."""
    b, length = text_pad_mask.shape
    j = torch.arange(length, device=text_pad_mask.device).expand(b, length)
    if fixed_image_start:
        if length > fixed_image_start:
            raise ValueError(
                f"prompts of {length} positions do not fit before the image, which this model places at "
                f"position {fixed_image_start} (model.fixed_image_start)"
            )
        return j, torch.full((b,), fixed_image_start, device=text_pad_mask.device)
    start = (~text_pad_mask).sum(1) - text_after_image
    if text_after_image:
        torch._assert_async((start >= 0).all(), "a prompt is shorter than model.text_after_image")
        return torch.where(j >= start[:, None], j + num_image, j), start
    return j, start


def rope_angles(
    text_pos: torch.Tensor,
    image_start: torch.Tensor,
    grid_h: int,
    grid_w: int,
    head_dim: int,
    theta: float,
    rope_2d: bool,
    yarn: Yarn | None = None,
) -> torch.Tensor:
    """``emb [B, S, head_dim]`` fp32 for the sequence ``[prompt (L) | image (grid_h * grid_w)]`` in this
    order, from :func:`sequence_positions`' ``text_pos [B, L]`` and ``image_start [B]``."""
    device = text_pos.device
    tp = text_pos.to(torch.float64)
    st = image_start.to(torch.float64)[:, None]
    if not rope_2d:
        pos = torch.cat([tp, st + torch.arange(grid_h * grid_w, dtype=torch.float64, device=device)], dim=1)
        ang = pos[..., None] * _inv_freq(head_dim, theta, device, yarn)
    else:
        inv = _inv_freq(head_dim // 2, theta, device, yarn)
        rows = st + torch.arange(grid_h, dtype=torch.float64, device=device).repeat_interleave(grid_w)
        cols = st + torch.arange(grid_w, dtype=torch.float64, device=device).repeat(grid_h)
        r, c = torch.cat([tp, rows], dim=1), torch.cat([tp, cols], dim=1)
        ang = torch.cat([r[..., None] * inv, c[..., None] * inv], dim=-1)
    return torch.cat([ang, ang], dim=-1).float()


def model_rope(model_cfg, text_pad_mask: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """:func:`rope_angles` of a model (``ModelConfig``) for prompts ``text_pad_mask`` and a merged grid."""
    pos, start = sequence_positions(
        text_pad_mask,
        grid_h * grid_w,
        fixed_image_start=model_cfg.fixed_image_start,
        text_after_image=model_cfg.text_after_image,
    )
    c = model_cfg
    return rope_angles(pos, start, grid_h, grid_w, c.head_dim, c.rope_theta, c.rope_2d, Yarn.of(c))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """``x [B, heads, S, head_dim]`` rotated by ``emb [B, S, head_dim]`` (computed in fp32)."""
    emb = emb[:, None]
    cos, sin = emb.cos(), emb.sin()
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
