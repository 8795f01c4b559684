import os

import pytest
import torch
import torch.distributed as dist

from megamdm.gce import gce_loss

from .support.distributed import run_distributed

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


def problem(n, v, d, dtype, seed=0, weights=True, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5 * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    tw = torch.where(torch.rand(n, generator=g) < 0.2, 0.2, 1.0) if weights else None
    ign = (torch.rand(n, generator=g) < 0.1) if ignore else None
    return h, w, y, tw, ign


def run(impl, h, w, y, tw, ign, sizes, lams, device="cpu", upstream="z_loss", sink=False, **kw):
    """Loss and gradients; ``upstream``: what the loss feeds into, ``z_loss`` (a summed loss plus a
    z-loss on the lse), ``sum`` (the summed loss alone) or ``uneven`` (per-token scales). ``sink``:
    the weight gradient is added into an fp32 sink that already holds 0.5 (megatron's main_grad)."""
    h = h.detach().clone().to(device).requires_grad_(True)
    w = w.detach().clone().to(device).requires_grad_(True)
    if sink:
        kw["weight_grad_sink"] = torch.full(w.shape, 0.5, device=device)
    st = gce_loss(
        h,
        w,
        y.to(device),
        sizes,
        lams,
        impl=impl,
        token_weight=None if tw is None else tw.to(device),
        ignore_mask=None if ign is None else ign.to(device),
        return_stats=True,
        reduction="none",
        **kw,
    )
    if upstream == "z_loss":  # a z-loss exercises the gradient through lse
        (st.loss.sum() + 1e-2 * (st.lse**2).sum()).backward()
    elif upstream == "sum":
        st.loss.sum().backward()
    else:
        (st.loss * torch.linspace(0.5, 2.0, st.loss.numel(), device=st.loss.device)).sum().backward()
    dw = kw["weight_grad_sink"] - 0.5 if sink else w.grad
    return st.loss.detach().sum().float().cpu(), h.grad.float().cpu(), dw.float().cpu(), st.lse.detach().float().cpu()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CASES = [  # (n, v, d, group sizes, group weights, block_v, block_n)
    (37, 200, 16, [8], [0.2], 64, 16),  # V not a multiple of the block
    (64, 384, 32, [4, 32], [0.2, 0.1], 96, 40),  # two levels, ragged token blocks
    (50, 256, 8, [2, 8, 64], [0.3, 0.2, 0.1], 32, 64),  # a group wider than the block
    (16, 128, 24, [], [], 50, 7),  # plain cross-entropy
    (700, 192, 16, [8], [0.2], None, None),  # default blocks: two token blocks on CPU
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", CASES)
def test_torch_impl_matches_naive(case, dtype, tol):
    n, v, d, sizes, lams, bv, bn = case
    h, w, y, tw, ign = problem(n, v, d, dtype)
    ref = run("naive", h, w, y, tw, ign, sizes, lams)
    got = run("torch", h, w, y, tw, ign, sizes, lams, block_v=bv, block_n=bn)
    for a, b in zip(got, ref):
        assert rel(a, b) < tol


@pytest.mark.parametrize("case", [CASES[1], CASES[4]])
def test_torch_impl_keeps_bf16_logits_in_fp32(case):
    """bf16 operands give the loss of their exact fp32 products: a CPU bf16 ``mm`` would round the
    logits to bf16 (~1e-4 relative here), which cost the demo's training (docs/gce.md)."""
    n, v, d, sizes, lams, bv, bn = case
    h, w, y, tw, ign = problem(n, v, d, torch.bfloat16)
    ref = run("naive", h, w, y, tw, ign, sizes, lams)  # logits from the upcast operands, in fp32
    got = run("torch", h, w, y, tw, ign, sizes, lams, block_v=bv, block_n=bn)
    assert rel(got[0], ref[0]) < 1e-6 and rel(got[3], ref[3]) < 1e-6


TRITON_CASES = CASES + [(40, 256, 16, [4, 16], [0.0, 0.3], 64, None)]  # a level of weight 0 (skipped in backward)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_impl_matches_naive(case, dtype, tol):
    pytest.importorskip("triton")
    n, v, d, sizes, lams, bv, _ = case
    h, w, y, tw, ign = problem(n, v, d, dtype)
    dev = "cuda" if HAS_CUDA else "cpu"
    ref = run("naive", h, w, y, tw, ign, sizes, lams, device=dev)
    got = run("triton", h, w, y, tw, ign, sizes, lams, device=dev, block_v=bv)
    for a, b in zip(got, ref):
        assert rel(a, b) < tol


def test_triton_forward_merges_vocabulary_splits():
    """The forward's grid splits the vocabulary; the per-split log-sum-exps must merge exactly."""
    pytest.importorskip("triton")
    from megamdm.gce.triton_kernels import _split_width

    assert _split_width(37, 200, torch.device("cpu")) < 200  # the cases above run with several splits


@pytest.mark.parametrize("upstream", ["sum", "uneven", "z_loss"])
@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if TRITON_OK else []))
def test_weight_gradient_goes_into_the_sink(impl, upstream):
    """With ``weight_grad_sink`` the weight gradient is added to it in fp32 (one pass and recompute
    paths alike) and the weight's own gradient is only a placeholder."""
    if impl == "triton":
        pytest.importorskip("triton")
    n, v, d, sizes, lams, bv, bn = CASES[1]
    h, w, y, tw, ign = problem(n, v, d, torch.bfloat16)
    ref = run("naive", h, w, y, tw, ign, sizes, lams, upstream=upstream)
    got = run(impl, h, w, y, tw, ign, sizes, lams, upstream=upstream, sink=True, block_v=bv)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-2
    # fp32 in the sink: the gradient of the upcast operands, not its bf16 rounding
    exact = run(impl, h.float(), w.float(), y, tw, ign, sizes, lams, upstream=upstream, block_v=bv)[2]
    rounded = run(impl, h, w, y, tw, ign, sizes, lams, upstream=upstream, block_v=bv)[2]
    assert rel(got[2], exact) < 1e-5 < 1e-4 < rel(rounded, exact)


