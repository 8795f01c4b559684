"""Rotary position angles for the joint text+image sequence, shared by both model implementations.

The angles use the non-interleaved ("rotate half") layout of Llama and megatron-core:
``x * cos(emb) + rotate_half(x) * sin(emb)`` with ``emb = cat(angles, angles)``.
1-D: text positions 0..L-1, then image positions L..L+M-1 in raster order of the merged grid.
2-D (``rope_2d``): half of the frequencies rotate by row, half by column; text token p uses
(p, p) and image position (r, c) uses (L + r, L + c).
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


def rope_angles(
    text_len: int,
    grid_h: int,
    grid_w: int,
    head_dim: int,
    theta: float,
    rope_2d: bool,
    device=None,
    yarn: Yarn | None = None,
) -> torch.Tensor:
    """``emb [S, head_dim]`` fp32 for ``S = text_len + grid_h * grid_w`` (merged grid)."""
    s_img = grid_h * grid_w
    if not rope_2d:
        pos = torch.arange(text_len + s_img, dtype=torch.float64, device=device)
        ang = pos[:, None] * _inv_freq(head_dim, theta, device, yarn)[None, :]
    else:
        inv = _inv_freq(head_dim // 2, theta, device, yarn)
        tp = torch.arange(text_len, dtype=torch.float64, device=device)
        rows = torch.arange(grid_h, dtype=torch.float64, device=device).repeat_interleave(grid_w) + text_len
        cols = torch.arange(grid_w, dtype=torch.float64, device=device).repeat(grid_h) + text_len
        r = torch.cat([tp, rows])
        c = torch.cat([tp, cols])
        ang = torch.cat([r[:, None] * inv[None, :], c[:, None] * inv[None, :]], dim=1)
    return torch.cat([ang, ang], dim=-1).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """``x [..., S, head_dim]`` rotated by ``emb [S, head_dim]`` (computed in fp32)."""
    cos, sin = emb.cos(), emb.sin()
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
