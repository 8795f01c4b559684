import math

import pytest
import torch

from megamdm.config import DiffusionConfig
from megamdm.diffusion import corrupt_batch, num_masked
from megamdm.sampling.schedules import unmask_counts

V, MASK_TEXT = 64, 257


def make(b=8, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, V, (b, h, w), generator=g),
        torch.randint(0, 256, (b, 12), generator=g),
        torch.zeros(b, 12, dtype=torch.bool),
    )


def run(cfg, seeds, group=8, **kw):
    img, txt, pad = make(b=len(seeds), **kw)
    return img, corrupt_batch(img, txt, pad, cfg, vocab_size=V, text_mask_id=MASK_TEXT, flip_group_size=group, seeds=seeds)


@pytest.mark.parametrize("schedule", ["uniform", "cosine", "logit_normal"])
def test_exact_mask_counts_and_weights(schedule):
    cfg = DiffusionConfig(t_schedule=schedule, flip_ratio=0.2, edit_loss_weight=0.2, prompt_drop=0.0)
    img, c = run(cfg, list(range(64)))
    n = 64
    for i in range(64):
        k = int(c.is_masked[i].sum())
        assert k == num_masked(float(c.mask_ratio[i]), n, cfg.eps)
        assert (c.image_input[i][c.is_masked[i]] == V).all()
        assert int(c.is_flipped[i].sum()) == round(0.2 * (n - k))
    assert not (c.is_masked & c.is_flipped).any()  # flips only on visible tokens
    flipped = c.is_flipped
    assert (c.image_input[flipped] != img[flipped]).all()  # a flip always changes the token
    untouched = ~(c.is_masked | c.is_flipped)
    assert torch.equal(c.image_input[untouched], img[untouched])
    expected_w = c.is_masked.float() + 0.2 * c.is_flipped.float()
    assert torch.equal(c.loss_weight, expected_w)
    assert torch.equal(c.target, img)


def test_at_least_one_masked_and_eps():
    assert num_masked(0.0, 100, 1e-3) == 1
    assert num_masked(1.0, 100, 1e-3) == 100
    assert num_masked(0.5, 100, 0.0) == 50


def test_group_flips_stay_in_group():
    cfg = DiffusionConfig(flip_ratio=0.5, flip_mode="group", prompt_drop=0.0)
    img, c = run(cfg, list(range(32)), group=8)
    f = c.is_flipped
    assert f.any()
    assert torch.equal(c.image_input[f] // 8, img[f] // 8)
    assert (c.image_input[f] != img[f]).all()


def test_prompt_drop_rate_within_bounds():
    cfg = DiffusionConfig(prompt_drop=0.1)
    n = 4000
    img, txt, pad = torch.zeros(n, 2, 2, dtype=torch.long), torch.randint(0, 256, (n, 5)), torch.rand(n, 5) < 0.3
    c = corrupt_batch(img, txt, pad, cfg, vocab_size=V, text_mask_id=MASK_TEXT, flip_group_size=8, seeds=range(n))
    dropped = (c.text_ids == MASK_TEXT).all(1)
    assert not c.text_pad_mask[dropped].any()  # a dropped prompt has no padding
    rate = dropped.float().mean().item()
    sd = math.sqrt(0.1 * 0.9 / n)
    assert abs(rate - 0.1) < 5 * sd
    kept = ~dropped
    assert torch.equal(c.text_ids[kept], txt[kept]) and torch.equal(c.text_pad_mask[kept], pad[kept])


def test_corruption_is_a_function_of_the_sample_seed():
    cfg = DiffusionConfig()
    img, txt, pad = make(b=4)
    a = corrupt_batch(img, txt, pad, cfg, vocab_size=V, text_mask_id=MASK_TEXT, flip_group_size=8, seeds=[5, 6, 7, 8])
    b = corrupt_batch(img[2:], txt[2:], pad[2:], cfg, vocab_size=V, text_mask_id=MASK_TEXT, flip_group_size=8, seeds=[7, 8])
    assert torch.equal(a.image_input[2:], b.image_input)


@pytest.mark.parametrize("schedule", ["shift", "cosine"])
def test_unmask_counts_sum_to_n(schedule):
    for n in [1, 2, 7, 64, 256, 1023, 4096]:
        for steps in [1, 2, 3, 8, 20, 50, 64]:
            for shift in [0.5, 1.0, 3.0, 7.0]:
                c = unmask_counts(n, steps, schedule, shift)
                assert len(c) == steps and sum(c) == n and min(c) >= 0
                if steps <= n:
                    assert min(c) >= 1


def test_shift_schedule_is_few_early_many_late():
    c = unmask_counts(4096, 20, "shift", 3.0)
    assert c[0] < c[-1] and c == sorted(c)
    assert c[:3] == [71, 76, 81]  # NVIDIA's released schedule at N=4096, 20 steps, s=3
    with pytest.raises(ValueError, match="steps"):
        unmask_counts(10, 0)


def test_nld_schedule_counts_follow_the_released_rule():
    """float32 shift schedule, truncated, each step >= 1 with the excess taken back from the last step
    on; written out here for small cases by hand."""
    # N = 4096, 20 steps: no step is empty, so only the float32 rounding could differ from megamdm's
    nld = unmask_counts(4096, 20, "shift", 3.0, "nld")
    assert sum(nld) == 4096 and nld[:3] == [71, 76, 81] and nld[-3:] == [393, 466, 558]
    # N = 5, 4 steps: sigma = [0, .5, .75, .9, 1] -> floor(5 sigma) = [0, 2, 3, 4, 5] -> rising [2, 1, 1, 1]
    assert unmask_counts(5, 4, "shift", 3.0, "nld") == [1, 1, 1, 2]
    # N = 3, 3 steps: sigma = [0, .6, .857, 1] -> [0, 1, 2, 3] -> rising [1, 1, 1]
    assert unmask_counts(3, 3, "shift", 3.0, "nld") == [1, 1, 1]
    # N = 6, 5 steps, shift 9: floor(6 sigma) = [0, 4, 5, 5, 5, 6] -> rising [4, 1, 0, 0, 1] -> clamped
    # [4, 1, 1, 1, 1] (sum 8): 2 tokens back, both from the first entry (the last step), skipping 1s
    assert unmask_counts(6, 5, "shift", 9.0, "nld") == [1, 1, 1, 1, 2]
    # fewer tokens than steps: as many steps as tokens, then steps that commit nothing
    assert unmask_counts(2, 4, "shift", 3.0, "nld") == [1, 1, 0, 0]
