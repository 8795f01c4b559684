"""Grouped Cross-Entropy (docs/design.md §1.2): one public entry point, three implementations.

``impl="naive"`` materialises the logits and is the specification; ``"torch"`` (chunked autograd
function, any device) and ``"triton"`` (GPU kernels; CPU under ``TRITON_INTERPRET=1``) never
hold the N x V logits. With ``tp_group`` the weight is this rank's vocabulary shard (see
``vocab_parallel``); the returned ``dH`` is then this rank's partial sum, to be reduced by the caller.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .chunked import gce_chunked
from .groups import GCEGroups, build_groups, check_group_sizes
from .naive import gce_naive

IMPLS = ("naive", "torch", "triton")
REDUCTIONS = ("mean", "sum", "none")


class GCEStats(NamedTuple):
    loss: torch.Tensor  # reduced as requested; differentiable
    lse: torch.Tensor  # [N] fp32 log-sum-exp over the whole vocabulary; differentiable (z-loss)
    ce: torch.Tensor  # [N] fp32 plain cross-entropy term (detached)
    group: torch.Tensor  # [L, N] fp32 group terms lse - lse_G (detached)


def gce_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    group_sizes: Sequence[int],
    group_weights: Sequence[float],
    *,
    impl: str = "naive",
    reduction: str = "mean",
    token_weight: torch.Tensor | None = None,
    tp_group=None,
    ignore_mask: torch.Tensor | None = None,
    return_stats: bool = False,
    block_v: int | None = None,
    block_n: int | None = None,
    weight_grad_sink: torch.Tensor | None = None,
    grad_filter: float = 0.0,
):
    """Grouped cross-entropy of ``hidden [N, d] @ weight[V, d]^T`` against ``target [N]`` (model order).

    ``token_weight [N]`` scales each token's loss (flipped positions weigh ``edit_loss_weight``);
    ``ignore_mask [N]`` (True = ignore) drops tokens. ``reduction``: ``"none"`` gives the weighted
    per-token fp32 loss, ``"sum"`` its sum, ``"mean"`` the sum over the sum of weights.
    With ``return_stats`` a :class:`GCEStats` is returned instead of the loss alone.
    ``block_v`` / ``block_n`` tune the chunk sizes of the fused implementations (``block_n``: torch only).
    ``weight_grad_sink``: an fp32 tensor of the weight's shape (megatron's ``main_grad``) into which
    the fused implementations add the weight gradient; the weight then receives an uninitialised
    placeholder gradient that the caller must ignore (megatron's ``grad_added_to_main_grad``).
    ``grad_filter`` (``impl="triton"``): backward skips every tile of the logit gradient whose softmax
    stays below it and that holds no target or target group, as Cut Cross-Entropy's gradient
    filtering does; inexact (the skipped terms are dropped) and not bitwise reproducible (atomic
    additions). 0 (the default) filters nothing; Cut Cross-Entropy uses 2**-12 for bf16."""
    if impl not in IMPLS:
        raise ValueError(f"unknown GCE impl {impl!r}; allowed: {', '.join(IMPLS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, d] and [V, d]")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"target {tuple(target.shape)} must be [N] with N = {hidden.shape[0]}")
    if len(group_sizes) != len(group_weights):
        raise ValueError(f"{len(group_sizes)} group sizes but {len(group_weights)} group weights")
    if weight_grad_sink is not None and (weight_grad_sink.shape != weight.shape or weight_grad_sink.dtype != torch.float32):
        raise ValueError(
            f"weight_grad_sink must be fp32 {tuple(weight.shape)}, got {weight_grad_sink.dtype} {tuple(weight_grad_sink.shape)}"
        )
    if weight_grad_sink is not None and not weight_grad_sink.is_contiguous():
        raise ValueError("weight_grad_sink must be contiguous")
    if not 0.0 <= grad_filter < 1.0:
        raise ValueError(f"grad_filter must be in [0, 1), got {grad_filter}")
    if grad_filter and impl != "triton":
        raise ValueError(f"grad_filter needs impl='triton' (the {impl!r} operator cannot skip work without a host sync)")
    if weight_grad_sink is not None and impl == "naive":
        raise ValueError("impl='naive' has no weight gradient sink; use impl='torch' or 'triton'")
    tp = tp_group is not None and torch.distributed.get_world_size(tp_group) > 1
    check_group_sizes(group_sizes, weight.shape[0], "the vocabulary shard of this rank" if tp else "the vocabulary")
    if tp and impl == "naive":
        raise ValueError(
            "impl='naive' materialises the full logits and has no vocab-parallel mode; "
            "use impl='torch' or 'triton' with tp_group"
        )
    n = hidden.shape[0]
    w = torch.ones(n, device=hidden.device) if token_weight is None else token_weight.float().reshape(n)
    target = target.long()
    if ignore_mask is not None:
        w = w * (~ignore_mask.reshape(n)).float()
        target = torch.where(ignore_mask.reshape(n), torch.zeros_like(target), target)
    v_total = weight.shape[0] * (torch.distributed.get_world_size(tp_group) if tp else 1)
    # reading the range is free only on CPU (elsewhere a host sync): there only with MEGAMDM_GCE_CHECKS=1
    if (
        n
        and (target.device.type == "cpu" or os.environ.get("MEGAMDM_GCE_CHECKS") == "1")
        and (int(target.min()) < 0 or int(target.max()) >= v_total)
    ):
        raise ValueError(f"target ids must be in [0, {v_total}) (ignore others with ignore_mask)")

    if impl == "naive":
        per, lse, ce, grp = gce_naive(hidden, weight, target, group_sizes, group_weights, w)
    elif impl == "torch":
        per, lse, ce, grp = gce_chunked(
            hidden, weight, target, group_sizes, group_weights, w, tp_group if tp else None, block_v, block_n, weight_grad_sink
        )
    else:
        from .triton_kernels import gce_triton

        per, lse, ce, grp = gce_triton(
            hidden,
            weight,
            target,
            group_sizes,
            group_weights,
            w,
            tp_group if tp else None,
            block_v,
            weight_grad_sink,
            grad_filter,
        )

    if reduction == "none":
        loss = per
    elif reduction == "sum":
        loss = per.sum()
    else:
        loss = per.sum() / w.sum().clamp_min(1e-12)
    if return_stats:
        return GCEStats(loss, lse, ce, grp)
    return loss


__all__ = ["gce_loss", "GCEStats", "GCEGroups", "build_groups", "check_group_sizes", "IMPLS"]
