"""The reference GCE: materialises the N x V logits. It is the specification the fused ones match.

    L_i = CE(z_i, y_i) + sum_l lambda_l * (logsumexp(z_i) - logsumexp_{j in G_l(y_i)} z_ij)

with ``G_l(y) = {j : j // g_l == y // g_l}``, all in fp32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gce_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    group_sizes: Sequence[int],
    group_weights: Sequence[float],
    token_weight: torch.Tensor,
):
    """Returns (weighted per-token loss [N], lse [N], ce [N] detached, group terms [L, N] detached)."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    z = hidden.to(acc) @ weight.to(acc).t()
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z.gather(1, target[:, None]).squeeze(1)
    total = ce
    groups = []
    for g, lam in zip(group_sizes, group_weights):
        idx = (target // g)[:, None, None].expand(n, 1, g)
        zg = z.view(n, v // g, g).gather(1, idx).squeeze(1)
        term = lse - torch.logsumexp(zg, dim=-1)
        groups.append(term.detach())
        total = total + lam * term
    grp = torch.stack(groups) if groups else lse.new_zeros(0, n)
    return token_weight.to(acc) * total, lse, ce.detach(), grp
