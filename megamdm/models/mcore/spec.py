"""Layer specs: Transformer Engine layers (FP8-capable) when TE imports, megatron-core's local layers
otherwise. Both are Llama-style blocks (RMSNorm, GQA, SwiGLU, RoPE) with bidirectional attention
and a key-padding mask over the prompt padding (``AttnMaskType.padding``)."""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from ..layers import rms_norm
from .attention import SDPAttention


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@functools.cache
def compiled_rms_norm():
    """:func:`rms_norm` through ``torch.compile``: one fused kernel forward and one backward instead
    of six elementwise passes, and no fp32 copy of the input saved for backward. Dynamic shapes, so
    a step's trimmed sequence length does not recompile it."""
    return torch.compile(rms_norm, dynamic=True)


class MegatronRMSNorm(torch.nn.Module):
    """RMSNorm for the local spec, with the same math as the standalone model. Unlike megatron's
    torch-norm wrapper it supports sequence parallelism: its weight is marked ``sequence_parallel``
    so its gradient is all-reduced over the tensor-parallel group. ``compiled``: through
    :func:`compiled_rms_norm` (``train.norm``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, compiled: bool = False, **_):
        super().__init__()
        self.eps = eps
        self.compiled = compiled
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        return (compiled_rms_norm() if self.compiled else rms_norm)(x, self.weight, self.eps)


def layer_spec(use_te: bool, sdpa: bool = False, compiled_norm: bool = False) -> tuple[ModuleSpec, type | ModuleSpec]:
    """(the transformer-layer spec, the final norm). ``sdpa``: the local spec's core attention is
    :class:`~megamdm.models.mcore.attention.SDPAttention` instead of megatron's unfused one;
    ``compiled_norm``: its RMSNorms are compiled."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec, norm = get_gpt_layer_with_transformer_engine_spec(), TENorm
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        norm = ModuleSpec(module=MegatronRMSNorm, params={"compiled": compiled_norm})
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
        if sdpa:
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.padding
    return spec, norm
