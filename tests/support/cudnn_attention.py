"""An emulation, on megatron's local core attention, of how cuDNN fused attention (Transformer
Engine's pick on Hopper) reads a ``[b, 1, 1, s]`` key-padding mask: it counts the valid keys of each
sample and assumes they are the first ``count`` positions (right padding), for keys and queries alike.
A layout that puts padding anywhere but at the end of the sequence gives different results under it."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


class PrefixCountAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        s = key.shape[0]
        count = (~attention_mask.reshape(attention_mask.shape[0], -1)[:, -s:]).sum(-1)  # valid keys per sample
        prefix = torch.arange(s, device=key.device)[None, :] >= count[:, None]  # True = masked
        out = super().forward(query, key, value, prefix[:, None, None, :], attn_mask_type, attention_bias, packed_seq_params)
        # queries past the count are "padding" to cuDNN: no output there
        keep_q = ~prefix.transpose(0, 1)[:, :, None]  # [s, b, 1]
        return out * keep_q.to(out.dtype)


@contextlib.contextmanager
def cudnn_padding_semantics():
    """Build megamdm's megatron-core models with :class:`PrefixCountAttention` as core attention."""
    from megamdm.models.mcore import model as mcore_model

    real = mcore_model.layer_spec

    def spec(use_te: bool, sdpa: bool = False, compiled_norm: bool = False):
        layer, norm = real(use_te, sdpa, compiled_norm)
        layer.submodules.self_attention.submodules.core_attention = PrefixCountAttention
        return layer, norm

    with mock.patch.object(mcore_model, "layer_spec", spec):
        yield
