"""The megatron-core model's state dict in the standalone model's names, and back (torchtitan's
``state_dict_adapter``): what conversion between training checkpoints and the single-GPU format renames.

Key facts about megatron-core 0.16 ``torch_dist`` checkpoints of ``MDMModel`` (measured):
  * tensors are stored *global* (unsplit), so a checkpoint written at any TP/PP reads the same;
  * transformer layers are stacked: ``decoder.layers.<suffix>`` has a leading ``num_layers`` axis;
  * layer-norm weights are stored under TE's fused names (``self_attention.linear_qkv.layer_norm_weight``,
    ``mlp.linear_fc1.layer_norm_weight``) by both the TE spec and the local spec;
  * ``linear_qkv`` interleaves heads per query group: ``[q_0 .. q_{r-1}, k, v]`` for each KV group;
  * ``linear_fc1`` is ``[gate; up]``;
  * ``*._extra_state`` holds TE's FP8 metadata (bytes): not weights, dropped on conversion.

The standalone model uses Hugging Face Llama names. Everything here is plain tensor work: it needs
no megatron-core and streams one tensor at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from ...config import ModelConfig
from ...errors import ConversionError
from ..standalone import MDMTransformer

LAYER_PREFIX = "decoder.layers."

LAYER_SUFFIXES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_norm",
    "input_layernorm.weight": "input_norm",
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.linear_proj.weight": "proj",
    "mlp.linear_fc1.layer_norm_weight": "mlp_norm",
    "pre_mlp_layernorm.weight": "mlp_norm",
    "mlp.linear_fc1.weight": "fc1",
    "mlp.linear_fc2.weight": "fc2",
}

CHECKPOINT_LAYER_KEYS = {  # canonical slot -> the key megatron writes
    "input_norm": "self_attention.linear_qkv.layer_norm_weight",
    "qkv": "self_attention.linear_qkv.weight",
    "proj": "self_attention.linear_proj.weight",
    "mlp_norm": "mlp.linear_fc1.layer_norm_weight",
    "fc1": "mlp.linear_fc1.weight",
    "fc2": "mlp.linear_fc2.weight",
}

GLOBAL_KEYS = {  # megatron key -> standalone name
    "text_embedding.weight": "text_embed.weight",
    "image_embedding.weight": "image_embed.weight",
    "merge_norm.weight": "merge_norm.weight",  # model.merge_norm only
    "merge.weight": "merge.weight",
    "decoder.final_layernorm.weight": "norm.weight",
    "unmerge_norm.weight": "unmerge_norm.weight",  # model.unmerge_norm only
    "unmerge.weight": "unmerge.weight",
    "head.weight": "head.weight",
}


def qkv_interleave(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    ng, r, hd = m.num_query_groups, m.num_attention_heads // m.num_query_groups, m.head_dim
    d = q.shape[1]
    return torch.cat([q.view(ng, r * hd, d), k.view(ng, hd, d), v.view(ng, hd, d)], dim=1).reshape(-1, d)


def qkv_split(qkv: torch.Tensor, m: ModelConfig):
    ng, r, hd = m.num_query_groups, m.num_attention_heads // m.num_query_groups, m.head_dim
    d = qkv.shape[1]
    g = qkv.view(ng, (r + 2) * hd, d)
    return (g[:, : r * hd].reshape(-1, d), g[:, r * hd : (r + 1) * hd].reshape(-1, d), g[:, (r + 1) * hd :].reshape(-1, d))


def _layer_to_standalone(i: int, slot: str, t: torch.Tensor, m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    p = f"layers.{i}."
    if slot == "input_norm":
        yield p + "input_layernorm.weight", t
    elif slot == "mlp_norm":
        yield p + "post_attention_layernorm.weight", t
    elif slot == "qkv":
        q, k, v = qkv_split(t, m)
        yield p + "self_attn.q_proj.weight", q
        yield p + "self_attn.k_proj.weight", k
        yield p + "self_attn.v_proj.weight", v
    elif slot == "proj":
        yield p + "self_attn.o_proj.weight", t
    elif slot == "fc1":
        gate, up = t.chunk(2, dim=0)
        yield p + "mlp.gate_proj.weight", gate
        yield p + "mlp.up_proj.weight", up
    elif slot == "fc2":
        yield p + "mlp.down_proj.weight", t


def _layer_from_standalone(i: int, slot: str, get: Callable[[str], torch.Tensor], m: ModelConfig) -> torch.Tensor:
    p = f"layers.{i}."
    if slot == "input_norm":
        return get(p + "input_layernorm.weight")
    if slot == "mlp_norm":
        return get(p + "post_attention_layernorm.weight")
    if slot == "qkv":
        return qkv_interleave(
            get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"), get(p + "self_attn.v_proj.weight"), m
        )
    if slot == "proj":
        return get(p + "self_attn.o_proj.weight")
    if slot == "fc1":
        return torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], dim=0)
    return get(p + "mlp.down_proj.weight")


def mcore_to_standalone(
    keys: Iterable[str], load: Callable[[str], torch.Tensor], m: ModelConfig, expected_shapes: Mapping[str, tuple] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream standalone ``(name, tensor)`` pairs from megatron keys (stacked checkpoint keys
    ``decoder.layers.<suffix>`` or per-layer ``decoder.layers.<i>.<suffix>``, TE or local names).
    Keys that are not model weights (``_extra_state``, optimizer state, ...) are skipped."""
    keys = list(keys)
    seen = set()
    for key in keys:
        if key.endswith("_extra_state") or "_extra_state/" in key:
            continue
        if key in GLOBAL_KEYS:
            seen.add(GLOBAL_KEYS[key])
            yield GLOBAL_KEYS[key], load(key)
            continue
        if not key.startswith(LAYER_PREFIX):
            continue
        rest = key[len(LAYER_PREFIX) :]
        mt = re.match(r"(\d+)\.(.*)$", rest)
        if mt:
            idx, suffix = int(mt.group(1)), mt.group(2)
        else:
            idx, suffix = None, rest
        slot = LAYER_SUFFIXES.get(suffix)
        if slot is None:
            raise ConversionError(f"unknown megatron key {key!r}: not an MDMModel weight")
        t = load(key)
        if idx is None:  # stacked over layers
            if t.shape[0] != m.num_layers:
                raise ConversionError(f"{key}: {t.shape[0]} stacked layers, config has num_layers={m.num_layers}")
            for i in range(m.num_layers):
                for name, x in _layer_to_standalone(i, slot, t[i], m):
                    seen.add(name)
                    yield name, x.clone()
        else:
            for name, x in _layer_to_standalone(idx, slot, t, m):
                seen.add(name)
                yield name, x
    if expected_shapes is not None:
        missing = sorted(set(expected_shapes) - seen)
        if missing:
            raise ConversionError(f"the megatron checkpoint lacks {len(missing)} model weights, e.g. {missing[:4]}")


