"""Model FLOPs of the MDM, for TFLOP/s and MFU (the formula is stated in docs/training.md).

Per sample, with ``L`` real (unpadded) text tokens, an ``h x w`` token grid, ``M = hw/4`` merged positions,
``S = L + M``, ``n`` supervised (masked or flipped) tokens, hidden ``d``, ``H`` query heads and
``G`` KV heads of size ``k``, FFN ``F``, ``N`` layers and image vocabulary ``V``, the forward pass is

    body      N * (2 S d (H k + 2 G k)  +  2 S H k d  +  6 S d F)      QKV, output projection, SwiGLU
    attention N * 4 S^2 H k                                            scores and weighted sum
    merge     2 M (4d) d  +  unmerge 2 M d (4d)
    head      2 n d V                                                  only supervised tokens reach it

and training counts three forward passes (forward + backward). Activation recomputation and the
fused GCE's recomputed logits are hardware FLOPs, not model FLOPs, as in Megatron-LM's MFU.
"""

from __future__ import annotations

from ..config import ModelConfig


def forward_flops(m: ModelConfig, text_len: int, grid_h: int, grid_w: int, supervised: float) -> float:
    merged = grid_h * grid_w // 4
    s = text_len + merged
    hk, gk = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    d = m.hidden_size
    body = m.num_layers * (2 * s * d * (hk + 2 * gk) + 2 * s * hk * d + 6 * s * d * m.ffn_hidden_size)
    attention = m.num_layers * 4 * s * s * hk
    merge = 2 * merged * 4 * d * d * 2
    head = 2 * supervised * d * m.image_vocab_size
    return float(body + attention + merge + head)


def train_flops(m: ModelConfig, text_len: int, grid_h: int, grid_w: int, supervised: float) -> float:
    """Model FLOPs of one training sample (forward + backward = 3 forward passes)."""
    return 3.0 * forward_flops(m, text_len, grid_h, grid_w, supervised)


def body_flops(m: ModelConfig, text_lens, grid_h: int, grid_w: int) -> float:
    """Training FLOPs of everything but the head for samples whose prompts have ``text_lens`` real
    tokens: padding is not model work, so each sample counts its own sequence length."""
    return sum(train_flops(m, int(n), grid_h, grid_w, 0.0) for n in text_lens)


def head_flops(m: ModelConfig, supervised_tokens: float) -> float:
    """Training FLOPs of the image head on the supervised tokens (counted, not estimated)."""
    return 3.0 * 2.0 * supervised_tokens * m.hidden_size * m.image_vocab_size


def flops_per_sample(m: ModelConfig, text_len: int, grid_h: int, grid_w: int, supervised_fraction: float) -> float:
    return train_flops(m, text_len, grid_h, grid_w, supervised_fraction * grid_h * grid_w)


PEAK_TFLOPS = {  # dense, per GPU, by device-name substring: (bf16, fp8)
    "H200": (989.0, 1979.0),
    "H100": (989.0, 1979.0),
    "A100": (312.0, 312.0),
}


def peak_tflops(device_name: str, precision: str, override: float = 0.0) -> float:
    if override > 0:
        return override
    for key, (bf16, fp8) in PEAK_TFLOPS.items():
        if key in device_name:
            return fp8 if precision == "fp8" else bf16
    return 0.0  # unknown device (e.g. CPU): MFU is not reported