def test_a_wrong_sink_is_refused():
    h, w, y, _, _ = problem(8, 32, 8, torch.float32)
    with pytest.raises(ValueError, match="weight_grad_sink must be fp32"):
        gce_loss(h, w, y, [8], [0.2], impl="torch", weight_grad_sink=torch.zeros(32, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("upstream", ["sum", "uneven"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]])
def test_cpu_one_pass_gradient_and_its_fallback(case, upstream, monkeypatch):
    """On CPU the gradient is formed with the loss (three matmuls per block, not four) for a summed
    loss; any other upstream gradient (per-token scales, a z-loss) recomputes it exactly."""
    import megamdm.gce.chunked as chunked

    calls = []
    real = chunked._one_pass
    monkeypatch.setattr(chunked, "_one_pass", lambda *a: calls.append(1) or real(*a))
    n, v, d, sizes, lams, bv, bn = case
    h, w, y, tw, ign = problem(n, v, d, torch.float32)
    ref = run("naive", h, w, y, tw, ign, sizes, lams, upstream=upstream)
    got = run("torch", h, w, y, tw, ign, sizes, lams, upstream=upstream, block_v=bv, block_n=bn)
    assert calls == [1]  # the one pass ran; with "uneven" its gradient was set aside and recomputed
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-5


def test_reductions_and_no_grad_path():
    h, w, y, tw, ign = problem(30, 64, 8, torch.float32)
    for red in ["mean", "sum", "none"]:
        a = gce_loss(h, w, y, [8], [0.2], impl="torch", reduction=red, token_weight=tw, ignore_mask=ign)
        b = gce_loss(h, w, y, [8], [0.2], impl="naive", reduction=red, token_weight=tw, ignore_mask=ign)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _tp_worker(impl, sizes, lams):
    """Each rank holds a vocabulary shard; the result must equal the unsplit operator."""
    rank, world = dist.get_rank(), dist.get_world_size()
    h, w, y, tw, ign = problem(48, 256, 16, torch.float32, seed=3)
    full = run("naive", h, w, y, tw, ign, sizes, lams)
    shard = w.chunk(world, 0)[rank]
    dev = "cuda" if impl == "triton" and HAS_CUDA else "cpu"  # gloo reduces CUDA tensors too
    loss, dh, dw, lse = run(impl, h, shard, y, tw, ign, sizes, lams, device=dev, tp_group=dist.group.WORLD, block_v=32)
    dh_sum = dh.clone()
    dist.all_reduce(dh_sum)  # dH is each rank's partial sum: the caller reduces it
    return {
        "loss": rel(loss, full[0]),
        "lse": rel(lse, full[3]),
        "dh": rel(dh_sum, full[1]),
        "dh_partial_differs": rel(dh, full[1]),
        "dw": rel(dw, full[2].chunk(world, 0)[rank]),
    }


@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if TRITON_OK else []))
def test_vocab_parallel_tp2_equals_tp1(impl):
    if impl == "triton":  # here, not in the forked ranks: a skip raised there is a failure of the rank
        pytest.importorskip("triton")
    for r in run_distributed(_tp_worker, 2, impl, [8, 32], [0.2, 0.1]):
        assert r["loss"] < 1e-6 and r["lse"] < 1e-6 and r["dh"] < 1e-5 and r["dw"] < 1e-5, r
        assert r["dh_partial_differs"] > 1e-3  # the partial is not already reduced


