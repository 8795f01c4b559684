"""Triton kernels for the fused GCE.

The target logit and the target groups' log-sum-exps come up front from indexed dot products
(:func:`~megamdm.gce.chunked.target_stats`, shared with the torch implementation), so the kernels
hold no group state and do no integer division per logit.

Forward: a 2-D grid over (token blocks, vocabulary splits). Each program computes its tiles'
logits in registers with ``tl.dot`` (fp32 accumulation) and folds them into an online
log-sum-exp over its split; the per-split partials ``[splits, N]`` are merged by one small
``logsumexp``. Token blocks vary fastest in launch order, so the programs resident at one time
read the same weight tiles (L2 reuse: the grouped rasterisation of a matmul with a single group
along the vocabulary). The number of splits fills about two waves of the GPU's SMs.

Backward, a vocabulary chunk at a time: a kernel recomputes each tile and writes the logit
gradient ``dz`` in the operands' dtype (bf16 on a bf16 model), including the target's and its
groups' sparse terms (a range test per row, levels of weight 0 skipped). Then
``dH += dz W_chunk`` (fp32 accumulator, added in place by cuBLAS) and ``dW_chunk = dz^T H``
written into the weight gradient's rows, or added into an fp32 sink (megatron's ``main_grad``)
when one is given. Peak extra memory: the ``N x chunk`` ``dz`` buffer and the fp32 ``dH``.

Tile sizes are autotuned on a GPU (tile sets for Hopper/Blackwell and for Ampere-class shared
memory; key: vocabulary shard, d, N rounded to a power of two so that a step's varying token count
does not retune, and the group levels). On CPU the kernels run under
``TRITON_INTERPRET=1`` (tests, tiny shapes) with fixed tiles. The interpreter's bf16 ``tl.dot``
is wrong, so there operands are upcast to fp32 first; on a GPU bf16/fp16 operands go to the
tensor cores as they are and fp32 operands use IEEE precision (no TF32).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver

from .chunked import _addmm_f32_, _mm_f32, losses, on_cpu, target_stats, upstream_coefficients, weight_grad_placeholder
from .vocab_parallel import tp_rank_and_size

NEG_INF = tl.constexpr(float("-inf"))  # a plain global float does not compile (only the interpreter accepts it)
# The backward's vocabulary chunk. On an H100 (N=4096, V=131072, d=4096, bf16) 2048 kept the extra
# memory at 1.3% of the naive operator's with fp32 dz (docs/gce.md); bf16 dz halves the buffer.
DEFAULT_CHUNK_V = 2048
MAX_LEVELS = 4  # group levels the kernels take as scalar arguments (the paper uses one)
SPLIT_ALIGN = 256  # a vocabulary split is a multiple of this many columns


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(shapes):
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=st) for bn, bv, bd, w, st in shapes
    ]


# Tiles (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages) per architecture family, autotuned once per key.
# In bf16 each set compiles without spilling registers and within its family's shared memory
# (tools/check_triton_kernels.py, docs/gce.md). The logit-gradient kernel holds a tile's logits,
# softmax and dz at once: 256-column tiles spill there once a group level is on, and more levels
# need tiles of 32 logits a thread.
LSE_TILES = {
    "hopper": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 4), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4)],
    "ampere": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (64, 128, 32, 4, 4)],
}
DZ_TILES = {
    "hopper": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 128, 64, 8, 4)],
    "ampere": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (64, 128, 32, 4, 4)],
}
DEEP_DZ_TILES = [(64, 128, 64, 8, 4), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)]  # 32 logits a thread
# The group levels a family's logit-gradient tiles (64 logits a thread) hold without spilling, per
# architecture; more levels take the deep tiles. At two levels sm_100 and sm_120 spill 8-16 B, and
# sm_80/86/89 do with Triton 3.6.
DZ_LEVELS = {90: 2}


def tile_family(arch: int) -> str:
    """``hopper`` for the GPUs with 227 KiB of shared memory per block (sm_90, sm_100, sm_103),
    ``ampere`` for the others (sm_80: 163 KiB; sm_86, sm_89, sm_120: 99 KiB)."""
    return "hopper" if 90 <= arch < 120 else "ampere"


def tiles_for(kernel: str, arch: int, levels: int = 0) -> list[tuple[int, int, int, int, int]]:
    """The tiles the autotuner tries for ``kernel`` (``lse`` or ``dz``) on ``sm_<arch>`` with
    ``levels`` weighted group levels."""
    if kernel == "lse":
        return LSE_TILES[tile_family(arch)]
    return DEEP_DZ_TILES if levels > DZ_LEVELS.get(arch, 1) else DZ_TILES[tile_family(arch)]


def _shape(config) -> tuple[int, int, int, int, int]:
    k = config.kwargs
    return k["BLOCK_N"], k["BLOCK_V"], k["BLOCK_D"], config.num_warps, config.num_stages


def _autotuned(kernel, name: str, key: list[str]):
    """``kernel`` autotuned over every tile it has anywhere, pruned at launch to those of the GPU
    it runs on (Triton's active target: the offline one under tools/check_triton_kernels.py)."""
    sets = LSE_TILES.values() if name == "lse" else [*DZ_TILES.values(), DEEP_DZ_TILES]
    every = list(dict.fromkeys(t for tiles in sets for t in tiles))

    def prune(configs, _nargs, **kwargs):
        keep = tiles_for(name, driver.active.get_current_target().arch, kwargs.get("NUM_LEVELS", 0))
        return [c for c in configs if _shape(c) in keep]

    return triton.autotune(_configs(every), key=key, prune_configs_by={"early_config_prune": prune})(kernel)


INTERPRET_BLOCKS = {"BLOCK_N": 32, "BLOCK_V": 64}  # few, large programs: the interpreter's cost is per program


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
def _lse_split_kernel(
    H,
    W,
    PART,
    N,
    V,
    D,
    split_v,
    n_key,
    s_hn,
    s_hd,
    s_wv,
    s_wd,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``PART[split, n]``: log-sum-exp of token ``n``'s logits over one vocabulary split."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    v_lo = pid_s * split_v
    v_hi = tl.minimum(v_lo + split_v, V)
    m = tl.full([BLOCK_N], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    for vs in range(v_lo, v_hi, BLOCK_V):
        cols = vs + tl.arange(0, BLOCK_V)
        cmask = cols < v_hi
        z = _logits_tile(H, W, rows, cols, rmask, cmask, D, s_hn, s_hd, s_wv, s_wd, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST)
        z = tl.where(cmask[None, :], z, NEG_INF)
        bm = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - bm) + tl.sum(tl.exp(z - bm[:, None]), 1)
        m = bm
    tl.store(PART + pid_s * N + rows, m + tl.log(s), mask=rmask)


@triton.jit
def _group_term(dz, hit, z, cols, tgt, owned, a, LSEG, rows, rmask, N, level: tl.constexpr, g, lam):
    """``dz - a lambda softmax_G(z)`` over the columns of the target's group ``G`` of size ``g``, and
    whether any row's group reaches into this tile."""
    lseg = tl.load(LSEG + level * N + rows, mask=rmask, other=0.0)
    start = tgt - tgt % g
    ing = (cols[None, :] >= start[:, None]) & (cols[None, :] < start[:, None] + g) & owned[:, None]
    hit = tl.maximum(hit, tl.max(tl.max(ing.to(tl.int32), 1), 0))
    return dz - tl.where(ing, (a * lam)[:, None] * tl.exp(z - lseg[:, None]), 0.0), hit


@triton.jit
def _dz_tile(
    H,
    W,
    T,
    LSE,
    COEF,
    A,
    LSEG,
    rows,
    rmask,
    cols,
    cmask,
    N,
    V,
    D,
    v0,
    s_hn,
    s_hd,
    s_wv,
    s_wd,
    G0,
    G1,
    G2,
    G3,
    LAM0,
    LAM1,
    LAM2,
    LAM3,
    NUM_LEVELS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """A tile's logit gradient (fp32), its largest softmax probability, and whether a target or a
    target group lies in it (its sparse terms)."""
    z = _logits_tile(H, W, rows, cols, rmask, cmask, D, s_hn, s_hd, s_wv, s_wd, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    coef = tl.load(COEF + rows, mask=rmask, other=0.0)
    a = tl.load(A + rows, mask=rmask, other=0.0)
    tgt = (tl.load(T + rows, mask=rmask, other=-1) - v0).to(tl.int32)  # a vocabulary id fits 31 bits
    owned = (tgt >= 0) & (tgt < V)
    p = tl.where(rmask[:, None] & cmask[None, :], tl.exp(z - lse[:, None]), 0.0)
    dz = coef[:, None] * p
    at = (cols[None, :] == tgt[:, None]) & cmask[None, :]
    dz -= tl.where(at, a[:, None], 0.0)
    hit = tl.max(tl.max(at.to(tl.int32), 1), 0)
    if NUM_LEVELS > 0:
        dz, hit = _group_term(dz, hit, z, cols, tgt, owned, a, LSEG, rows, rmask, N, 0, G0, LAM0)
    if NUM_LEVELS > 1:
        dz, hit = _group_term(dz, hit, z, cols, tgt, owned, a, LSEG, rows, rmask, N, 1, G1, LAM1)
    if NUM_LEVELS > 2:
        dz, hit = _group_term(dz, hit, z, cols, tgt, owned, a, LSEG, rows, rmask, N, 2, G2, LAM2)
    if NUM_LEVELS > 3:
        dz, hit = _group_term(dz, hit, z, cols, tgt, owned, a, LSEG, rows, rmask, N, 3, G3, LAM3)
    return dz, tl.max(tl.max(p, 1), 0), hit


@triton.jit
def _gce_dz_kernel(
    H,
    W,
    T,
    LSE,
    COEF,
    A,
    LSEG,
    DZ,
    N,
    V,
    VC,
    D,
    vstart,
    v0,
    n_key,
    s_hn,
    s_hd,
    s_wv,
    s_wd,
    s_zn,
    G0,
    G1,
    G2,
    G3,
    LAM0,
    LAM1,
    LAM2,
    LAM3,
    NUM_LEVELS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ccol = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the chunk
    cmask = ccol < VC
    cols = vstart + ccol  # column within this rank's shard
    dz, _p, _hit = _dz_tile(
        H, W, T, LSE, COEF, A, LSEG, rows, rmask, cols, cmask, N, V, D, v0, s_hn, s_hd, s_wv, s_wd,
        G0, G1, G2, G3, LAM0, LAM1, LAM2, LAM3, NUM_LEVELS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
    )  # fmt: skip
    out = DZ + rows[:, None] * s_zn + ccol[None, :]
    tl.store(out, dz.to(DZ.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _gce_bwd_filtered_kernel(
    H,
    W,
    T,
    LSE,
    COEF,
    A,
    LSEG,
    DH,
    DW,
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
    s_dw,
    G0,
    G1,
    G2,
    G3,
    LAM0,
    LAM1,
    LAM2,
    LAM3,
    eps,
    NUM_LEVELS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Gradient filtering (Cut Cross-Entropy's): a tile whose softmax stays below ``eps`` everywhere
    and that holds no target or target group adds nothing; the others add ``dz W`` to ``DH [N, D]``
    and ``dz^T H`` to ``DW [VC, D]`` (both fp32) with atomic additions."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ccol = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = ccol < VC
    cols = vstart + ccol
    dz, pmax, hit = _dz_tile(
        H, W, T, LSE, COEF, A, LSEG, rows, rmask, cols, cmask, N, V, D, v0, s_hn, s_hd, s_wv, s_wd,
        G0, G1, G2, G3, LAM0, LAM1, LAM2, LAM3, NUM_LEVELS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST,
    )  # fmt: skip
    if (pmax >= eps) | (hit > 0):
        for ds in range(0, D, BLOCK_D):
            dd = ds + tl.arange(0, BLOCK_D)
            dmask = dd < D
            w = tl.load(W + cols[:, None] * s_wv + dd[None, :] * s_wd, mask=cmask[:, None] & dmask[None, :], other=0.0)
            h = tl.load(H + rows[:, None] * s_hn + dd[None, :] * s_hd, mask=rmask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                dh = tl.dot(dz, w.to(tl.float32), input_precision="ieee")
                dw = tl.dot(tl.trans(dz), h.to(tl.float32), input_precision="ieee")
            else:
                dzl = dz.to(w.dtype)
                dh = tl.dot(dzl, w)
                dw = tl.dot(tl.trans(dzl), h)
            tl.atomic_add(DH + rows[:, None] * D + dd[None, :], dh, mask=rmask[:, None] & dmask[None, :])
            tl.atomic_add(DW + ccol[:, None] * s_dw + dd[None, :], dw, mask=cmask[:, None] & dmask[None, :])


_lse_split_tuned = _autotuned(_lse_split_kernel, "lse", key=["V", "D", "n_key"])
_gce_dz_tuned = _autotuned(_gce_dz_kernel, "dz", key=["VC", "D", "n_key", "NUM_LEVELS"])


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_width(n: int, v: int, device: torch.device) -> int:
    """Columns per vocabulary split: enough splits that (token blocks x splits) fills about two
    waves of the SMs (128-token blocks assumed), each split at least 2048 columns wide. Under the
    interpreter a few narrow splits, so the tests cover the merge."""
    if not _interpreting():
        programs, bn, min_width, align = 2 * _sm_count(device), 128, 2048, SPLIT_ALIGN
    else:
        programs, bn, min_width, align = 4, INTERPRET_BLOCKS["BLOCK_N"], 64, 1
    splits = max(1, min(triton.cdiv(programs, triton.cdiv(max(n, 1), bn)), triton.cdiv(v, min_width)))
    return triton.cdiv(triton.cdiv(v, splits), align) * align


def _launch(tuned, raw, grid_rows, grid_cols, d, *args, **kw):
    """Launch the autotuned kernel on a GPU, the raw one with fixed tiles under the interpreter."""
    if _interpreting():
        blocks = dict(INTERPRET_BLOCKS, BLOCK_D=max(16, triton.next_power_of_2(min(d, 64))))
        raw[(triton.cdiv(grid_rows, blocks["BLOCK_N"]), grid_cols(blocks))](*args, **kw, **blocks)
    else:
        tuned[lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_N"]), grid_cols(meta))](*args, **kw)


def _levels(group_sizes, group_weights):
    """Backward's group levels: those of nonzero weight, as the kernel's scalar arguments."""
    kept = [(li, g, lam) for li, (g, lam) in enumerate(zip(group_sizes, group_weights)) if lam != 0.0]
    if len(kept) > MAX_LEVELS:
        raise ValueError(f"impl='triton' takes at most {MAX_LEVELS} weighted group levels, got {len(kept)}")
    pad = [(0, 1, 0.0)] * (MAX_LEVELS - len(kept))
    return kept, [g for _, g, _ in kept + pad], [float(lam) for _, _, lam in kept + pad]


class TritonGCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, group_sizes, group_weights, tp_group, block_v, sink, grad_filter):
        if on_cpu(hidden) and not _interpreting():
            raise RuntimeError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); use impl='torch' on CPU"
            )
        hidden = hidden.contiguous()
        weight = weight.contiguous()
        n, v_local = hidden.shape[0], weight.shape[0]
        d = hidden.shape[1]
        rank, _ = tp_rank_and_size(tp_group)
        v0 = rank * v_local
        upcast = _interpreting() or hidden.dtype == torch.float32
        _levels(group_sizes, group_weights)  # refuse too many levels before any work
        t_local = target - v0
        owned = (t_local >= 0) & (t_local < v_local)
        with torch.no_grad():
            zy, lseg = target_stats(hidden, weight, t_local, group_sizes)
            split_v = _split_width(n, v_local, hidden.device)
            splits = triton.cdiv(v_local, split_v)
            part = torch.empty(splits, n, device=hidden.device, dtype=torch.float32)
            if n:
                _launch(
                    _lse_split_tuned,
                    _lse_split_kernel,
                    n,
                    lambda meta: splits,
                    d,
                    hidden,
                    weight,
                    part,
                    n,
                    v_local,
                    d,
                    split_v,
                    triton.next_power_of_2(max(n, 1)),
                    hidden.stride(0),
                    hidden.stride(1),
                    weight.stride(0),
                    weight.stride(1),
                    UPCAST=upcast,
                )
            lse_local = torch.logsumexp(part, dim=0)
            loss, lse, ce, grp, lseg = losses(lse_local, zy, lseg, owned, tp_group, token_weight, group_weights)
        ctx.save_for_backward(hidden, weight, target, token_weight, lse, lseg)
        ctx.cfg = (list(group_sizes), list(group_weights), v0, block_v, upcast)
        ctx.sink, ctx.grad_filter = sink, grad_filter
        ctx.mark_non_differentiable(ce, grp)
        ctx.set_materialize_grads(False)  # an unused lse (no z-loss) has no gradient, not one of zeros
        return loss, lse, ce, grp

    @staticmethod
    def backward(ctx, g_loss, g_lse, _g_ce, _g_grp):
        hidden, weight, target, token_weight, lse, lseg = ctx.saved_tensors
        group_sizes, group_weights, v0, block_v, upcast = ctx.cfg
        sink = ctx.sink
        n, v_local = hidden.shape[0], weight.shape[0]
        d = hidden.shape[1]
        dev = hidden.device
        kept, gs, lams = _levels(group_sizes, group_weights)
        lseg_kept = torch.stack([lseg[li] for li, _, _ in kept]) if kept else lse[None, :0]  # no host index
        a, coef = upstream_coefficients(g_loss, g_lse, token_weight, group_weights, n, dev)
        a, coef = a.contiguous(), coef.contiguous()
        align = 1 if _interpreting() else SPLIT_ALIGN
        chunk = min(v_local, max(align, (block_v or DEFAULT_CHUNK_V) // align * align))
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden = torch.zeros(n, d, device=dev, dtype=torch.float32) if need_h else None
        d_weight = None
        if need_w:
            d_weight = weight_grad_placeholder(weight) if sink is not None else torch.empty_like(weight)
        args = (hidden, weight, target, lse, coef, a, lseg_kept, v0, chunk, len(kept), (*gs, *lams), upcast)
        if ctx.grad_filter > 0:
            _filtered_backward(*args, d_hidden, d_weight, sink, ctx.grad_filter)
        else:
            _backward(*args, d_hidden, d_weight, sink)
        if need_h:
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, d_weight, *([None] * 8)


def _backward(hidden, weight, target, lse, coef, a, lseg, v0, chunk, levels, scalars, upcast, d_hidden, d_weight, sink):
    """``dz`` a vocabulary chunk at a time (kernel), then ``dH`` and ``dW`` by cuBLAS."""
    (n, d), v_local = hidden.shape, weight.shape[0]
    dz = torch.empty(n, chunk, device=hidden.device, dtype=torch.float32 if upcast else hidden.dtype)
    direct = dz.dtype == hidden.dtype == weight.dtype  # dW rows written by the GEMM itself
    for vs in range(0, v_local, chunk):
        vc = min(chunk, v_local - vs)
        buf = dz[:, :vc]
        if n:
            _launch(
                _gce_dz_tuned,
                _gce_dz_kernel,
                n,
                lambda meta, vc=vc: triton.cdiv(vc, meta["BLOCK_V"]),
                d,
                hidden,
                weight,
                target,
                lse,
                coef,
                a,
                lseg,
                buf,
                n,
                v_local,
                vc,
                d,
                vs,
                v0,
                triton.next_power_of_2(max(n, 1)),
                hidden.stride(0),
                hidden.stride(1),
                weight.stride(0),
                weight.stride(1),
                dz.stride(0),
                *scalars,
                NUM_LEVELS=levels,
                UPCAST=upcast,
            )
        wc = weight[vs : vs + vc]
        if d_hidden is not None:
            _addmm_f32_(d_hidden, buf, wc)
        if d_weight is not None and sink is not None:
            _addmm_f32_(sink[vs : vs + vc], buf.t(), hidden)
        elif d_weight is not None and direct:
            torch.mm(buf.t(), hidden, out=d_weight[vs : vs + vc])
        elif d_weight is not None:
            d_weight[vs : vs + vc] = _mm_f32(buf.t(), hidden).to(weight.dtype)


# fixed (tuning runs would add twice); 8 warps: with 4 the tile's dz, dH and dW spill on sm_90
FILTERED_BLOCKS = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}


def _filtered_backward(
    hidden, weight, target, lse, coef, a, lseg, v0, chunk, levels, scalars, upcast, d_hidden, d_weight, sink, eps
):
    """One fused kernel per vocabulary chunk: tiles below ``eps`` are skipped, the others add their
    ``dH`` and ``dW`` atomically (fp32; the summation order varies run to run)."""
    (n, d), v_local, dev = hidden.shape, weight.shape[0], hidden.device
    dh = d_hidden if d_hidden is not None else torch.zeros(n, d, device=dev)
    blocks = dict(INTERPRET_BLOCKS, BLOCK_D=max(16, triton.next_power_of_2(min(d, 64)))) if _interpreting() else FILTERED_BLOCKS
    extra = {} if _interpreting() else {"num_warps": 8}
    for vs in range(0, v_local, chunk):
        vc = min(chunk, v_local - vs)
        dw = sink[vs : vs + vc] if sink is not None else torch.zeros(vc, d, device=dev)
        if n:
            grid = (triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(vc, blocks["BLOCK_V"]))
            _gce_bwd_filtered_kernel[grid](
                hidden,
                weight,
                target,
                lse,
                coef,
                a,
                lseg,
                dh,
                dw,
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
                dw.stride(0),
                *scalars,
                float(eps),
                NUM_LEVELS=levels,
                UPCAST=upcast,
                **blocks,
                **extra,
            )
        if d_weight is not None and sink is None:
            d_weight[vs : vs + vc] = dw.to(weight.dtype)


def _check_filtered_backward_compiles() -> None:
    """Triton 3.6 and 3.7 stop with an MLIR error (their TMEM layout pass) when they compile the
    filtered backward for sm_100/103; 3.5, 3.8 and 3.9 compile it (tools/check_triton_kernels.py)."""
    arch = driver.active.get_current_target().arch
    if 100 <= arch < 110 and triton.__version__.startswith(("3.6.", "3.7.")):
        version = triton.__version__
        raise RuntimeError(
            f"gce.grad_filter does not compile for sm_{arch} with Triton {version}: use Triton 3.8 or newer, or grad_filter 0"
        )


def gce_triton(
    hidden,
    weight,
    target,
    group_sizes,
    group_weights,
    token_weight,
    tp_group=None,
    block_v=None,
    weight_grad_sink=None,
    grad_filter=0.0,
):
    """``block_v`` is the vocabulary chunk of the backward's logit-gradient buffer (default
    ``DEFAULT_CHUNK_V``); ``grad_filter > 0`` skips the gradient tiles whose softmax stays below it
    (inexact, :func:`_filtered_backward`)."""
    if grad_filter and not _interpreting():
        _check_filtered_backward_compiles()
    return TritonGCE.apply(
        hidden,
        weight,
        target.contiguous(),
        token_weight.contiguous(),
        tuple(group_sizes),
        tuple(group_weights),
        tp_group,
        block_v,
        weight_grad_sink,
        float(grad_filter),
    )
