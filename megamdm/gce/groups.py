"""The GCE vocabulary permutation: codebook neighbours become contiguous blocks of ids.

Level ``l`` groups are consecutive blocks of ``g_l`` model-order ids (``g_0 < g_1 < ...``, each
dividing the next). They are built top-down by balanced, hierarchical k-means over the codebook
vectors: the vocabulary is split into blocks of the largest size, each block into blocks of the
next size, and so on. Each split is a balanced bisection (2-means whose assignment keeps exactly
the required number of points on each side, best of a few restarts), applied recursively until the
pieces have the group size. Bisection keeps the cost near ``O(V log V)`` at V = 131072.

``perm[j]`` is the tokenizer id at model position ``j``; ``inv_perm[i]`` is the model id of
tokenizer id ``i``. Token shards keep tokenizer ids; batches are mapped with ``to_model`` and
generated grids are mapped back with ``to_tokenizer`` before decoding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm


def check_group_sizes(group_sizes: Sequence[int], vocab_size: int, what: str = "the vocabulary") -> None:
    prev = 1
    for g in group_sizes:
        if g < 1:
            raise ValueError(f"GCE group size {g} must be >= 1")
        if g % prev:
            raise ValueError(f"GCE group sizes {list(group_sizes)} must be increasing, each dividing the next")
        if vocab_size % g:
            raise ValueError(
                f"GCE group size {g} does not divide {what} ({vocab_size}); allowed sizes are the divisors of {vocab_size}"
            )
        prev = g


@dataclass
class GCEGroups:
    perm: torch.Tensor  # [V] long: model id -> tokenizer id
    group_sizes: list[int]
    group_weights: list[float]
    codebook_hash: str | None = None
    inv_perm: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        v = self.perm.numel()
        if not torch.equal(torch.sort(self.perm).values, torch.arange(v)):
            raise ValueError("GCE permutation is not a permutation of 0..V-1")
        check_group_sizes(self.group_sizes, v)
        if len(self.group_weights) != len(self.group_sizes):
            raise ValueError("GCE group_weights must have one weight per group size")
        self.perm = self.perm.long()
        self.inv_perm = torch.empty_like(self.perm)
        self.inv_perm[self.perm] = torch.arange(v)

    @property
    def vocab_size(self) -> int:
        return self.perm.numel()

    def to_model(self, tokenizer_ids: torch.Tensor) -> torch.Tensor:
        return self.inv_perm.to(tokenizer_ids.device)[tokenizer_ids]

    def to_tokenizer(self, model_ids: torch.Tensor) -> torch.Tensor:
        return self.perm.to(model_ids.device)[model_ids]

    def with_weights(self, group_weights: Sequence[float]) -> GCEGroups:
        return GCEGroups(self.perm.clone(), list(self.group_sizes), list(group_weights), self.codebook_hash)

    @classmethod
    def identity(cls, vocab_size: int, group_sizes: Sequence[int], group_weights: Sequence[float]) -> GCEGroups:
        return cls(torch.arange(vocab_size), list(group_sizes), list(group_weights))

    def save(self, path) -> None:
        meta = {
            "group_sizes": json.dumps(list(self.group_sizes)),
            "group_weights": json.dumps(list(self.group_weights)),
            "codebook_hash": self.codebook_hash or "",
        }
        save_file({"perm": self.perm.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> GCEGroups:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"GCE groups file not found: {p}")
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            perm = f.get_tensor("perm")
        try:
            sizes = json.loads(meta["group_sizes"])
            weights = json.loads(meta["group_weights"])
        except KeyError as e:
            raise ValueError(f"{p}: not a GCE groups file (missing {e.args[0]} metadata)") from None
        return cls(perm, sizes, weights, meta.get("codebook_hash") or None)


def _balanced_bisect(x: torch.Tensor, n_left: int, gen: torch.Generator, restarts: int, iters: int = 10):
    """Split rows of ``x`` into exactly ``n_left`` and ``n - n_left`` rows with 2-means.

    Given two centres, sorting points by ``|x-c1|^2 - |x-c2|^2`` and cutting at ``n_left`` is the
    optimal balanced assignment; centres and assignment alternate as in Lloyd's algorithm."""
    n = x.shape[0]
    best, best_cost = None, float("inf")
    for _ in range(restarts):
        a = int(torch.randint(0, n, (1,), generator=gen))
        b = int(((x - x[a]) ** 2).sum(1).argmax())
        c = int(((x - x[b]) ** 2).sum(1).argmax())
        c1, c2 = x[b].clone(), x[c].clone()
        order = None
        for _ in range(iters):
            score = (x @ (c2 - c1)) * 2.0 + (c1 * c1).sum() - (c2 * c2).sum()  # = |x-c1|^2 - |x-c2|^2
            new_order = torch.argsort(score, stable=True)
            if order is not None and torch.equal(new_order[:n_left].sort().values, order[:n_left].sort().values):
                break
            order = new_order
            c1, c2 = x[order[:n_left]].mean(0), x[order[n_left:]].mean(0)
        left, right = order[:n_left], order[n_left:]
        cost = float(((x[left] - c1) ** 2).sum() + ((x[right] - c2) ** 2).sum())
        if cost < best_cost:
            best, best_cost = (left, right), cost
    return best


def _partition(idx: torch.Tensor, x: torch.Tensor, g: int, gen: torch.Generator, out: list, bar) -> None:
    """Append blocks of exactly ``g`` ids from ``idx`` to ``out``, neighbours adjacent."""
    stack = [idx]
    while stack:
        cur = stack.pop()
        m = cur.numel() // g
        if m == 1:
            out.append(cur)
            bar.update(1)
            continue
        m_left = m // 2
        restarts = 3 if cur.numel() <= 4096 else 2
        left, right = _balanced_bisect(x[cur], m_left * g, gen, restarts)
        stack.append(cur[right])  # popped after the left half: output order is left, right
        stack.append(cur[left])


def build_groups(
    codebook: torch.Tensor,
    group_sizes: Sequence[int],
    group_weights: Sequence[float],
    *,
    seed: int = 0,
    codebook_hash: str | None = None,
    progress: bool = True,
) -> GCEGroups:
    """Build the permutation from codebook vectors ``[V, c]``."""
    v = codebook.shape[0]
    sizes = [int(s) for s in group_sizes]
    check_group_sizes(sizes, v)
    x = codebook.detach().float().cpu()
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.arange(v)]
    for g in reversed(sizes):  # coarsest level first
        out: list[torch.Tensor] = []
        with tqdm(total=v // g, desc=f"GCE groups of {g}", disable=not progress, leave=False) as bar:
            for blk in blocks:
                _partition(blk, x, g, gen, out, bar)
        blocks = out
    perm = torch.cat(blocks)
    return GCEGroups(perm, sizes, list(group_weights), codebook_hash)
