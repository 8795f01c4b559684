"""The fused GCE in plain PyTorch: blocks of vocabulary and tokens, never the N x V logits.

The target logit and the target groups' log-sum-exps need no pass over the vocabulary: they are
indexed dot products of each token's hidden state with its target's ``g`` group rows (the target is
one of them), computed up front in bounded token chunks. The vocabulary loop is then a plain matmul
per (vocabulary block, token block) tile with an online log-sum-exp: no indexing, no data-dependent
branch, so no host synchronisation. Only per-token statistics are saved. Backward recomputes each
tile's logits and forms

    dz = (a (1 + sum_l lambda_l) + g_lse) softmax(z) - a onehot(y) - sum_l a lambda_l softmax_{G_l(y)}(z)

with ``a = grad_loss * token_weight``: the softmax term for the whole tile, the two sparse terms by a
masked scatter of the few columns of the tile that hold a token's target group (tokens whose target
lies in another block add zeros). Then ``dH += dz W_b`` (fp32, [N, d]) and ``dW_b += dz^T H``, each
added in place. With a weight gradient sink (megatron's fp32 ``main_grad``) ``dW_b`` is added
straight into the sink's rows and the weight receives a placeholder, so the weight gradient is
never held a second time.
Peak extra memory: the fp32 ``dH`` accumulator, one block's fp32 ``dW`` (none with a sink) and a
few tiles.

On CPU without vocab parallelism, when a backward will follow, the forward also forms the gradient
for a unit upstream gradient (:func:`_one_pass`: three matmuls per token block instead of four, the
block's logits over the whole vocabulary held at once). ``dz`` is linear in the upstream gradient, so
when it is the same for every token (a summed or averaged loss, no z-loss) backward only scales it;
otherwise backward recomputes exactly as above. The check reads a CPU tensor: no device to wait for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .vocab_parallel import combine, tp_rank_and_size

DEFAULT_BLOCK_V = 3072  # H100, N=4096, V=131072, d=4096: as fast as 4096, extra memory 1.9% of naive (docs/gce.md)
DEFAULT_BLOCK_N = 8192
# CPU: a 512-token tile (512 x 1536 fp32 = 3 MB) stays in cache between the matmul, the
# exp and the sums; 8192 tokens streamed each pass through memory (docs/gce.md)
DEFAULT_BLOCK_N_CPU = 512
# CPU one pass (2-core AMD EPYC, AVX-512, tools/bench_gce.py): 1024-token blocks at the demo's head
# (N=5500, V=1536, d=64) 0.036 -> 0.030 s against 512; 128 MiB of logits at V=65536, d=512 3.09 -> 3.00 s
ONE_PASS_BLOCK_N = 1024
ONE_PASS_BYTES = 128 * 2**20  # a token block's logits over the whole vocabulary stay below this
GATHER_BYTES = 256 * 2**20  # the up-front group rows of one token chunk ([n, g, d]) stay below this


_HALF = (torch.bfloat16, torch.float16)


def on_cpu(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the CPU paths. Every other device takes the GPU paths: CUDA, and the meta
    device on which tools/check_triton_kernels.py traces them."""
    return t.device.type == "cpu"


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated in fp32, returned in fp32. On CUDA half-precision operands go through
    tensor cores with an fp32 output. On CPU every operand is upcast to fp32: torch has no
    fp32-output ``mm`` for half operands there, and a bf16 ``mm`` rounds the logits to bf16, which
    trained the demo worse (final masked CE +0.005-0.013, docs/gce.md). A transposed right
    operand (the weight block, small) is made contiguous, since CPU BLAS runs ``h @ w.t()`` at half
    the speed of ``h @ w.t().contiguous()``."""
    low = a.dtype if a.dtype in _HALF else b.dtype if b.dtype in _HALF else None
    if not on_cpu(a) and low is not None:
        return torch.mm(a.to(low), b.to(low), out_dtype=torch.float32)
    if not on_cpu(a):
        return a.float() @ b.float()
    return a.float() @ b.float().contiguous()


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place, ``acc`` fp32, multiplied as :func:`_mm_f32` does: no product
    temporary beside the accumulator (on CUDA cuBLAS adds the fp32 product of half operands)."""
    low = a.dtype if a.dtype in _HALF else b.dtype if b.dtype in _HALF else None
    if not on_cpu(a) and low is not None:
        return torch.addmm(acc, a.to(low), b.to(low), out_dtype=torch.float32, out=acc)
    if not on_cpu(a):
        return acc.addmm_(a.float(), b.float())
    return acc.addmm_(a.float(), b.float().contiguous())


