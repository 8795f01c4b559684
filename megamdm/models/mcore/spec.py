"""Layer specs: Transformer Engine layers (FP8-capable) when TE imports, megatron-core's local layers
otherwise. Both are Llama-style blocks (RMSNorm, GQA, SwiGLU, RoPE) with bidirectional attention
and a key-padding mask over the prompt padding (``AttnMaskType.padding``)."""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from ..standalone import rms_norm


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


class MegatronRMSNorm(torch.nn.Module):
    """RMSNorm for the local spec, with the same math as the standalone model. Unlike megatron's
    torch-norm wrapper it supports sequence parallelism: its weight is marked ``sequence_parallel``
    so its gradient is all-reduced over the tensor-parallel group."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def layer_spec(use_te: bool, sdpa: bool = False) -> tuple[ModuleSpec, type]:
    """(the transformer-layer spec, the final-norm class). ``sdpa``: the local spec's core attention
    is :class:`~megamdm.models.mcore.attention.SDPAttention` instead of megatron's unfused one."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec, norm = get_gpt_layer_with_transformer_engine_spec(), TENorm
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec, norm = get_gpt_layer_local_spec(normalization="RMSNorm"), MegatronRMSNorm
        spec.submodules.input_layernorm = MegatronRMSNorm
        spec.submodules.pre_mlp_layernorm = MegatronRMSNorm
        if sdpa:
            from .attention import SDPAttention

            spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.padding
    return spec, norm
