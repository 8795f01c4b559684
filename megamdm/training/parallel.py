"""Process groups, RNG and the precision every rank agrees on: NCCL on GPUs, gloo on CPU; launched by torchrun
or by srun (one task per GPU). Pretraining and fine-tuning set up their processes here."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ..compat.cpu_precision import probe as probe_cpu
from ..compat.megatron_cpu import seed_rng_tracker
from ..config import ConfigError


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available")
    return device


def _env_from_slurm() -> None:
    """Under ``srun`` without torchrun, derive torch.distributed's variables from SLURM's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("running under srun: set MASTER_ADDR (launch/common.sh does) to the first node")


def init_distributed(device: str, timeout_minutes: int = 30) -> tuple[int, int, int]:
    """Initialise the default process group from torchrun / srun / single-process environments.
    Returns (rank, world, local_rank)."""
    _env_from_slurm()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())  # SLURM may bind one GPU per task
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size(), local_rank


def resolve_precision(precision: str, device: str) -> tuple[str, str]:
    """``auto`` -> bf16 on GPUs, and on CPUs the dtype every rank's probe found faster (any rank that
    found fp32 faster makes it fp32 for all). Returns (precision, how it was chosen)."""
    if precision != "auto":
        return precision, "as configured"
    if device == "cuda":
        return "bf16", "auto on a GPU"
    probe = probe_cpu()
    local = probe.fast_dtype
    vote = torch.tensor([1.0 if local == "bf16" else 0.0])
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    chosen = "bf16" if vote.item() > 0 else "fp32"
    return chosen, f"auto: {probe.describe()}" + ("" if chosen == local else f"; another rank chose {chosen}")


def init_model_parallel(tensor_parallel: int, pipeline_parallel: int) -> None:
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ConfigError(
            f"parallel.tensor_parallel={tensor_parallel} x parallel.pipeline_parallel={pipeline_parallel} does not "
            f"divide the {world} processes launched; launch a multiple of {tensor_parallel * pipeline_parallel}"
        )
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel)


def seed_model_parallel(seed: int, device: str) -> None:
    """Megatron's RNG streams (default, tensor-parallel, expert), seeded as upstream (on CPU inside
    :func:`megamdm.compat.megatron_cpu.megatron_on_cpu`, which owns the CPU states)."""
    if device == "cuda":
        from megatron.core import tensor_parallel

        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        seed_rng_tracker(seed)


def teardown() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
