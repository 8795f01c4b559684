"""The fused GCE in plain PyTorch: blocks of vocabulary and tokens, never the N x V logits.

Forward walks vocabulary blocks (outer) and token blocks (inner) keeping an online log-sum-exp
per token, and picks up the target logit and the target groups' log-sum-exps in the block that
holds them (a block is a multiple of the largest group, so a group never straddles blocks; a
group larger than ``block_v`` raises the block to the group size). Only per-token statistics are
saved. Backward recomputes each block's logits, forms

    dz = (a (1 + sum_l lambda_l) + g_lse) softmax(z) - a onehot(y) - sum_l a lambda_l softmax_{G_l(y)}(z)

with ``a = grad_loss * token_weight``, and accumulates ``dH += dz W_b`` (fp32, [N, d]) and
``dW_b = dz^T H`` (one block at a time, written straight into the weight gradient).
Peak extra memory: the fp32 ``dH`` accumulator plus a few ``block_n x block_v`` fp32 tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .vocab_parallel import combine, tp_rank_and_size

DEFAULT_BLOCK_V = 3072  # H100, N=4096, V=131072, d=4096: as fast as 4096, extra memory 1.9% of naive (docs/gce.md)
DEFAULT_BLOCK_N = 8192
# CPU: a 512-token tile (512 x 1536 fp32 = 3 MB) stays in cache between the matmul, the
# exp and the sums; 8192 tokens streamed each pass through memory (N=5500, V=1536, d=64,
# one core, tools/bench_gce.py: fp32 0.064 -> 0.050 s, docs/gce.md)
DEFAULT_BLOCK_N_CPU = 512


_HALF = (torch.bfloat16, torch.float16)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated in fp32, returned in fp32. On CUDA half-precision operands go through
    tensor cores with an fp32 output. On CPU every operand is upcast to fp32: torch has no
    fp32-output ``mm`` for half operands there, and a bf16 ``mm`` rounds the logits to bf16, which
    trained the demo worse (final masked CE +0.005-0.013, docs/gce.md). A transposed right
    operand (the weight block, small) is made contiguous, since CPU BLAS runs ``h @ w.t()`` at half
    the speed of ``h @ w.t().contiguous()``."""
    low = a.dtype if a.dtype in _HALF else b.dtype if b.dtype in _HALF else None
    if a.is_cuda and low is not None:
        return torch.mm(a.to(low), b.to(low), out_dtype=torch.float32)
    if a.is_cuda:
        return a.float() @ b.float()
    return a.float() @ b.float().contiguous()


def block_size_v(block_v: int | None, group_sizes: Sequence[int], vocab_local: int) -> int:
    gmax = max(group_sizes) if group_sizes else 1
    bv = max(block_v or DEFAULT_BLOCK_V, gmax)
    bv = (bv + gmax - 1) // gmax * gmax
    return min(bv, vocab_local)


def _group_slice(z: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, g: int) -> torch.Tensor:
    """``z[rows, start + arange(g)]`` for each selected row: the logits of its target group."""
    cols = start[:, None] + torch.arange(g, device=z.device)[None, :]
    return z[rows[:, None], cols]


class ChunkedGCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, group_sizes, group_weights, tp_group, block_v, block_n):
        n, v_local = hidden.shape[0], weight.shape[0]
        rank, _ = tp_rank_and_size(tp_group)
        v0 = rank * v_local
        bv = block_size_v(block_v, group_sizes, v_local)
        bn = min(block_n or (DEFAULT_BLOCK_N if hidden.is_cuda else DEFAULT_BLOCK_N_CPU), max(n, 1))
        dev = hidden.device
        m = torch.full((n,), float("-inf"), device=dev)
        s = torch.zeros(n, device=dev)
        zy = torch.zeros(n, device=dev)
        lseg = torch.zeros(len(group_sizes), n, device=dev)
        t_local = target - v0
        owned = (t_local >= 0) & (t_local < v_local)
        with torch.no_grad():
            for vs in range(0, v_local, bv):
                wb = weight[vs : vs + bv]
                width = wb.shape[0]
                for ns in range(0, n, bn):
                    z = _mm_f32(hidden[ns : ns + bn], wb.t())
                    sl = slice(ns, ns + z.shape[0])
                    tb = t_local[sl] - vs
                    hit = (tb >= 0) & (tb < width)
                    if hit.any():
                        rows = hit.nonzero().squeeze(1)
                        tr = tb[rows]
                        zy[ns + rows] = z[rows, tr]
                        for li, g in enumerate(group_sizes):
                            zg = _group_slice(z, rows, tr - tr % g, g)
                            lseg[li, ns + rows] = torch.logsumexp(zg, dim=1)
                    bm = torch.maximum(m[sl], z.amax(1))
                    # in place: a fresh N x V temporary per op costs more than the exp itself on CPU
                    s[sl] = s[sl] * torch.exp(m[sl] - bm) + z.sub_(bm[:, None]).exp_().sum(1)
                    m[sl] = bm
            lse_local = m + torch.log(s)
            lse, zy, lseg = combine(lse_local, zy, lseg, owned, tp_group)
            ce = lse - zy
            grp = lse[None, :] - lseg
            lam = torch.tensor(list(group_weights), device=dev, dtype=torch.float32)
            total = ce + (lam[:, None] * grp).sum(0)
            loss = token_weight * total
        ctx.save_for_backward(hidden, weight, target, token_weight, lse, lseg)
        ctx.cfg = (list(group_sizes), list(group_weights), v0, bv, bn)
        ctx.mark_non_differentiable(ce, grp)
        return loss, lse, ce, grp

    @staticmethod
    def backward(ctx, g_loss, g_lse, _g_ce, _g_grp):
        hidden, weight, target, token_weight, lse, lseg = ctx.saved_tensors
        group_sizes, group_weights, v0, bv, bn = ctx.cfg
        n, v_local = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        a = (g_loss.float() if g_loss is not None else torch.zeros(n, device=dev)) * token_weight
        coef = a * (1.0 + sum(group_weights))
        if g_lse is not None:
            coef = coef + g_lse.float()
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        d_hidden = torch.zeros(n, hidden.shape[1], device=dev, dtype=torch.float32) if need_h else None
        d_weight = torch.empty_like(weight) if need_w else None
        t_local = target - v0
        for vs in range(0, v_local, bv):
            wb = weight[vs : vs + bv]
            width = wb.shape[0]
            dwb = torch.zeros(width, hidden.shape[1], device=dev, dtype=torch.float32) if need_w else None
            for ns in range(0, n, bn):
                hb = hidden[ns : ns + bn]
                sl = slice(ns, ns + hb.shape[0])
                z = _mm_f32(hb, wb.t())
                tb = t_local[sl] - vs
                hit = (tb >= 0) & (tb < width)
                group_terms = []
                any_hit = bool(hit.any())
                if any_hit:
                    rows = hit.nonzero().squeeze(1)
                    tr = tb[rows]
                    ar = a[sl][rows]
                    for li, (g, lam) in enumerate(zip(group_sizes, group_weights)):
                        start = tr - tr % g
                        cols = start[:, None] + torch.arange(g, device=dev)[None, :]
                        pg = torch.exp(z[rows[:, None], cols] - lseg[li, ns + rows][:, None])
                        group_terms.append((cols, (ar * lam)[:, None] * pg))
                dz = z.sub_(lse[sl, None]).exp_().mul_(coef[sl, None])  # z becomes dz (in place)
                if any_hit:
                    dz[rows, tr] -= ar
                    for cols, term in group_terms:
                        dz[rows[:, None], cols] -= term
                if need_h:
                    d_hidden[sl] += _mm_f32(dz, wb)
                if need_w:
                    dwb += _mm_f32(dz.t(), hb)
            if need_w:
                d_weight[vs : vs + width] = dwb.to(weight.dtype)
        if need_h:
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None, None


def gce_chunked(hidden, weight, target, group_sizes, group_weights, token_weight, tp_group=None, block_v=None, block_n=None):
    return ChunkedGCE.apply(
        hidden, weight, target, token_weight, tuple(group_sizes), tuple(group_weights), tp_group, block_v, block_n
    )
