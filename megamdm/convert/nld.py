"""NVIDIA's released NL-Diffusion-Image folder -> the single-GPU format (``megamdm-convert from-nld``).

What the release's files say (its ``config.json``, ``model.safetensors.index.json`` and
``emu3_vqvae/config.json``) and where each part goes in megamdm's model:

* ``encoder.layers.N.*`` (Ministral-3 blocks), ``encoder.norm`` -> ``layers.N.*``, ``norm``; YaRN RoPE
  from ``rope_parameters``; ``encoder.embed_tokens`` -> ``text_embed`` (rows padded to a multiple of 128).
* ``encoder.gen_embedding`` (image vocabulary + 256 rows, the image MASK at ``V + 1``) -> ``image_embed``
  (its MASK row is ``V``).
* ``encoder.downsample_gen.downsample.{norm, conv}``: RMSNorm (eps 1e-6) of each image embedding, then a
  2x2 stride-2 convolution. The convolution is megamdm's concatenation of the four embeddings of a 2x2
  block (row-major) followed by ``merge`` (``Linear(4d -> d)``): ``merge[o, (2 dy + dx) d + c] = conv[o, c, dy, dx]``.
* ``encoder.upsample_gen.upsample.{norm, conv}``, after the final norm: RMSNorm, then a 2x2 stride-2
  transposed convolution, which is ``unmerge`` (``Linear(d -> 4d)``) and the inverse layout:
  ``unmerge[(2 dy + dx) d + o, c] = conv[c, o, dy, dx]``.
* ``encoder.gen_predictor`` -> ``head``.
* Dropped (not used for text-to-image): ``diffusion_head``, ``encoder.image_newline``,
  ``encoder.mm_projector.*``, ``encoder.vision_tower.*`` and ``encoder.vqvae.*`` (the image tokenizer is
  read from ``emu3_vqvae/``). Any other key is refused.

The prompt layout is ``text.template: nld`` (``megamdm/text.py``); the last tokens of the assistant turn
follow the image (``model.text_after_image``). Tensors are streamed one at a time into shards of at most
:data:`SHARD_BYTES`, so host memory stays within a few GB of the largest tensor. Nothing of NVIDIA's
code or weights is part of megamdm: this reads a folder the user downloaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import Config, ModelConfig
from ..errors import ConversionError
from ..formats.single import PICKLE_SUFFIXES, write_single
from ..gce import GCEGroups
from ..sampling.settings import SampleConfig, preset_settings
from ..text import HFTokenizer, template_tail
from ..vq.emu3_vq import Emu3VQTokenizer
from .hf import model_config_from_hf

ARCHITECTURE = "NemotronLabsDiffusionImageForMaskedDiffusion"
DROPPED = ("diffusion_head.", "encoder.image_newline", "encoder.mm_projector.", "encoder.vision_tower.", "encoder.vqvae.")
SHARD_BYTES = 2**30  # output shards: the writer holds one in memory
NLD_PROMPT_TOKENS = 512  # text.max_len: the conversation's ~70 template tokens and a long caption
_LAYER = re.compile(r"^encoder\.(layers\.\d+\..+)$")


def read_release_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder}: no config.json; not a downloaded NL-Diffusion-Image folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: malformed JSON ({e})") from None
    arch = (raw.get("architectures") or ["?"])[0]
    if arch != ARCHITECTURE:
        raise ConversionError(f"{path}: architecture {arch!r} is not NL-Diffusion-Image's ({ARCHITECTURE})")
    if not raw.get("downsample", False) or raw.get("d_model_gen", raw["hidden_size"]) != raw["hidden_size"]:
        raise ConversionError(f"{path}: only the released layout (downsample: true, d_model_gen = hidden_size) is supported")
    return raw


def model_config_from_release(raw: dict, image_vocab_size: int, text_after_image: int) -> ModelConfig:
    m = model_config_from_hf({**raw, "architectures": ["Ministral3ForCausalLM"]}, image_vocab_size)
    m.merge_norm = m.unmerge_norm = True
    m.merge_norm_eps = 1e-6
    m.text_after_image = text_after_image
    m.validate()
    return m


def release_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index; a missing shard or a pickle is one line."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        what = f"only pickle files ({', '.join(pickles)}), which megamdm does not read" if pickles else "no weights index"
        raise ConversionError(f"{folder}: model.safetensors.index.json not found ({what})")
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {}
    for name, fname in weight_map.items():
        if not fname.endswith(".safetensors"):
            raise ConversionError(f"{index}: {name} is stored in {fname}, not a safetensors file; megamdm reads no pickle")
        files[name] = folder / fname
    missing = sorted({p.name for p in files.values() if not p.is_file()})
    if missing:
        raise ConversionError(f"{folder}: shard {missing[0]} named by the index is missing ({len(missing)} missing)")
    return files


def target_name(key: str) -> str | None:
    """megamdm's name for a release tensor; None for a dropped one; ConversionError for an unknown one."""
    m = _LAYER.match(key)
    if m:
        return m.group(1)
    fixed = {
        "encoder.norm.weight": "norm.weight",
        "encoder.embed_tokens.weight": "text_embed.weight",
        "encoder.gen_embedding.weight": "image_embed.weight",
        "encoder.downsample_gen.downsample.norm.weight": "merge_norm.weight",
        "encoder.downsample_gen.downsample.conv.weight": "merge.weight",
        "encoder.upsample_gen.upsample.norm.weight": "unmerge_norm.weight",
        "encoder.upsample_gen.upsample.conv.weight": "unmerge.weight",
        "encoder.gen_predictor.weight": "head.weight",
    }
    if key in fixed:
        return fixed[key]
    if key.startswith(DROPPED):
        return None
    raise ConversionError(f"release tensor {key!r} is not part of NL-Diffusion-Image's text-to-image model as megamdm knows it")


