"""Checkpoint conversion: megatron-core ``torch_dist`` <-> single-GPU format, and Hugging Face LLM -> MDM.

Key facts about megatron-core 0.16 ``torch_dist`` checkpoints of ``MDMModel`` (measured):
  * tensors are stored *global* (unsplit), so a checkpoint written at any TP/PP reads the same;
  * transformer layers are stacked: ``decoder.layers.<suffix>`` has a leading ``num_layers`` axis;
  * layer-norm weights are stored under TE's fused names (``self_attention.linear_qkv.layer_norm_weight``,
    ``mlp.linear_fc1.layer_norm_weight``) by both the TE spec and the local spec;
  * ``linear_qkv`` interleaves heads per query group: ``[q_0 .. q_{r-1}, k, v]`` for each KV group;
  * ``linear_fc1`` is ``[gate; up]``;
  * ``*._extra_state`` holds TE's FP8 metadata (bytes): not weights, dropped on conversion.

The single-GPU model uses Hugging Face Llama names, so ``from-hf`` is a renaming of the backbone.
All converters stream: the megatron reader loads one stacked tensor at a time into the sharded
safetensors writer, and the HF reader memory-maps its shards.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .config import Config, ModelConfig
from .errors import MegamdmError

LAYER_PREFIX = "decoder.layers."
# per-layer megatron suffix (TE or local spec name) -> canonical slot
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


class ConversionError(MegamdmError):
    """The inputs of a conversion do not fit together."""


# ---- per-layer layouts ---------------------------------------------------------------------------
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
    from .models.standalone import MDMTransformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MDMTransformer(m).state_dict().items()}


def _check_shapes(pairs: Iterator[tuple[str, torch.Tensor]], shapes: Mapping[str, tuple], where: str):
    for name, t in pairs:
        if name not in shapes:
            raise ConversionError(f"{where}: unexpected weight {name}")
        if tuple(t.shape) != shapes[name]:
            raise ConversionError(f"{where}: {name} has shape {tuple(t.shape)}, the config expects {shapes[name]}")
        yield name, t


# ---- torch_dist reading (no megatron, no process group) ------------------------------------------
class TorchDistReader:
    """Reads global tensors of a megatron ``torch_dist`` checkpoint one key at a time."""

    def __init__(self, directory):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(directory)
        if not (self.dir / ".metadata").is_file():
            raise ConversionError(f"{self.dir}: not a torch_dist checkpoint (no .metadata)")
        self.reader = FileSystemReader(str(self.dir))
        try:
            md = self.reader.read_metadata()
        except Exception as e:  # noqa: BLE001 - a cut or foreign .metadata: any unpickling error
            raise ConversionError(
                f"{self.dir}/.metadata cannot be read ({type(e).__name__}); the checkpoint is damaged"
            ) from None
        self.meta = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        files = {getattr(info, "relative_path", None) for info in (md.storage_data or {}).values()} - {None}
        missing = sorted(f for f in files if not (self.dir / f).is_file())
        if missing:
            raise ConversionError(
                f"{self.dir}: {len(missing)} of its {len(files)} shard files are missing ({missing[0]}, ...); the "
                "checkpoint is incomplete"
            )

    def keys(self) -> list[str]:
        return list(self.meta)

    @functools.cached_property
    def ema_boxes(self) -> dict[str, list[tuple[str, tuple, tuple]]]:
        """The saved EMA boxes of each model key: ``(checkpoint key, offset, shape)`` (:func:`ema_key`)."""
        boxes: dict[str, list] = {}
        for k in self.meta:
            if k.startswith(EMA_PREFIX):
                key, off, shp = k[len(EMA_PREFIX) :].rsplit(":", 2)
                boxes.setdefault(key, []).append((k, tuple(map(int, off.split(","))), tuple(map(int, shp.split(",")))))
        return boxes

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        import warnings

        import torch.distributed.checkpoint as dcp

        md = self.meta[key]
        t = torch.empty(md.size, dtype=md.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp.load({key: t}, storage_reader=self.reader, no_dist=True)
            except (OSError, EOFError, RuntimeError, ValueError, dcp.api.CheckpointException) as e:
                raise ConversionError(
                    f"{self.dir}: cannot read {key} ({type(e).__name__}); a shard file is cut short or damaged"
                ) from None
        return t if dtype is None else t.to(dtype)


# ---- EMA weights in a training checkpoint (megamdm/training/ema.py writes them) ----------------------
EMA_PREFIX = "ema:"


def ema_key(key: str, offset: Sequence[int], shape: Sequence[int]) -> str:
    """The checkpoint key of the EMA of box ``offset``/``shape`` of model tensor ``key`` (a 1-D tensor)."""
    return f"{EMA_PREFIX}{key}:{','.join(map(str, offset))}:{','.join(map(str, shape))}"


def has_ema(reader: TorchDistReader) -> bool:
    return bool(reader.ema_boxes)


def load_ema_region(reader: TorchDistReader, key: str, offset: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The EMA of the box ``offset``/``shape`` of model tensor ``key`` (fp32), assembled from the saved
    boxes that overlap it, whatever the layout they were saved at."""
    out = torch.empty(tuple(shape), dtype=torch.float32)
    covered = 0
    for saved, o, sh in reader.ema_boxes.get(key, []):
        lo = [max(a, b) for a, b in zip(o, offset)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(o, sh, offset, shape)]
        if any(x >= y for x, y in zip(lo, hi)):
            continue
        t = reader.load(saved).view(sh)
        out[tuple(slice(x - b, y - b) for x, y, b in zip(lo, hi, offset))] = t[
            tuple(slice(x - a, y - a) for x, y, a in zip(lo, hi, o))
        ]
        covered += math.prod(y - x for x, y in zip(lo, hi))
    if covered != math.prod(shape):
        raise ConversionError(f"{reader.dir}: the EMA weights of {key} are missing or incomplete")
    return out