def weight_grad_placeholder(weight: torch.Tensor) -> torch.Tensor:
    """What backward returns for the weight when its gradient went into a sink: an uninitialised
    tensor the caller ignores (it exists so the weight's gradient hooks still run)."""
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def _operand(t: torch.Tensor) -> torch.Tensor:
    """A matmul operand as :func:`_mm_f32` uses it, converted once per call or block rather than per
    tile: fp32 and contiguous on CPU, unchanged on CUDA."""
    return t if not on_cpu(t) else t.float().contiguous()


def _operand_t(t: torch.Tensor) -> torch.Tensor:
    """``t.t()`` as :func:`_mm_f32`'s right operand, made once per block (contiguous on CPU)."""
    return t.t() if not on_cpu(t) else _operand(t.t())


def block_size_v(block_v: int | None, group_sizes: Sequence[int], vocab_local: int) -> int:
    gmax = max(group_sizes) if group_sizes else 1
    bv = max(block_v or DEFAULT_BLOCK_V, gmax)
    bv = (bv + gmax - 1) // gmax * gmax
    return min(bv, vocab_local)


def target_stats(hidden, weight, t_local, group_sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logit ``[N]`` and target-group log-sum-exps ``[L, N]`` (fp32) by indexed dot products
    with this shard's rows. ``t_local`` is clamped into the shard: tokens whose target another shard
    owns get values that :func:`~megamdm.gce.vocab_parallel.combine` replaces."""
    n, d = hidden.shape
    v_local = weight.shape[0]
    t = t_local.clamp(0, v_local - 1)
    g = max(group_sizes) if group_sizes else 1
    zy = torch.empty(n, device=hidden.device)
    lseg = torch.empty(len(group_sizes), n, device=hidden.device)
    step = max(1, GATHER_BYTES // (g * d * 4))
    offsets = torch.arange(g, device=hidden.device)
    for s in range(0, n, step):
        ts, h = t[s : s + step], hidden[s : s + step]
        start = ts - ts % g
        rows = weight[start[:, None] + offsets]  # [n, g, d]: the widest group, which holds every level's
        if not on_cpu(h) and (h.dtype in _HALF or rows.dtype in _HALF):
            low = h.dtype if h.dtype in _HALF else rows.dtype
            zg = torch.bmm(rows.to(low), h.to(low)[:, :, None], out_dtype=torch.float32)[..., 0]
        else:
            zg = (rows.float() @ h.float()[:, :, None])[..., 0]  # [n, g]
        within = ts - start
        zy[s : s + step] = zg.gather(1, within[:, None])[:, 0]
        for li, gl in enumerate(group_sizes):
            first = within - within % gl  # the level-l group inside the widest one
            cols = first[:, None] + torch.arange(gl, device=hidden.device)
            lseg[li, s : s + step] = torch.logsumexp(zg.gather(1, cols), dim=1)
    return zy, lseg


def losses(lse_local, zy, lseg, owned, tp_group, token_weight, group_weights):
    """The forward's end, shared by the fused implementations: the shards' statistics combined
    (:func:`~megamdm.gce.vocab_parallel.combine`), then ``(loss [N], lse [N], ce [N], group [L, N],
    lseg [L, N])`` with ``loss = w (ce + sum_l lambda_l (lse - lse_{G_l}))``."""
    lse, zy, lseg = combine(lse_local, zy, lseg, owned, tp_group)
    ce = lse - zy
    grp = lse[None, :] - lseg
    total = ce
    for li, lam in enumerate(group_weights):
        total = total + lam * grp[li]
    return token_weight * total, lse, ce, grp, lseg


def upstream_coefficients(g_loss, g_lse, token_weight, group_weights, n: int, device):
    """``a = grad_loss * token_weight`` and the softmax coefficient ``a (1 + sum_l lambda_l) + g_lse``
    of the logit gradient (fp32 ``[N]`` each), shared by the fused implementations' backwards."""
    a = (g_loss.float() if g_loss is not None else torch.zeros(n, device=device)) * token_weight
    coef = a * (1.0 + sum(group_weights))
    if g_lse is not None:
        coef = coef + g_lse.float()
    return a, coef


def _sparse_terms(z, t, a, lseg, group_sizes, group_weights, ranges, inb=None):
    """The target's and its groups' terms of a tile's logit gradient, as (columns, values) to scatter:
    ``-a`` at the target and ``-a lambda_l softmax_{G_l}(z)`` over each group (``t``: the target's
    column in the tile, clamped; ``inb``: whether it lies in this tile at all, None for always)."""
    sparse = [(t[:, None], (-a if inb is None else torch.where(inb, -a, 0.0))[:, None])]
    for li, (g, lam) in enumerate(zip(group_sizes, group_weights)):
        cols = (t - t % g)[:, None] + ranges[li]
        term = (-lam * a)[:, None] * torch.exp(z.gather(1, cols) - lseg[li, :, None])
        sparse.append((cols, term if inb is None else torch.where(inb[:, None], term, 0.0)))
    return sparse


def _one_pass(hidden, weight, target, token_weight, lseg, group_sizes, group_weights, block_n, need_h, need_w):
    """CPU, one vocabulary shard: the log-sum-exps and, for a unit upstream gradient, ``dH`` and
    ``dW`` (fp32) in one pass, three matmuls per token block instead of four. Each token block's
    logits over the whole vocabulary are held at once (at most :data:`ONE_PASS_BYTES`), so its
    log-sum-exp is known before its gradient is formed."""
    n, d = hidden.shape
    v = weight.shape[0]
    hs, ws = _operand(hidden), _operand(weight)
    wst = _operand_t(ws)
    bn = max(1, min(block_n, ONE_PASS_BYTES // (4 * v)))
    lse = torch.empty(n)
    d_hidden = torch.empty(n, d) if need_h else None
    d_weight = torch.zeros(v, d) if need_w else None
    coef = token_weight.float() * (1.0 + sum(group_weights))
    ranges = [torch.arange(g) for g in group_sizes]
    for ns in range(0, n, bn):
        sl = slice(ns, min(ns + bn, n))
        z = hs[sl] @ wst
        a = token_weight[sl].float()
        sparse = _sparse_terms(z, target[sl], a, lseg[:, sl], group_sizes, group_weights, ranges)
        m = z.amax(1)
        total = z.sub_(m[:, None]).exp_().sum(1)  # z becomes exp(z - m): one exp pass for the lse and softmax
        lse[sl] = m + total.log()
        dz = z.mul_((coef[sl] / total)[:, None])
        for cols, vals in sparse:
            dz.scatter_add_(1, cols, vals)
        if need_h:
            torch.mm(dz, ws, out=d_hidden[sl])
        if need_w:
            d_weight.addmm_(dz.t(), hs[sl])
    return lse, d_hidden, d_weight


def _uniform(g: torch.Tensor) -> bool:
    """Whether every token's upstream gradient is the same (a summed or averaged loss): CPU only."""
    return g.numel() == 0 or bool((g == g[0]).all())


class ChunkedGCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, group_sizes, group_weights, tp_group, block_v, block_n, grads, sink):
        n, v_local = hidden.shape[0], weight.shape[0]
        rank, _ = tp_rank_and_size(tp_group)
        v0 = rank * v_local
        bv = block_size_v(block_v, group_sizes, v_local)
        bn = min(block_n or (DEFAULT_BLOCK_N_CPU if on_cpu(hidden) else DEFAULT_BLOCK_N), max(n, 1))
        t_local = target - v0
        owned = (t_local >= 0) & (t_local < v_local)
        # on CPU without vocab parallelism the gradient is formed with the loss, for the common case
        # of a summed loss (backward checks that it is one); on GPUs that check would be a host sync
        one_pass = grads and on_cpu(hidden) and tp_group is None
        ctx.ahead = None
        with torch.no_grad():
            zy, lseg = target_stats(hidden, weight, t_local, group_sizes)
            if one_pass:
                lse_local, dh, dw = _one_pass(
                    hidden,
                    weight,
                    target,
                    token_weight,
                    lseg,
                    group_sizes,
                    group_weights,
                    block_n or ONE_PASS_BLOCK_N,
                    *ctx.needs_input_grad[:2],
                )
                ctx.ahead = (dh, dw)
            else:
                hs = _operand(hidden)
                lse_local = torch.full((n,), float("-inf"), device=hidden.device)
                for vs in range(0, v_local, bv):
                    wb = _operand_t(weight[vs : vs + bv])
                    for ns in range(0, n, bn):
                        part = torch.logsumexp(_mm_f32(hs[ns : ns + bn], wb), dim=1)
                        sl = slice(ns, ns + part.shape[0])
                        lse_local[sl] = torch.logaddexp(lse_local[sl], part)
            loss, lse, ce, grp, lseg = losses(lse_local, zy, lseg, owned, tp_group, token_weight, group_weights)
        ctx.save_for_backward(hidden, weight, target, token_weight, lse, lseg)
        ctx.cfg = (list(group_sizes), list(group_weights), v0, bv, bn)
        ctx.sink = sink
        ctx.mark_non_differentiable(ce, grp)
        ctx.set_materialize_grads(False)  # an unused lse (no z-loss) has no gradient, not one of zeros
        return loss, lse, ce, grp

    @staticmethod
    def backward(ctx, g_loss, g_lse, _g_ce, _g_grp):
        hidden, weight, target, token_weight, lse, lseg = ctx.saved_tensors
        group_sizes, group_weights, v0, bv, bn = ctx.cfg
        sink = ctx.sink
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        ahead, ctx.ahead = ctx.ahead, None
        if ahead is not None and g_lse is None and g_loss is not None and _uniform(g_loss):
            g0 = g_loss.float()[0] if g_loss.numel() else 0.0
            dh, dw = ahead
            if dw is not None and sink is not None:
                sink.add_(dw, alpha=float(g0))
                dw = weight_grad_placeholder(weight)
            elif dw is not None:
                dw = dw.mul_(g0).to(weight.dtype)
            return (dh.mul_(g0).to(hidden.dtype) if dh is not None else None, dw, *([None] * 9))
        n, v_local = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        a, coef = upstream_coefficients(g_loss, g_lse, token_weight, group_weights, n, dev)
        d_hidden = torch.zeros(n, hidden.shape[1], device=dev, dtype=torch.float32) if need_h else None
        d_weight = None
        if need_w:
            d_weight = weight_grad_placeholder(weight) if sink is not None else torch.empty_like(weight)
        t_local = target - v0
        ranges = [torch.arange(g, device=dev) for g in group_sizes]
        hs = _operand(hidden)
        for vs in range(0, v_local, bv):
            wb = _operand(weight[vs : vs + bv])
            wbt = _operand_t(wb)
            width = wb.shape[0]
            dwb = None  # this block's fp32 weight gradient: the sink's rows, or a buffer
            if need_w:
                dwb = sink[vs : vs + width] if sink is not None else torch.zeros(width, hidden.shape[1], device=dev)
            for ns in range(0, n, bn):
                hb = hs[ns : ns + bn]
                sl = slice(ns, ns + hb.shape[0])
                z = _mm_f32(hb, wbt)
                tb = t_local[sl] - vs
                inb = (tb >= 0) & (tb < width)  # the token's target (and its groups) lie in this tile
                tc = tb.clamp(0, width - 1)
                sparse = _sparse_terms(z, tc, a[sl], lseg[:, sl], group_sizes, group_weights, ranges, inb)
                dz = z.sub_(lse[sl, None]).exp_().mul_(coef[sl, None])  # z becomes dz (in place)
                for cols, vals in sparse:
                    dz.scatter_add_(1, cols, vals)
                if need_h:
                    _addmm_f32_(d_hidden[sl], dz, wb)
                if need_w:
                    _addmm_f32_(dwb, dz.t(), hb)
            if need_w and sink is None:
                d_weight[vs : vs + width] = dwb.to(weight.dtype)
        if need_h:
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, d_weight, *([None] * 9)


def gce_chunked(
    hidden,
    weight,
    target,
    group_sizes,
    group_weights,
    token_weight,
    tp_group=None,
    block_v=None,
    block_n=None,
    weight_grad_sink=None,
):
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)  # a backward will follow
    return ChunkedGCE.apply(
        hidden,
        weight,
        target,
        token_weight,
        tuple(group_sizes),
        tuple(group_weights),
        tp_group,
        block_v,
        block_n,
        grads,
        weight_grad_sink,
    )
