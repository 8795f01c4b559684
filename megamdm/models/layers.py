"""The layers both models are built from: Llama's RMSNorm, the 2x2 merge of image tokens and its
inverse, and the image head's sampling logits. The standalone model and the megatron-core model
(``mcore/``) import them from here, so neither imports the other (a parity test binds the two).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalise in fp32, cast back, then scale."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """``[B, h, w, d]`` -> ``[B, (h/2)(w/2), 4d]``: each 2x2 block, row-major, concatenated."""
    b, h, w, d = x.shape
    return x.view(b, h // 2, 2, w // 2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(b, (h // 2) * (w // 2), 4 * d)


def unmerge_2x2(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse layout of :func:`merge_2x2`: ``[B, (h/2)(w/2), 4d]`` -> ``[B, h, w, d]``."""
    b, _, d4 = x.shape
    d = d4 // 4
    return x.view(b, h // 2, w // 2, 2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, d)


def check_grid(h: int, w: int) -> None:
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise ValueError(f"image token grid {h}x{w} must have even sides for the 2x2 merge")


def head_logits(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[n, V]`` of head inputs ``rows [n, d]`` through the head weight ``[V, d]``. A
    half-precision head on CUDA runs as a cuBLAS GEMM with fp32 output: bf16 logits would lose the
    precision that guidance and the editing threshold need."""
    x = rows.to(weight.dtype)
    if weight.is_cuda and weight.dtype != torch.float32:
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return (x @ weight.t()).float()