# ---- the converters -----------------------------------------------------------------------------
def resolve_iteration_dir(path) -> Path:
    """A run directory (with ``latest_checkpointed_iteration.txt``) or an ``iter_NNNNNNN`` directory."""
    from .run_layout import RunLayoutError, iteration_dir, latest_iteration

    p = Path(path)
    try:
        it = latest_iteration(p)
    except RunLayoutError as e:
        raise ConversionError(str(e)) from None
    if it is not None:
        return iteration_dir(p, it)
    if (p / ".metadata").is_file():
        return p
    raise ConversionError(
        f"{p}: neither a training run directory (no latest_checkpointed_iteration.txt) nor a torch_dist iteration directory"
    )


WEIGHTS = ("auto", "ema", "raw")


def to_single(
    checkpoint,
    out,
    *,
    dtype: torch.dtype | None = None,
    config: Config | None = None,
    overwrite: bool = False,
    weights: str = "auto",
) -> Path:
    """torch_dist checkpoint (any TP/PP, TE or local spec) -> single-GPU-format directory.

    ``weights``: ``ema`` the checkpoint's EMA weights, ``raw`` the last step's, ``auto`` the EMA when
    the checkpoint has one; ``config.json`` records which (``weights``)."""
    from .config import load_config
    from .gce import GCEGroups
    from .pretrained import write_single
    from .text import load_text_tokenizer
    from .vq import load_image_tokenizer

    it_dir = resolve_iteration_dir(checkpoint)
    if config is None:
        cfg_file = it_dir / "config.yaml"
        if not cfg_file.is_file():
            raise ConversionError(f"{it_dir}: no config.yaml; pass the training config explicitly")
        config = load_config(cfg_file, migrate=True)  # as saved, by this or an older megamdm
    m = config.model
    reader = TorchDistReader(it_dir)
    shapes = expected_standalone_shapes(m)
    if not config.gce.groups_file:
        raise ConversionError("the config has no gce.groups_file; the single-GPU format needs the GCE groups")
    groups = GCEGroups.load(config.gce.groups_file).with_weights(config.gce.group_weights)
    image_tok = load_image_tokenizer(config.image_tokenizer.kind, config.image_tokenizer.path)
    text_tok = load_text_tokenizer(config.text.tokenizer, config.text.mask_token)
    if weights not in WEIGHTS:
        raise ConversionError(f"--weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    if weights == "ema" and not has_ema(reader):
        raise ConversionError(f"{it_dir} holds no EMA weights (it was trained with train.ema_decay=0); use --weights raw")
    use_ema = has_ema(reader) if weights == "auto" else weights == "ema"

    def load(key):
        if not use_ema:
            return reader.load(key, dtype)
        md = reader.meta[key]
        return load_ema_region(reader, key, (0,) * len(md.size), tuple(md.size)).to(dtype or md.properties.dtype)

    model_keys = [k for k in reader.keys() if not k.startswith(EMA_PREFIX)]
    pairs = mcore_to_standalone(model_keys, load, m, expected_shapes=shapes)
    return write_single(
        out,
        _check_shapes(pairs, shapes, str(it_dir)),
        config,
        groups,
        image_tok,
        text_tok,
        overwrite=overwrite,
        weights="ema" if use_ema else "raw",
    )


def from_single(single, out, *, iteration: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Single-GPU-format directory -> a model-only torch_dist checkpoint run directory
    (``iter_NNNNNNN/`` + tracker + ``config.yaml``), loadable by training at any TP/PP.

    Runs in one process; needs an initialised (world size 1) process group only inside."""
    import contextlib

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from safetensors import safe_open

    from .compat.dist_ckpt import writer_queue
    from .compat.megatron_cpu import megatron_on_cpu
    from .config import to_yaml
    from .pretrained import read_config, weight_files
    from .run_layout import finalize_tracker

    cfg, _ = read_config(single)
    files = weight_files(single)
    handles = {}

    def get(name):
        p = files[name]
        if p not in handles:
            handles[p] = safe_open(str(p), framework="pt")
        t = handles[p].get_tensor(name)
        return t.to(dtype) if dtype is not None else t

    out = Path(out)
    it_dir = out / f"iter_{iteration:07d}"
    it_dir.mkdir(parents=True, exist_ok=False)
    sharded = {
        key: ShardedTensor.from_rank_offsets(key, t.contiguous(), replica_id=0)
        for key, t in standalone_to_mcore(get, cfg.model)
    }
    own_pg = not dist.is_initialized()
    with contextlib.ExitStack() as stack:
        if not torch.cuda.is_available():
            stack.enter_context(megatron_on_cpu())
        if own_pg:  # a world-size-1 gloo group without networking, for this call only
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            stack.callback(dist.destroy_process_group)
        stack.enter_context(writer_queue())
        dist_checkpointing.save(sharded, str(it_dir))
    (it_dir / "config.yaml").write_text(to_yaml(cfg))
    finalize_tracker(out, iteration)
    return out


# ---- Hugging Face Llama / Mistral -> single-GPU format ----------------------------------------------
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
        from safetensors import safe_open

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
    from safetensors import safe_open

    from .models.standalone import MDMTransformer
    from .pretrained import write_single
    from .text import HFTokenizer

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
    handles = {}

    def get(name):
        p = files[name]
        if p not in handles:
            handles[p] = safe_open(str(p), framework="pt")
        t = handles[p].get_tensor(name)
        return t.to(dtype) if dtype is not None else t

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
        out, _check_shapes(stream(), shapes, str(hf_dir)), config, groups, image_tokenizer, text_tok, overwrite=overwrite
    )