def standalone_to_mcore(get: Callable[[str], torch.Tensor], m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Global megatron checkpoint tensors (layers stacked) from standalone weights."""
    for key, name in GLOBAL_KEYS.items():
        if (name == "merge_norm.weight" and not m.merge_norm) or (name == "unmerge_norm.weight" and not m.unmerge_norm):
            continue
        yield key, get(name)
    for slot, suffix in CHECKPOINT_LAYER_KEYS.items():
        yield LAYER_PREFIX + suffix, torch.stack([_layer_from_standalone(i, slot, get, m) for i in range(m.num_layers)])


def expected_standalone_shapes(m: ModelConfig) -> dict[str, tuple]:
    """The standalone model's weight names and shapes for ``m`` (built on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MDMTransformer(m).state_dict().items()}


def checked_shapes(pairs: Iterator[tuple[str, torch.Tensor]], shapes: Mapping[str, tuple], where: str):
    """``pairs`` passed on, each checked to be a weight of ``shapes`` with its shape."""
    for name, t in pairs:
        if name not in shapes:
            raise ConversionError(f"{where}: unexpected weight {name}")
        if tuple(t.shape) != shapes[name]:
            raise ConversionError(f"{where}: {name} has shape {tuple(t.shape)}, the config expects {shapes[name]}")
        yield name, t
