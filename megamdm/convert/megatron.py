"""megatron-core ``torch_dist`` training checkpoints <-> the single-GPU format.

``to_single`` reads any TP/PP layout (TE or local spec) one global tensor at a time
(:mod:`megamdm.formats.torch_dist`), renames it through the model's state-dict adapter
(:mod:`megamdm.models.mcore.state_dict_adapter`) and streams it into the sharded safetensors writer;
the EMA weights, when the run kept them, are exported by default. ``from_single`` writes a
model-only ``torch_dist`` run that training loads at any TP/PP.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..compat.dist_ckpt import writer_queue
from ..compat.megatron_cpu import megatron_on_cpu
from ..config import Config, load_config, to_yaml
from ..errors import ConversionError
from ..formats.run_layout import TRACKER, finalize_tracker, iteration_dir, latest_iteration, resolve_iteration_dir
from ..formats.safetensors import LazyTensors
from ..formats.single import read_config, weight_files, write_single
from ..formats.torch_dist import EMA_PREFIX, TorchDistReader, has_ema, load_ema_region
from ..gce import GCEGroups
from ..models.mcore.state_dict_adapter import (
    checked_shapes,
    expected_standalone_shapes,
    mcore_to_standalone,
    standalone_to_mcore,
)
from ..text import load_text_tokenizer
from ..vq import load_image_tokenizer

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
        checked_shapes(pairs, shapes, str(it_dir)),
        config,
        groups,
        image_tok,
        text_tok,
        overwrite=overwrite,
        weights="ema" if use_ema else "raw",
    )


def from_single(single, out, *, iteration: int = 0, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Single-GPU-format directory -> a model-only torch_dist checkpoint run directory
    (``iter_NNNNNNN/`` + tracker + ``config.yaml``), loadable by training at any TP/PP.
    ``overwrite`` replaces a training run in ``out`` (only a run: anything else is refused).

    Runs in one process; needs an initialised (world size 1) process group only inside."""
    # megatron-core (the train extra) is needed by this direction only
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    cfg, _ = read_config(single)
    get = LazyTensors(weight_files(single), dtype)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConversionError(f"{out} already exists; pass --overwrite to replace the training run there")
        if latest_iteration(out) is None:
            raise ConversionError(
                f"{out} is not a training run (no {TRACKER}); --overwrite replaces only runs, so nothing was deleted"
            )
        shutil.rmtree(out)
    it_dir = iteration_dir(out, iteration)
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