def _shard_refusal_worker():
    h, w, y, _, _ = problem(8, 48, 8, torch.float32)
    shard = w.chunk(2, 0)[dist.get_rank()]  # 24 rows per rank
    try:
        gce_loss(h, shard, y, [16], [0.2], impl="torch", tp_group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return None


def test_group_size_must_divide_the_shard():
    msgs = run_distributed(_shard_refusal_worker, 2)
    assert all(m and "does not divide the vocabulary shard" in m and "24" in m for m in msgs), msgs


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_the_fused_op_makes_no_host_sync_on_gpu(impl):
    """With CUDA's sync debug mode set to error, forward and backward of the fused op run through:
    no ``.item()``, no data-dependent branch, no pageable copy (the warm-up call autotunes)."""
    if impl == "triton":
        pytest.importorskip("triton")
    h, w, y, tw, _ = problem(700, 384, 32, torch.bfloat16)
    h, w = h.cuda().requires_grad_(True), w.cuda().requires_grad_(True)
    y, tw = y.cuda(), tw.cuda()
    sink = torch.zeros(w.shape, device="cuda")
    gce_loss(h, w, y, [8], [0.2], impl=impl, token_weight=tw, reduction="sum", weight_grad_sink=sink).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = gce_loss(h, w, y, [8], [0.2], impl=impl, token_weight=tw, reduction="sum", weight_grad_sink=sink)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert h.grad is not None and sink.abs().sum() > 0


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("sink", [False, True])
def test_gradient_filtering_skips_only_negligible_tiles(sink):
    """``grad_filter``: with a threshold no softmax value reaches, only the tiles holding a target or
    a target group contribute, and the gradients are exactly those of the dense op with every other
    column's softmax term dropped; with a threshold of 1e-30 nothing is skipped (equal to naive)."""
    pytest.importorskip("triton")
    n, v, d, sizes, lams, bv = 40, 4096, 16, [8], [0.2], 1024  # most 64-column tiles hold no target
    h, w, y, tw, ign = problem(n, v, d, torch.float32)
    ref = run("naive", h, w, y, tw, ign, sizes, lams, upstream="sum")
    dense = run("triton", h, w, y, tw, ign, sizes, lams, upstream="sum", block_v=bv, grad_filter=1e-30, sink=sink)
    for a, b in zip(dense, ref):
        assert rel(a, b) < 1e-5
    got = run("triton", h, w, y, tw, ign, sizes, lams, upstream="sum", block_v=bv, grad_filter=0.999, sink=sink)
    assert rel(got[0], ref[0]) < 1e-6  # the forward is never filtered
    assert 1e-3 < rel(got[2], ref[2]) < 0.5  # inexact, but the target and group terms are kept
    # the expected filtered dW: softmax terms only in 64-column tiles (the interpreter's) that hold a
    # target or target group of a token of the same 32-token block
    wt = tw * (~ign).float()
    yy = torch.where(ign, 0, y)
    z = (h @ w.t()).requires_grad_(True)
    p = torch.softmax(z, -1).detach()
    keep = torch.zeros(n, v, dtype=torch.bool)
    widest = max(sizes)
    for r0 in range(0, n, 32):
        rows = slice(r0, r0 + 32)
        for c0 in range(0, v, 64):
            cols = torch.arange(c0, min(c0 + 64, v))
            start = yy[rows] - yy[rows] % widest
            if ((cols[None, :] >= start[:, None]) & (cols[None, :] < start[:, None] + widest)).any():
                keep[rows, c0 : c0 + 64] = True
    lse = torch.logsumexp(z, -1)
    g0 = (yy - yy % sizes[0])[:, None] + torch.arange(sizes[0])
    loss = wt * (lse - z.gather(1, yy[:, None])[:, 0] + lams[0] * (lse - torch.logsumexp(z.gather(1, g0), -1)))
    dz = torch.autograd.grad(loss.sum(), z)[0]
    coef = wt * (1 + sum(lams))
    dz_kept = torch.where(keep, dz, dz - coef[:, None] * p)  # skipped tiles lose only their softmax term
    assert not keep.all()
    assert rel(got[2], dz_kept.t() @ h) < 1e-5
    assert rel(got[1], dz_kept @ w) < 1e-5


def test_gradient_filtering_needs_the_triton_operator():
    h, w, y, _, _ = problem(8, 32, 8, torch.float32)
    with pytest.raises(ValueError, match="grad_filter needs impl='triton'"):
        gce_loss(h, w, y, [8], [0.2], impl="torch", grad_filter=1e-4)


@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if TRITON_OK else []))
def test_the_fused_op_reads_nothing_back_by_construction(impl):
    """On CPU, the ops that would make a GPU's host wait (scalar reads, data-sized outputs, boolean
    indexing, host-built tensors) are counted under a dispatch mode through forward and backward of
    the path GPUs take (for ``torch``: the recompute path, not the CPU-only one pass, whose check
    of a uniform upstream gradient reads a CPU tensor). There must be none."""
    from megamdm.gce.chunked import ChunkedGCE

    from .support.device_reads import DeviceReads

    h, w, y, tw, _ = problem(70, 192, 16, torch.float32)
    h.requires_grad_(True)
    w.requires_grad_(True)
    spy = DeviceReads()
    with spy.mode:
        if impl == "torch":
            out = ChunkedGCE.apply(h, w, y, tw, (8,), (0.2,), None, 64, 32, False, None)
        else:
            from megamdm.gce.triton_kernels import gce_triton

            out = gce_triton(h, w, y, [8], [0.2], tw, block_v=64)
        (out[0].sum() + 1e-2 * (out[1] ** 2).sum()).backward()
    assert h.grad is not None and w.grad is not None
    assert spy.reads == [], spy.reads


