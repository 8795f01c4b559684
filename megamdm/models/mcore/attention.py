"""Fused core attention for the local (no Transformer Engine) spec: PyTorch's
``scaled_dot_product_attention`` (flash, cuDNN or memory-efficient kernels on CUDA) in place of
megatron's ``DotProductAttention``, which materialises the ``[b·heads, S, S]`` scores, upcasts them
and runs a separate softmax (twice under selective recompute). Same interface and math: bidirectional
attention, a key-padding mask (``True`` = masked key), GQA, no dropout. On CPU megatron's own
attention stays the default: it is the reference this one is tested against."""

from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        from megatron.core import parallel_state as ps

        if config.context_parallel_size != 1 or getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError("SDPAttention: no context parallelism, vanilla softmax only")
        if config.apply_query_key_layer_scaling or (attention_dropout or config.attention_dropout):
            raise NotImplementedError("SDPAttention: no query-key layer scaling, no attention dropout")
        tp = pg_collection.tp.size() if pg_collection is not None else ps.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        """``query [sq, b, heads, d]``, ``key``/``value [sk, b, groups, d]``, ``attention_mask
        [b, 1, 1, sk]`` (True = masked) -> ``[sq, b, heads·d]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences and attention bias are not supported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        keep = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.scale, enable_gqa=self.heads != self.groups)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
