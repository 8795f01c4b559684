"""Rotary position angles for the joint text+image sequence, shared by both model implementations.

The angles use the non-interleaved ("rotate half") layout of Llama and megatron-core:
``x * cos(emb) + rotate_half(x) * sin(emb)`` with ``emb = cat(angles, angles)``.
1-D: text positions 0..L-1, then image positions L..L+M-1 in raster order of the merged grid.
2-D (``rope_2d``): half of the frequencies rotate by row, half by column; text token p uses
(p, p) and image position (r, c) uses (L + r, L + c).
"""

from __future__ import annotations

import torch


def _inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))


def rope_angles(
    text_len: int, grid_h: int, grid_w: int, head_dim: int, theta: float, rope_2d: bool, device=None
) -> torch.Tensor:
    """``emb [S, head_dim]`` fp32 for ``S = text_len + grid_h * grid_w`` (merged grid)."""
    s_img = grid_h * grid_w
    if not rope_2d:
        pos = torch.arange(text_len + s_img, dtype=torch.float64, device=device)
        ang = pos[:, None] * _inv_freq(head_dim, theta, device)[None, :]
    else:
        inv = _inv_freq(head_dim // 2, theta, device)
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