def release_shapes(raw: dict, m: ModelConfig) -> dict[str, tuple]:
    """The shape each used release tensor must have."""
    d, v = m.hidden_size, m.image_vocab_size
    shapes = {
        "encoder.norm.weight": (d,),
        "encoder.embed_tokens.weight": (int(raw["vocab_size"]), d),
        "encoder.gen_embedding.weight": (v + 256, d),
        "encoder.downsample_gen.downsample.norm.weight": (d,),
        "encoder.downsample_gen.downsample.conv.weight": (d, d, 2, 2),
        "encoder.upsample_gen.upsample.norm.weight": (d,),
        "encoder.upsample_gen.upsample.conv.weight": (d, d, 2, 2),
        "encoder.gen_predictor.weight": (v, d),
    }
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    per_layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (m.ffn_hidden_size, d),
        "mlp.up_proj.weight": (m.ffn_hidden_size, d),
        "mlp.down_proj.weight": (d, m.ffn_hidden_size),
    }
    for i in range(m.num_layers):
        shapes.update({f"encoder.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def convert_tensor(key: str, t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """A release tensor in megamdm's layout (:func:`target_name` names it)."""
    d, v = m.hidden_size, m.image_vocab_size
    if key == "encoder.embed_tokens.weight":
        out = torch.zeros(m.text_vocab_size, d, dtype=t.dtype)
        out[: t.shape[0]] = t
        return out
    if key == "encoder.gen_embedding.weight":  # the release's image MASK is id V + 1, megamdm's is V
        out = torch.zeros(m.image_embed_rows, d, dtype=t.dtype)
        out[:v] = t[:v]
        out[v] = t[v + 1]
        return out
    if key == "encoder.downsample_gen.downsample.conv.weight":  # [o, c, dy, dx] -> [o, (2dy + dx) d + c]
        return t.permute(0, 2, 3, 1).reshape(d, 4 * d).contiguous()
    if key == "encoder.upsample_gen.upsample.conv.weight":  # [c, o, dy, dx] -> [(2dy + dx) d + o, c]
        return t.permute(2, 3, 1, 0).reshape(4 * d, d).contiguous()
    return t


def from_nld(
    folder,
    out,
    *,
    groups=None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Convert a downloaded NL-Diffusion-Image folder. ``groups``: GCE groups for fine-tuning (default: the
    release's ``group_ce_weight``, ``{n_groups: weight}``, over consecutive ids; its grouping is not published)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"release folder not found: {folder}")
    raw = read_release_config(folder)
    files = release_files(folder)
    vq_dir = folder / raw.get("mm_vqvae", "emu3_vqvae")
    try:
        image_tok = Emu3VQTokenizer.load(vq_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(f"image tokenizer: {e}") from None
    mask_id = int(raw.get("mask_token_id", 100))
    mask_token = _token_string(folder, mask_id)
    text_tok = HFTokenizer(folder, mask_token=mask_token)
    try:
        tail = template_tail(text_tok, "nld")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    m = model_config_from_release(raw, image_tok.vocab_size, tail.after_image)
    shapes = release_shapes(raw, m)
    missing = sorted(set(shapes) - set(files))
    if missing:
        raise ConversionError(f"{folder}: tensor {missing[0]} is missing from the index ({len(missing)} missing)")
    for key in files:
        target_name(key)  # unknown keys fail before anything is written
    if groups is None:
        groups = _release_groups(raw, m.image_vocab_size)
    elif groups.vocab_size != m.image_vocab_size:
        raise ConversionError(
            f"GCE groups cover {groups.vocab_size} ids, the release's image vocabulary is {m.image_vocab_size}"
        )

    cfg = Config(model=m)
    cfg.text.template, cfg.text.drop_len, cfg.text.max_len = "nld", -1, NLD_PROMPT_TOKENS
    cfg.text.mask_token = mask_token
    cfg.image_tokenizer.kind = "emu3"
    cfg.sample = nld_sample_config()
    cfg.validate()

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[Path, list[str]] = {}
        for key in shapes:
            by_file.setdefault(files[key], []).append(key)
        for path, keys in by_file.items():
            for key in keys:  # opened per tensor: a shard's mapped pages are let go as soon as it is read
                with safe_open(str(path), framework="pt") as f:
                    t = f.get_tensor(key)
                if tuple(t.shape) != shapes[key]:
                    raise ConversionError(f"{path.name}: {key} has shape {tuple(t.shape)}, expected {shapes[key]}")
                t = convert_tensor(key, t, m)
                yield target_name(key), t.to(dtype) if dtype is not None else t

    return write_single(out, stream(), cfg, groups, image_tok, text_tok, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def nld_sample_config():
    """The release's sampler: ``SampleConfig`` with the ``nld`` preset, at 1024 px."""
    return SampleConfig(**preset_settings("nld"), height=1024, width=1024)


def _token_string(folder: Path, token_id: int) -> str:
    from tokenizers import Tokenizer  # the hf extra: only the release's conversion reads a tokenizer.json

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise ConversionError(f"{folder}: no tokenizer.json (the release's text tokenizer)")
    tok = Tokenizer.from_file(str(tj)).id_to_token(token_id)
    if tok is None:
        raise ConversionError(f"{folder}: the text tokenizer has no token {token_id} (config.json mask_token_id)")
    return tok


def _release_groups(raw: dict, vocab: int):
    spec = raw.get("group_ce_weight") or "{}"
    pairs = re.findall(r"(\d+)\s*:\s*([^,}\s]+)", str(spec))
    try:
        levels = {int(k): float(w) for k, w in pairs}
    except ValueError:
        levels = None
    if levels is None or len(pairs) != str(spec).count(":"):
        raise ConversionError(
            f"config.json group_ce_weight {spec!r} is not {{groups: weight, ...}} (e.g. {{16384: 0.2}}); "
            "pass --gce-groups to choose the groups yourself"
        )
    sizes, weights = [], []
    for n_groups, w in sorted(levels.items(), reverse=True):
        if n_groups < 1 or vocab % n_groups:
            raise ConversionError(f"config.json group_ce_weight {spec}: {n_groups} groups do not divide {vocab} ids")
        sizes.append(vocab // n_groups)
        weights.append(w)
    return GCEGroups.identity(vocab, sizes or [8], weights or [0.0])
