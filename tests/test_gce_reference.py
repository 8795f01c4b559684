import pytest
import torch
import torch.nn.functional as F

from megamdm.gce import gce_loss


def data(n=24, v=32, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def test_zero_group_weights_equal_cross_entropy():
    h, w, y = data()
    ref = F.cross_entropy(h @ w.t(), y)
    got = gce_loss(h, w, y, [4, 16], [0.0, 0.0])
    assert torch.allclose(got, ref, rtol=1e-6)
    assert torch.allclose(gce_loss(h, w, y, [], []), ref, rtol=1e-6)


def test_group_size_one_is_scaled_cross_entropy():
    h, w, y = data()
    ref = F.cross_entropy(h @ w.t(), y)
    assert torch.allclose(gce_loss(h, w, y, [1], [0.3]), 1.3 * ref, rtol=1e-6)


def test_gradcheck_float64():
    h, w, y = data(n=6, v=16, d=4, dtype=torch.float64)
    tw = torch.rand(6, dtype=torch.float64)
    fn = lambda hh, ww: gce_loss(hh, ww, y, [2, 8], [0.2, 0.1], token_weight=tw, reduction="sum")
    assert torch.autograd.gradcheck(fn, (h, w))


def test_gradient_matches_closed_form():
    # With W = I the hidden states are the logits, so dL/dh is dL/dz.
    n, v = 10, 16
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, v, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    sizes, lams = [2, 8], [0.2, 0.5]
    gce_loss(z, torch.eye(v, dtype=torch.float64), y, sizes, lams, reduction="sum").backward()
    p = torch.softmax(z.detach(), -1)
    expected = (1 + sum(lams)) * p - F.one_hot(y, v).double()
    for gsz, lam in zip(sizes, lams):
        in_group = (torch.arange(v)[None, :] // gsz) == (y[:, None] // gsz)
        zg = z.detach().masked_fill(~in_group, float("-inf"))
        expected -= lam * torch.softmax(zg, -1)
    assert torch.allclose(z.grad, expected, atol=1e-12)


def test_weights_ignore_and_reductions():
    h, w, y = data()
    tw = torch.rand(24)
    ign = torch.zeros(24, dtype=torch.bool)
    ign[::3] = True
    y_bad = y.clone()
    y_bad[ign] = -100  # ignored targets may be anything
    per = gce_loss(h, w, y_bad, [4], [0.2], reduction="none", token_weight=tw, ignore_mask=ign)
    ref = gce_loss(h, w, y, [4], [0.2], reduction="none")
    assert torch.allclose(per, torch.where(ign, 0.0, tw * ref))
    s = gce_loss(h, w, y_bad, [4], [0.2], reduction="sum", token_weight=tw, ignore_mask=ign)
    m = gce_loss(h, w, y_bad, [4], [0.2], reduction="mean", token_weight=tw, ignore_mask=ign)
    assert torch.allclose(s, per.sum()) and torch.allclose(m, per.sum() / tw[~ign].sum())


def test_stats_and_bad_input():
    h, w, y = data()
    st = gce_loss(h, w, y, [4, 8], [0.2, 0.1], return_stats=True, reduction="none")
    assert torch.allclose(st.lse, torch.logsumexp(h @ w.t(), -1), atol=1e-5)
    assert st.group.shape == (2, 24) and (st.group >= -1e-6).all()  # lse >= lse of any subset
    assert torch.allclose(st.loss, st.ce + 0.2 * st.group[0] + 0.1 * st.group[1])
    with pytest.raises(ValueError, match="does not divide the vocabulary"):
        gce_loss(h, w, y, [5], [0.2])
    with pytest.raises(ValueError, match="target ids"):
        gce_loss(h, w, y + 100, [4], [0.2])
    with pytest.raises(ValueError, match="unknown GCE impl"):
        gce_loss(h, w, y, [4], [0.2], impl="cuda")
