"""Combining per-shard GCE statistics across tensor-parallel ranks (vocab parallelism).

With the head weight split along the vocabulary, rank r holds rows ``[r V/TP, (r+1) V/TP)``. Each
rank computes, over its shard only, the log-sum-exp of every token's logits and, for tokens whose
target it owns, the target logit and the log-sum-exp of each target group. Because every group
size divides the shard, no group straddles ranks. Two all-reduces combine them:

  1. MAX of the local log-sum-exps;
  2. SUM of ``exp(lse_r - max)`` packed with the owner's target logit and group log-sum-exps
     (other ranks contribute zeros).

Backward needs no communication: each rank forms the logit gradient of its own shard from the
global statistics, so ``dW`` is complete and ``dH`` is this rank's partial sum over its shard.
The caller reduces ``dH`` across the group, as megatron-core does for the input of a
ColumnParallelLinear: ``copy_to_tensor_model_parallel_region`` (all-reduce) without sequence
parallelism, ``gather_from_sequence_parallel_region`` (reduce-scatter) with it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_rank_and_size(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def combine(
    lse_local: torch.Tensor,
    zy: torch.Tensor,
    lseg: torch.Tensor,
    owned: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
):
    """Global (lse [N], target logit [N], group lse [L, N]) from per-shard statistics."""
    zy = torch.where(owned, zy, torch.zeros_like(zy))
    lseg = torch.where(owned[None, :], lseg, torch.zeros_like(lseg))
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return lse_local, zy, lseg
    m = lse_local.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    packed = torch.cat([torch.exp(lse_local - m)[None], zy[None], lseg], dim=0)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
    return m + torch.log(packed[0]), packed[1], packed[2:]
