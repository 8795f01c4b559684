"""Distributed checkpoints (megatron-core ``dist_checkpointing``, ``torch_dist``) of the training state.

The run directory's layout (``iter_NNNNNNN/`` folders, the atomic ``latest`` tracker) is
:mod:`megamdm.formats.run_layout`'s; the writer needs an active :func:`megamdm.compat.dist_ckpt.writer_queue`
(the trainer holds one for the whole run).
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from ..config import load_config_text, with_absolute_paths
from ..errors import CheckpointError
from ..formats.run_layout import finalize_tracker, iteration_dir
from .optim import init_torch_adam_state, uses_torch_adam


def load_model_weights(model, checkpoint_dir) -> None:
    """Load only the model weights of a torch_dist checkpoint into an (unwrapped) model at this
    process's TP/PP layout. ``_extra_state`` (TE's FP8 metadata) may be absent: it is then left
    fresh, as after a conversion from the single-GPU format."""
    sd = model.sharded_state_dict()
    state, missing, _ = dist_checkpointing.load(sd, str(checkpoint_dir), strict=StrictHandling.RETURN_ALL)
    real_missing = sorted(k for k in missing if "_extra_state" not in k)
    if real_missing:
        raise RuntimeError(f"{checkpoint_dir}: the checkpoint lacks model weights {real_missing[:5]}")
    state = {k: v for k, v in state.items() if "_extra_state" not in k}
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if "_extra_state" not in k]
    if bad or result.unexpected_keys:
        raise RuntimeError(
            f"{checkpoint_dir}: weights do not fit the model: missing {bad[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


# ---- full training state -------------------------------------------------------------------------
def _rng_state(device: str) -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if device == "cuda" else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict, device: str) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _rng_object(device: str):
    lay = _layout()
    return ShardedObject(
        "rng_state",
        _rng_state(device),
        (lay["pp"], lay["tp"], lay["dp"]),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()),
        replica_id=0,
    )


RESHARDABLE_FORMAT = "fully_reshardable"

# what a checkpoint's weights and data order mean: resuming with any of these changed is another model
IDENTITY_SECTIONS = ("model",)
IDENTITY_KEYS = ("text.tokenizer", "text.mask_token", "gce.groups_file", "gce.group_sizes", "image_tokenizer.path")


def identity_changes(saved_yaml: str, cfg) -> list[str]:
    """``key: saved -> now`` for each model or tokenizer setting that differs from the checkpoint's."""

    saved = with_absolute_paths(load_config_text(saved_yaml))  # older runs saved them relative to the working directory
    flat = {}
    for section in IDENTITY_SECTIONS:
        for k, v in dataclasses.asdict(getattr(saved, section)).items():
            flat[f"{section}.{k}"] = (v, getattr(getattr(cfg, section), k))
    for key in IDENTITY_KEYS:
        section, k = key.split(".")
        flat[key] = (getattr(getattr(saved, section), k), getattr(getattr(cfg, section), k))
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in flat.items() if a != b]


def optim_metadata(sharding: str) -> dict:
    """The sharded-state-dict metadata of a distributed-optimizer format.

    ``dp_reshardable``: each rank writes its own slice of the optimizer buffers, with no
    communication and no copy; it loads at the same TP/PP size and any DP size.
    ``fully_reshardable``: the optimizer state in model-parameter shapes, loadable at any TP/PP/DP; to
    write it, a TP/PP shard's whole fp32 parameters and Adam moments are gathered (over gloo, onto DP
    rank 0 alone: 12 bytes per parameter of the shard on that rank's host)."""
    md = {"distrib_optim_sharding_type": sharding}
    if sharding == RESHARDABLE_FORMAT:
        md["distrib_optim_fully_reshardable_mem_efficient"] = True
    return md


def _read_checkpoint(read, it_dir):
    """``read()``, with a missing, cut or damaged file of ``it_dir`` as one CheckpointError."""

    try:
        return read()
    except (OSError, EOFError, CheckpointException, CheckpointingException) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"{it_dir}: cannot be read ({type(e).__name__}: {first}); a file is missing, cut short or damaged: "
            "resume from an earlier iter_NNNNNNN"
        ) from None


