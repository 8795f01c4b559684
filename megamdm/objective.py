"""The training objective shared by every trainer: GCE on masked tokens + weighted edit loss on flips.

Only supervised positions (masked or flipped: loss weight > 0) reach the head, so the head's
cost scales with them, not with the whole grid. The loss is normalised by the number of
supervised tokens of the *global* batch: trainers sum ``loss_sum`` and ``num_tokens`` over
micro-batches and data-parallel ranks (megatron-core's per-token loss does exactly that), so the
result does not depend on how the batch is split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .gce import GCEStats


@dataclass
class LossSpec:
    group_sizes: Sequence[int]
    group_weights: Sequence[float]
    impl: str = "torch"
    z_loss_weight: float = 0.0
    grad_filter: float = 0.0  # triton only: gce_loss's grad_filter

    @classmethod
    def from_config(cls, gce_cfg, groups=None) -> LossSpec:
        sizes = list(groups.group_sizes) if groups is not None else list(gce_cfg.group_sizes)
        if list(gce_cfg.group_sizes) != sizes:
            raise ValueError(f"gce.group_sizes={list(gce_cfg.group_sizes)} does not match the groups file ({sizes})")
        return cls(sizes, list(gce_cfg.group_weights), gce_cfg.impl, gce_cfg.z_loss_weight, gce_cfg.grad_filter)


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # differentiable sum of weighted per-token losses (+ z-loss)
    num_tokens: torch.Tensor  # supervised tokens in this micro-batch (long)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached sums; see METRICS

    def mean(self) -> torch.Tensor:
        return self.loss_sum / self.num_tokens.clamp_min(1)


# metric name -> (numerator key, denominator key) in LossParts.metrics
METRICS = {
    "ce": ("ce_sum", "n_masked"),  # plain cross-entropy on masked tokens
    "group": ("group_sum", "n_masked"),  # sum_l lambda_l * group term on masked tokens
    "edit": ("edit_sum", "n_flipped"),  # full (unweighted) GCE on flipped tokens
}


def select_supervised(hidden: torch.Tensor, target: torch.Tensor, loss_weight: torch.Tensor, is_flipped: torch.Tensor):
    """Flatten ``[..., d]`` hidden states and keep only positions with a positive loss weight."""
    d = hidden.shape[-1]
    keep = loss_weight.reshape(-1) > 0
    return (hidden.reshape(-1, d)[keep], target.reshape(-1)[keep], loss_weight.reshape(-1)[keep], is_flipped.reshape(-1)[keep])


def loss_parts(stats: GCEStats, flipped: torch.Tensor, spec: LossSpec) -> LossParts:
    """Reduce per-token GCE statistics (``reduction='none'``) of the supervised positions."""
    loss_sum = stats.loss.sum()
    if spec.z_loss_weight:
        loss_sum = loss_sum + spec.z_loss_weight * (stats.lse.float() ** 2).sum()
    lam = torch.tensor(list(spec.group_weights), device=stats.ce.device, dtype=torch.float32)
    grp = (lam[:, None] * stats.group).sum(0) if stats.group.numel() else torch.zeros_like(stats.ce)
    masked = ~flipped
    full = stats.ce + grp
    metrics = {
        "ce_sum": (stats.ce * masked).sum().detach(),
        "group_sum": (grp * masked).sum().detach(),
        "n_masked": masked.sum().detach().float(),
        "edit_sum": (full * flipped).sum().detach(),
        "n_flipped": flipped.sum().detach().float(),
    }
    return LossParts(loss_sum, torch.tensor(stats.ce.numel(), device=stats.ce.device), metrics)


# The one metric schema: the sums a training step reduces over micro-batches and ranks, in this
# order, as one float vector (``pack_sums`` / ``unpack_sums``); METRICS turns them into means.
METRIC_SUMS = ("ce_sum", "group_sum", "n_masked", "edit_sum", "n_flipped")
STEP_SUMS = ("loss_sum", "n_tokens", *METRIC_SUMS)
# what a trainer adds of the batch itself (training/metrics.py): captions cut at text.max_len, real
# prompt tokens, model FLOPs of the real positions; reduced in one vector with the step sums
BATCH_SUMS = ("prompts_cut", "prompt_tokens", "body_flops")
LOGGED_SUMS = (*STEP_SUMS, *BATCH_SUMS)


def pack_metric_sums(parts: LossParts) -> torch.Tensor:
    """``parts.metrics`` as a float vector in METRIC_SUMS order (what a pipeline stage hands on)."""
    return torch.stack([parts.metrics[k].float() for k in METRIC_SUMS])


def pack_step_sums(loss_sum: torch.Tensor, num_tokens: torch.Tensor, metric_sums: torch.Tensor) -> torch.Tensor:
    """One micro-batch's sums in STEP_SUMS order, detached."""
    return torch.cat([loss_sum.detach().float().view(1), num_tokens.float().view(1), metric_sums.float()])


def unpack_sums(values, names=STEP_SUMS) -> dict[str, float]:
    return dict(zip(names, [float(v) for v in values]))


def reduce_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Turn accumulated metric sums into means: ce, group and edit."""
    out = {}
    for name, (num, den) in METRICS.items():
        if sums.get(den, 0) > 0:
            out[name] = sums[num] / sums[den]
    return out
