"""A Llama / Mistral / Ministral-3 Hugging Face LLM -> a single-GPU-format MDM (``megamdm-convert from-hf``).

The single-GPU model uses Hugging Face Llama names, so the backbone and the text embeddings are a
renaming; the image embedding, merge, unmerge and head are freshly initialised. YaRN RoPE (attention
factor 1, as NL-Diffusion-Image's) is carried over; the shards are memory-mapped and streamed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import Config, ModelConfig
from ..errors import ConversionError
from ..formats.safetensors import LazyTensors
from ..formats.single import write_single
from ..models.mcore.state_dict_adapter import checked_shapes, expected_standalone_shapes
from ..models.standalone import MDMTransformer
from ..text import HFTokenizer

HF_SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "LlamaModel", "MistralModel", "Ministral3ForCausalLM")


def model_config_from_hf(hf: dict, image_vocab_size: int, pad_multiple: int = 128) -> ModelConfig:
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in HF_SUPPORTED:
        raise ConversionError(f"unsupported Hugging Face architecture {arch!r}; supported: {', '.join(HF_SUPPORTED)}")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps RoPE settings here
    scaling = hf.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind not in (None, "default", "yarn"):
        raise ConversionError(f"RoPE scaling {scaling} is not supported (plain RoPE or YaRN)")
    yarn = {}
    if kind == "yarn":
        factor = float(scaling["factor"])
        ms, ms_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = scaling.get("attention_factor")
        if attention is None:  # transformers' rule
            attention = (_yarn_mscale(factor, ms) / _yarn_mscale(factor, ms_all)) if ms and ms_all else _yarn_mscale(factor)
        if abs(attention - 1.0) > 1e-9 or scaling.get("truncate", True) is False:
            raise ConversionError(
                f"YaRN with attention factor {attention:.4f} or truncate=false is not supported (factor 1, as "
                "NL-Diffusion-Image's mscale = mscale_all_dim, only)"
            )
        yarn = dict(
            rope_scaling="yarn",
            rope_factor=factor,
            rope_original_max_positions=int(scaling["original_max_position_embeddings"]),
            rope_beta_fast=float(scaling.get("beta_fast") or 32),
            rope_beta_slow=float(scaling.get("beta_slow") or 1),
        )
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    nh = hf["num_attention_heads"]
    d = hf["hidden_size"]
    m = ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=d,
        num_attention_heads=nh,
        num_query_groups=hf.get("num_key_value_heads") or nh,
        head_dim=hf.get("head_dim") or d // nh,
        ffn_hidden_size=hf["intermediate_size"],
        image_vocab_size=image_vocab_size,
        text_vocab_size=(hf["vocab_size"] + pad_multiple - 1) // pad_multiple * pad_multiple,
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        init_std=float(hf.get("initializer_range", 0.02)),
        vocab_pad_multiple=pad_multiple,
        **yarn,
    )
    m.validate()
    return m


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _hf_files(hf_dir: Path) -> dict[str, Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: hf_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = hf_dir / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise ConversionError(f"{hf_dir}: no model.safetensors(.index.json); only safetensors checkpoints are read")


def from_hf(
    hf_dir,
    out,
    *,
    image_tokenizer,
    groups,
    config: Config | None = None,
    text_mask_token: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """A Llama/Mistral-style HF checkpoint -> single-GPU-format MDM: backbone and text embeddings
    from the LLM, image embedding / merge / unmerge / head freshly initialised."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json; not a Hugging Face model directory")
    hf = json.loads(cfg_path.read_text())
    m = model_config_from_hf(hf, image_tokenizer.vocab_size)
    if groups.vocab_size != m.image_vocab_size:
        raise ConversionError(f"GCE groups cover {groups.vocab_size} ids, the image tokenizer has {m.image_vocab_size}")
    config = config or Config()
    config.model = m
    config.text.tokenizer = str(hf_dir)
    if text_mask_token:
        config.text.mask_token = text_mask_token
    text_tok = HFTokenizer(hf_dir, mask_token=config.text.mask_token)
    files = _hf_files(hf_dir)
    prefix = "model." if any(k.startswith("model.") for k in files) else ""
    get = LazyTensors(files, dtype)

    shapes = expected_standalone_shapes(m)
    with torch.device("meta"):
        fresh_names = [
            k
            for k in MDMTransformer(m).state_dict()
            if not k.startswith("layers.") and k not in ("text_embed.weight", "norm.weight")
        ]
    wanted = [prefix + k for k in shapes if k.startswith("layers.")] + [prefix + "embed_tokens.weight", prefix + "norm.weight"]
    missing = [k for k in wanted if k not in files]
    if missing:
        raise ConversionError(f"{hf_dir}: missing {len(missing)} backbone tensors, e.g. {missing[:3]}")
    gen = torch.Generator().manual_seed(seed)

    def stream():
        emb = get(prefix + "embed_tokens.weight")
        text = torch.zeros(m.text_vocab_size, m.hidden_size, dtype=emb.dtype)
        text[: emb.shape[0]] = emb
        yield "text_embed.weight", text
        yield "norm.weight", get(prefix + "norm.weight")
        for k in shapes:
            if k.startswith("layers."):
                yield k, get(prefix + k)
        ref_dtype = emb.dtype
        for k in fresh_names:
            yield k, (torch.randn(shapes[k], generator=gen) * m.init_std).to(ref_dtype)

    return write_single(
        out, checked_shapes(stream(), shapes, str(hf_dir)), config, groups, image_tokenizer, text_tok, overwrite=overwrite
    )
