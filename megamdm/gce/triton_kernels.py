"""Triton kernels for the fused GCE.

Forward (one program per block of tokens) walks the vocabulary shard tile by tile: each tile's
logits are computed in registers with ``tl.dot`` (fp32 accumulation) and folded into an online
log-sum-exp, the target logit, and, for each group level, an online log-sum-exp restricted to
the target's group; nothing of size N x V reaches memory. Groups of any size work, since the
group statistics are folded across tiles like the full one.

Backward goes a vocabulary chunk at a time: a kernel recomputes each tile's logits and writes
the logit gradient ``dz`` of the chunk (fp32, ``N x chunk``), then two GEMMs give
``dH += dz W_chunk`` (fp32 accumulator) and ``dW_chunk = dz^T H``. Peak extra memory is the
``N x chunk`` buffer plus the fp32 ``dH``.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (tests, tiny shapes). The interpreter's
bf16 ``tl.dot`` is wrong, so there operands are upcast to fp32 first; on a GPU bf16/fp16 operands
go to the tensor cores as they are and fp32 operands use IEEE precision (no TF32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunked import _mm_f32
from .vocab_parallel import combine, tp_rank_and_size

NEG_INF = tl.constexpr(float("-inf"))  # a plain global float does not compile (only the interpreter accepts it)
# The backward's vocabulary chunk. On an H100 (N=4096, V=131072, d=4096, bf16) 2048 keeps the extra
# memory at 1.3% of the naive operator's for 4% more time than 8192 (3.1%); docs/gce.md has the table.
DEFAULT_CHUNK_V = 2048


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _logits_tile(
    H,
    W,
    rows,
    cols,
    rmask,
    cmask,
    D,
    s_hn,
    s_hd,
    s_wv,
    s_wd,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for ds in range(0, D, BLOCK_D):
        dd = ds + tl.arange(0, BLOCK_D)
        dmask = dd < D
        h = tl.load(H + rows[:, None] * s_hn + dd[None, :] * s_hd, mask=rmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * s_wv + dd[None, :] * s_wd, mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(w))
    return acc


@triton.jit
def _gce_fwd_kernel(
    H,
    W,
    T,
    M_OUT,
    S_OUT,
    ZY_OUT,
    GM_OUT,
    GS_OUT,
    GSIZES,
    N,
    V,
    D,
    v0,
    s_hn,
    s_hd,
    s_wv,
    s_wd,
    NUM_LEVELS: tl.constexpr,
    LP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tgt = tl.load(T + rows, mask=rmask, other=-1).to(tl.int64) - v0
    owned = (tgt >= 0) & (tgt < V)
    lv = tl.arange(0, LP)
    gsz = tl.load(GSIZES + lv, mask=lv < NUM_LEVELS, other=1).to(tl.int64)
    tgrp = tl.where(owned[:, None], tgt[:, None] // gsz[None, :], -1)  # [BN, LP]
    m = tl.full([BLOCK_N], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    gm = tl.full([BLOCK_N, LP], NEG_INF, tl.float32)
    gs = tl.zeros([BLOCK_N, LP], tl.float32)
    for vs in range(0, V, BLOCK_V):
        cols = vs + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _logits_tile(H, W, rows, cols, rmask, cmask, D, s_hn, s_hd, s_wv, s_wd, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST)
        z = tl.where(cmask[None, :], z, NEG_INF)
        bm = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - bm) + tl.sum(tl.exp(z - bm[:, None]), 1)
        m = bm
        zy += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        ing = ((cols[None, :, None] // gsz[None, None, :]) == tgrp[:, None, :]) & cmask[None, :, None]
        zg = tl.where(ing, z[:, :, None], NEG_INF)
        gbm = tl.maximum(gm, tl.max(zg, 1))
        live = gbm > NEG_INF
        scale = tl.exp(gm - tl.where(live, gbm, 0.0))  # 0 while the group has not been seen
        add = tl.sum(tl.where(ing, tl.exp(zg - tl.where(live, gbm, 0.0)[:, None, :]), 0.0), 1)
        gs = gs * scale + add
        gm = gbm
    tl.store(M_OUT + rows, m, mask=rmask)
    tl.store(S_OUT + rows, s, mask=rmask)
    tl.store(ZY_OUT + rows, zy, mask=rmask)
    off = rows[:, None] * LP + lv[None, :]
    tl.store(GM_OUT + off, gm, mask=rmask[:, None])
    tl.store(GS_OUT + off, gs, mask=rmask[:, None])


@triton.jit
def _gce_dz_kernel(
    H,
    W,
    T,
    LSE,
    COEF,
    A,
    LSEG,
    GSIZES,
    GLAM,
    DZ,
    N,
    V,
    VC,
    D,
    vstart,
    v0,
    s_hn,
    s_hd,
    s_wv,
    s_wd,
    s_zn,
    NUM_LEVELS: tl.constexpr,
    LP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ccol = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the chunk
    cmask = ccol < VC
    cols = vstart + ccol  # column within this rank's shard
    z = _logits_tile(H, W, rows, cols, rmask, cmask, D, s_hn, s_hd, s_wv, s_wd, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    coef = tl.load(COEF + rows, mask=rmask, other=0.0)
    a = tl.load(A + rows, mask=rmask, other=0.0)
    tgt = tl.load(T + rows, mask=rmask, other=-1).to(tl.int64) - v0
    owned = (tgt >= 0) & (tgt < V)
    dz = coef[:, None] * tl.exp(z - lse[:, None])
    dz -= tl.where(cols[None, :] == tgt[:, None], a[:, None], 0.0)
    lv = tl.arange(0, LP)
    lvm = lv < NUM_LEVELS
    gsz = tl.load(GSIZES + lv, mask=lvm, other=1).to(tl.int64)
    lam = tl.load(GLAM + lv, mask=lvm, other=0.0)
    lseg = tl.load(LSEG + lv[None, :] * N + rows[:, None], mask=rmask[:, None] & lvm[None, :], other=0.0)
    tgrp = tl.where(owned[:, None], tgt[:, None] // gsz[None, :], -1)
    ing = ((cols[None, :, None] // gsz[None, None, :]) == tgrp[:, None, :]) & lvm[None, None, :]
    pg = tl.where(ing, tl.exp(z[:, :, None] - lseg[:, None, :]), 0.0)
    dz -= a[:, None] * tl.sum(pg * lam[None, None, :], 2)
    tl.store(DZ + rows[:, None] * s_zn + ccol[None, :], dz, mask=rmask[:, None] & cmask[None, :])


def _blocks(d: int):
    if _interpreting():  # few, large programs: the interpreter's cost is per program and per op
        return 32, 64, max(16, triton.next_power_of_2(min(d, 64)))
    return 64, 64, 64


class TritonGCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, group_sizes, group_weights, tp_group, block_v):
        if not hidden.is_cuda and not _interpreting():
            raise RuntimeError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); use impl='torch' on CPU"
            )
        hidden = hidden.contiguous()
        weight = weight.contiguous()
        n, v_local = hidden.shape[0], weight.shape[0]
        d = hidden.shape[1]
        rank, _ = tp_rank_and_size(tp_group)
        v0 = rank * v_local
        dev = hidden.device
        nl = len(group_sizes)
        lp = max(1, triton.next_power_of_2(nl))
        gsizes = torch.tensor(list(group_sizes) + [1] * (lp - nl), dtype=torch.int32, device=dev)
        bn, bv, bd = _blocks(d)
        upcast = _interpreting() or hidden.dtype == torch.float32
        m = torch.empty(n, device=dev, dtype=torch.float32)
        s = torch.empty_like(m)
        zy = torch.empty_like(m)
        gm = torch.empty(n, lp, device=dev, dtype=torch.float32)
        gs = torch.empty_like(gm)
        if n:
            _gce_fwd_kernel[(triton.cdiv(n, bn),)](
                hidden,
                weight,
                target,
                m,
                s,
                zy,
                gm,
                gs,
                gsizes,
                n,
                v_local,
                d,
                v0,
                hidden.stride(0),
                hidden.stride(1),
                weight.stride(0),
                weight.stride(1),
                NUM_LEVELS=nl,
                LP=lp,
                BLOCK_N=bn,
                BLOCK_V=bv,
                BLOCK_D=bd,
                UPCAST=upcast,
            )
        t_local = target - v0
        owned = (t_local >= 0) & (t_local < v_local)
        lseg_local = (gm + torch.log(gs)).t()[:nl].contiguous()
        lse, zy, lseg = combine(m + torch.log(s), zy, lseg_local, owned, tp_group)
        ce = lse - zy
        grp = lse[None, :] - lseg
        lam = torch.tensor(list(group_weights), device=dev, dtype=torch.float32)
        loss = token_weight * (ce + (lam[:, None] * grp).sum(0))
        ctx.save_for_backward(hidden, weight, target, token_weight, lse, lseg)
        ctx.cfg = (list(group_sizes), list(group_weights), v0, block_v, upcast)
        ctx.mark_non_differentiable(ce, grp)
        return loss, lse, ce, grp

    @staticmethod
    def backward(ctx, g_loss, g_lse, _g_ce, _g_grp):
        hidden, weight, target, token_weight, lse, lseg = ctx.saved_tensors
        group_sizes, group_weights, v0, block_v, upcast = ctx.cfg
        n, v_local = hidden.shape[0], weight.shape[0]
        d = hidden.shape[1]
        dev = hidden.device
        nl = len(group_sizes)
        lp = max(1, triton.next_power_of_2(nl))
        gsizes = torch.tensor(list(group_sizes) + [1] * (lp - nl), dtype=torch.int32, device=dev)
        glam = torch.tensor(list(group_weights) + [0.0] * (lp - nl), dtype=torch.float32, device=dev)
        lseg_p = torch.zeros(lp, n, device=dev, dtype=torch.float32)
        lseg_p[:nl] = lseg
        a = (g_loss.float() if g_loss is not None else torch.zeros(n, device=dev)) * token_weight
        coef = a * (1.0 + sum(group_weights))
        if g_lse is not None:
            coef = coef + g_lse.float()
        a, coef = a.contiguous(), coef.contiguous()
        bn, bv, bd = _blocks(d)
        chunk = min(v_local, max(bv, (block_v or DEFAULT_CHUNK_V) // bv * bv))
        dz = torch.empty(n, chunk, device=dev, dtype=torch.float32)
        d_hidden = torch.zeros(n, d, device=dev, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        d_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for vs in range(0, v_local, chunk):
            vc = min(chunk, v_local - vs)
            buf = dz[:, :vc]
            if n:
                _gce_dz_kernel[(triton.cdiv(n, bn), triton.cdiv(vc, bv))](
                    hidden,
                    weight,
                    target,
                    lse,
                    coef,
                    a,
                    lseg_p,
                    gsizes,
                    glam,
                    buf,
                    n,
                    v_local,
                    vc,
                    d,
                    vs,
                    v0,
                    hidden.stride(0),
                    hidden.stride(1),
                    weight.stride(0),
                    weight.stride(1),
                    dz.stride(0),
                    NUM_LEVELS=nl,
                    LP=lp,
                    BLOCK_N=bn,
                    BLOCK_V=bv,
                    BLOCK_D=bd,
                    UPCAST=upcast,
                )
            wc = weight[vs : vs + vc]
            if d_hidden is not None:
                d_hidden += _mm_f32(buf, wc)
            if d_weight is not None:
                d_weight[vs : vs + vc] = _mm_f32(buf.t(), hidden).to(weight.dtype)
        if d_hidden is not None:
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None


def gce_triton(hidden, weight, target, group_sizes, group_weights, token_weight, tp_group=None, block_v=None):
    """``block_v`` is the vocabulary chunk of the backward's logit-gradient buffer (default
    ``DEFAULT_CHUNK_V``)."""
    return TritonGCE.apply(
        hidden,
        weight,
        target.contiguous(),
        token_weight.contiguous(),
        tuple(group_sizes),
        tuple(group_weights),
        tp_group,
        block_v,
    )