@pytest.mark.parametrize("sink", [False, True])
def test_the_torch_operators_gpu_path_traces_on_meta(sink):
    """The GPU branches of the torch operator (fp32-output half matmuls into the accumulators) have
    not run here; on the meta device they do, with their shape and dtype rules checked."""
    h = torch.empty(3000, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(4096, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = torch.zeros(3000, device="meta", dtype=torch.long)
    main_grad = torch.empty(w.shape, device="meta") if sink else None
    loss = gce_loss(h, w, y, [8, 64], [0.2, 0.1], impl="torch", block_v=1024, weight_grad_sink=main_grad)
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32
    assert (h.grad.shape, h.grad.dtype) == (h.shape, torch.bfloat16)
    assert (w.grad.shape, w.grad.dtype) == (w.shape, torch.bfloat16)


def test_the_filtered_backward_is_refused_where_triton_cannot_compile_it(monkeypatch):
    """Triton 3.6 and 3.7 fail inside their compiler on the filtered backward for sm_100 (found by
    tools/check_triton_kernels.py): there ``grad_filter`` is one line naming the fix; other
    architectures and versions go on."""
    from types import SimpleNamespace

    from megamdm.gce import triton_kernels as tk

    def target(arch, version):
        monkeypatch.setattr(tk.triton, "__version__", version)
        active = SimpleNamespace(get_current_target=lambda: SimpleNamespace(arch=arch))
        monkeypatch.setattr(tk, "driver", SimpleNamespace(active=active))

    for arch, version in [(100, "3.6.0"), (103, "3.7.1")]:
        target(arch, version)
        with pytest.raises(RuntimeError, match=f"sm_{arch} with Triton {version}: use Triton 3.8 or newer, or grad_filter 0"):
            tk._check_filtered_backward_compiles()
    for arch, version in [(90, "3.6.0"), (100, "3.8.0"), (100, "3.5.1"), (120, "3.6.0")]:
        target(arch, version)
        tk._check_filtered_backward_compiles()


@pytest.mark.slow
@pytest.mark.parametrize("arch, levels", [(90, [1, 2]), (80, [1, 4])])
def test_the_triton_kernels_compile_without_spilling(arch, levels):
    """Every tile configuration the autotuner would try on an H100 (sm_90) or an A100 (sm_80),
    compiled at the paper's head in bf16 (tools/check_triton_kernels.py): no register spills,
    shared memory within the GPU's, its tensor-core instruction, pipelined loads. The interpreter
    the other tests use checks none of this. Caught here: 256-column tiles in the logit-gradient
    kernel (650 bytes of spills per thread), 4 warps in the filtered backward, int64 target ids
    (two levels spilled), Hopper tiles on an A100 (forward spills) and at four group levels."""
    pytest.importorskip("triton")
    import json
    import subprocess
    import sys
    from pathlib import Path

    from megamdm.gce.triton_kernels import tiles_for

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(root / "tools/check_triton_kernels.py"), "--arch", str(arch), "--json", "--levels"]
    r = subprocess.run(cmd + [str(k) for k in levels], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.stdout.strip(), r.stderr[-2000:]
    found = json.loads(r.stdout)
    assert r.returncode == 0, [c for c in found if c["problems"]]
    count = {}
    for c in found:
        count[c["kernel"]] = count.get(c["kernel"], 0) + 1
    dz = sum(len(tiles_for("dz", arch, k)) for k in levels)
    assert count == {"_lse_split_kernel": len(tiles_for("lse", arch)), "_gce_dz_kernel": dz, "_gce_bwd_filtered_kernel": 1}
    assert all(c["mma"].startswith("wgmma" if arch == 90 else "mma.sync") and c["async_loads"] > 0 for c in found)
