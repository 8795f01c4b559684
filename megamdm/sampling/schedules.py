"""How many tokens each sampling step commits, and the fixed orders of the stratified policy.

:func:`unmask_counts` splits the masked tokens of an image over the steps (``schedule``,
``schedule_counts``); :func:`stratified_order` and :func:`pmj_order` rank the grid cells for
``policy: stratified`` (``stratified_order: halton | pmj``).
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import torch


def unmask_counts(
    num_tokens: int, steps: int, schedule: str = "shift", shift: float = 3.0, counts_rule: str = "megamdm"
) -> list[int]:
    """How many masked tokens to commit at each of ``steps`` steps; the counts sum to ``num_tokens``.

    ``shift``: ``sigma(t) = s t / (1 + (s - 1) t)`` on ``t = linspace(0, 1, steps + 1)``; the counts are
    the differences of ``floor(sigma N)``, reversed, so few tokens are committed early and many late.
    ``cosine``: the fraction still masked after step k is ``cos(pi/2 k/steps)``.
    ``counts_rule`` (``schedule_counts``): ``megamdm`` computes in float64, and when ``steps <= num_tokens``
    moves one token from the largest step into every empty one; ``nld`` is NL-Diffusion-Image's rule for
    ``shift``: float32, truncated, at most ``num_tokens`` steps (the rest commit nothing), every count
    raised to at least 1 and the excess taken back one token at a time from the last step towards the
    first, skipping steps at 1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if schedule == "shift" and shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if counts_rule == "nld" and schedule == "shift":
        return _nld_shift_counts(num_tokens, steps, shift)
    ts = [k / steps for k in range(steps + 1)]
    if schedule == "shift":
        cum = [math.floor(shift * t / (1 + (shift - 1) * t) * num_tokens + 1e-9) for t in ts]
        counts = [cum[i + 1] - cum[i] for i in range(steps)][::-1]
    elif schedule == "cosine":
        done = [num_tokens - math.floor(num_tokens * math.cos(math.pi / 2 * t) + 1e-9) for t in ts]
        done[-1] = num_tokens
        counts = [done[i + 1] - done[i] for i in range(steps)]
    else:
        raise ValueError(f"unknown unmask schedule {schedule!r}; allowed: shift, cosine")
    if steps <= num_tokens:  # move one token from the largest step into every empty one
        for i in range(steps):
            if counts[i] == 0:
                j = max(range(steps), key=lambda m: counts[m])
                counts[j] -= 1
                counts[i] += 1
    assert sum(counts) == num_tokens
    return counts


def _nld_shift_counts(num_tokens: int, steps: int, shift: float) -> list[int]:
    n = min(steps, num_tokens)
    if n == 0:
        return [0] * steps
    t = torch.linspace(0, 1, n + 1, dtype=torch.float32)
    sigma = shift * t / (1.0 + (shift - 1.0) * t)
    cum = (sigma * num_tokens).to(torch.int64)
    rising = (cum[1:] - cum[:-1]).clamp(min=1).tolist()  # in the order of sigma: the last step first
    excess, j = sum(rising) - num_tokens, 0
    while excess > 0:
        if rising[j % n] > 1:
            rising[j % n] -= 1
            excess -= 1
        j += 1
    return rising[::-1] + [0] * (steps - n)


@lru_cache(maxsize=32)
def stratified_order(h: int, w: int) -> torch.Tensor:
    """Rank of each grid cell in a spatially spread order: cells are visited as the 2-D Halton
    sequence (bases 2, 3) first lands in them, so every prefix covers the grid evenly."""

    def radical_inverse(i: int, base: int) -> float:
        f, r = 1.0, 0.0
        while i:
            f /= base
            r += f * (i % base)
            i //= base
        return r

    rank = torch.full((h * w,), -1, dtype=torch.long)
    seen, i = 0, 1
    while seen < h * w:
        cell = min(int(radical_inverse(i, 3) * h), h - 1) * w + min(int(radical_inverse(i, 2) * w), w - 1)
        if rank[cell] < 0:
            rank[cell] = seen
            seen += 1
        i += 1
        if i > 64 * h * w:  # the sequence has covered almost everything; finish in raster order
            rest = (rank < 0).nonzero().squeeze(1)
            rank[rest] = torch.arange(seen, seen + rest.numel())
            break
    return rank


@lru_cache(maxsize=32)
def pmj_order(h: int, w: int, seed: int = 42) -> torch.Tensor:
    """Rank of each cell of a square power-of-two grid in NL-Diffusion-Image's stratified order: a
    progressive multi-jittered sequence from Python's ``random.Random(seed)``. The grid is split into
    quadrants level by level; at each level the quadrants are shuffled and every quadrant that holds no
    visited cell gets one, uniform within it (x then y, drawn again while taken); the cells never
    visited come last, shuffled."""
    if h != w or h & (h - 1):
        raise ValueError(f"stratified_order=pmj needs a square power-of-two token grid, got {h}x{w}")
    n, rng = h, random.Random(seed)
    taken = [[False] * n for _ in range(n)]
    order: list[int] = []
    blocks, size = [(0, 0)], n
    while size > 1:
        half = size // 2
        children = [(x + dx, y + dy) for x, y in blocks for dx, dy in ((0, 0), (half, 0), (0, half), (half, half))]
        rng.shuffle(children)
        for x0, y0 in children:
            if any(taken[y][x] for y in range(y0, y0 + half) for x in range(x0, x0 + half)):
                continue
            while True:
                x, y = rng.randrange(x0, x0 + half), rng.randrange(y0, y0 + half)
                if not taken[y][x]:
                    break
            taken[y][x] = True
            order.append(y * n + x)
        blocks, size = children, half
    rest = [y * n + x for y in range(n) for x in range(n) if not taken[y][x]]
    rng.shuffle(rest)
    order += rest
    rank = torch.empty(n * n, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(n * n)
    return rank