class Checkpointer:
    """Saves and loads the whole training state with megatron-core dist_checkpointing.

    A checkpoint holds the model, the optimizer, the LR scheduler, the RNG states, the data-loader
    position and the resolved config. The optimizer is saved ``dp_reshardable`` (each rank writes
    its own shard; the checkpoint resumes at the same TP/PP and any DP) unless ``reshardable`` asks
    for the fully reshardable form: ``final`` for the run's last save, ``always`` for every save.
    Writing is spread over the data-parallel ranks (megatron's fully parallel save strategy).
    RNG states load only at the layout they were saved with. ``async_save`` writes in a background
    process while training goes on; the ``latest`` tracker and the pruning of old iterations
    (``keep_last``) happen only once a save is complete on every rank."""

    def __init__(self, run_dir, *, keep_last: int = 3, async_save: bool = False, device: str = "cpu", reshardable: str = "dp"):
        self.run_dir = Path(run_dir)
        self.keep_last, self.device, self.reshardable = keep_last, device, reshardable
        self.rank = dist.get_rank()
        self.queue = None
        self._strategies: dict[str, object] = {}
        if async_save:
            self.queue = AsyncCallsQueue()

    def _strategy(self, sharding: str):
        """The fully parallel save strategy over the DP group, one per format (it caches the
        distribution of the writes, which depends on the state dict's structure)."""
        if sharding not in self._strategies:
            self._strategies[sharding] = FullyParallelSaveStrategyWrapper(
                get_default_save_sharded_strategy(),
                ps.get_data_parallel_group(with_context_parallel=True),
                do_cache_distribution=True,
            )
        return self._strategies[sharding]

    def _sharding_for(self, final: bool) -> str:
        full = self.reshardable == "always" or (final and self.reshardable == "final")
        return RESHARDABLE_FORMAT if full else "dp_reshardable"

    def save(
        self,
        iteration: int,
        model,
        optimizer,
        scheduler,
        loader,
        config_yaml: str,
        *,
        final: bool = False,
        ema=None,
        valid: dict | None = None,
    ) -> str:
        """Save (or schedule, with ``async_save``) ``iteration``; returns the optimizer format written.
        ``ema``: a :class:`~megamdm.training.ema.ShardedEMA`, saved beside the weights; ``valid``: the
        latest validation metrics, kept in the checkpoint's common state."""

        self.maybe_finalize(blocking=True)  # one save in flight at a time
        it_dir = iteration_dir(self.run_dir, iteration)
        if self.rank == 0:
            if it_dir.exists():  # a stale, incomplete save of the same iteration
                shutil.rmtree(it_dir)
            it_dir.mkdir(parents=True)
        dist.barrier()
        sharding = self._sharding_for(final)
        md = optim_metadata(sharding)
        model_sd = model.sharded_state_dict(metadata=md)
        state = {
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, metadata=md),
            "optim_sharding": sharding,
            "scheduler": scheduler.state_dict(),
            "iteration": iteration,
            "loader": loader.state_dict(),
            "layout": _layout(),
            "config": config_yaml,
            "rng": _rng_object(self.device),
            "valid": dict(valid or {}),
        }
        if ema is not None:
            state["ema"] = ema.sharded_state_dict()
            state["ema_updates"] = ema.updates

        def finalize():
            dist.barrier()
            if self.rank == 0:
                (it_dir / "config.yaml").write_text(config_yaml)
                finalize_tracker(self.run_dir, iteration)
                self._prune(iteration)

        strategy = self._strategy(sharding)
        if self.queue is not None:
            req = dist_checkpointing.save(state, str(it_dir), sharded_strategy=strategy, async_sharded_save=True)
            req.add_finalize_fn(finalize)
            self.queue.schedule_async_request(req)
        else:
            dist_checkpointing.save(state, str(it_dir), sharded_strategy=strategy)
            finalize()
        return sharding

    def maybe_finalize(self, blocking: bool = False) -> None:
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)
            self.queue.close()

    def _prune(self, newest: int) -> None:
        if self.keep_last <= 0:
            return
        its = sorted(int(p.name[5:]) for p in self.run_dir.glob("iter_*") if p.name[5:].isdigit())
        for it in its:
            if it < newest and it not in its[-self.keep_last :]:
                shutil.rmtree(iteration_dir(self.run_dir, it), ignore_errors=True)

    def load(self, it_dir, model, optimizer, scheduler, loader, *, config=None, allow_changed_model=False):
        """Restore a full training state; returns the iteration to continue from and the common state
        (``ema_updates``, ``valid``...). With ``config``, a checkpoint of another model (or tokenizers)
        is refused unless ``allow_changed_model``. The EMA is :meth:`ShardedEMA.load`'s to restore."""

        it_dir = Path(it_dir)
        common = _read_checkpoint(lambda: dist_checkpointing.load_common_state_dict(str(it_dir)), it_dir)
        if "optimizer" not in common and not (it_dir / ".metadata").is_file():
            raise RuntimeError(f"{it_dir}: not a megamdm training checkpoint")
        if config is not None and not allow_changed_model and common.get("config"):
            changes = identity_changes(common["config"], config)
            if changes:
                raise CheckpointError(
                    f"{it_dir} is a checkpoint of another model ({'; '.join(changes[:4])}); resume with its settings, "
                    "start from its weights with checkpoint.init_from, or set checkpoint.resume_changed_model=true"
                )
        sharding = common.get("optim_sharding", RESHARDABLE_FORMAT)  # 0.1.x saved fully reshardable
        saved, now = common.get("layout", {}), _layout()
        same_model_layout = (saved.get("tp"), saved.get("pp")) == (now["tp"], now["pp"])
        if sharding != RESHARDABLE_FORMAT and not same_model_layout:
            raise CheckpointError(
                f"{it_dir}: its optimizer state is {sharding} (saved at TP {saved.get('tp')} PP {saved.get('pp')}), "
                f"so it resumes only at TP {saved.get('tp')} PP {saved.get('pp')} (any DP), not at TP {now['tp']} "
                f"PP {now['pp']}; resume it there once with checkpoint.reshardable=final to write a fully "
                "reshardable checkpoint, or start from its weights alone with checkpoint.init_from"
            )
        md = optim_metadata(sharding)
        model_sd = model.sharded_state_dict(metadata=md)
        if uses_torch_adam():
            init_torch_adam_state(optimizer)
        request = {
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=md),
        }
        same_layout = saved == now
        if same_layout:
            request["rng"] = _rng_object(self.device)
        state = _read_checkpoint(lambda: dist_checkpointing.load(request, str(it_dir)), it_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
        loader.load_state_dict(common["loader"])
        if same_layout:
            _set_rng_state(state["rng"], self.device)
        return int(common["iteration"]), common
