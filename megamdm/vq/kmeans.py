"""A k-means patch tokenizer: each f x f RGB patch is replaced by its nearest codebook patch.

It needs no download and fits in minutes on a CPU, which makes it the tokenizer of the tests and
of the ShapesWorld demo. Its codebook vectors are the patches themselves (3*f*f values), so GCE
groups built from them put visually similar patches next to each other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .base import codebook_hash

TOKENIZER_FILE = "tokenizer.json"
CODEBOOK_FILE = "codebook.safetensors"


def _nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest codebook row for every row of ``x`` (squared Euclidean)."""
    c2 = (codebook * codebook).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xb = x[s : s + chunk]
        d = c2[None, :] - 2.0 * (xb @ codebook.T)  # ||x||^2 is constant per row
        out[s : s + chunk] = d.argmin(1)
    return out


class KMeansPatchTokenizer:
    def __init__(self, codebook: torch.Tensor, patch_size: int):
        if codebook.ndim != 2 or codebook.shape[1] != 3 * patch_size * patch_size:
            raise ValueError(
                f"codebook of shape {tuple(codebook.shape)} does not match patch_size={patch_size} "
                f"(expected [V, {3 * patch_size * patch_size}])"
            )
        self._codebook = codebook.float().contiguous()
        self.patch_size = patch_size
        self.downsample = patch_size
        self.vocab_size = codebook.shape[0]
        self.name = f"kmeans-f{patch_size}-v{self.vocab_size}-{codebook_hash(self._codebook)}"

    # ---- the ImageTokenizer protocol -------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        return self._codebook

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, h, w, 3*f*f]``."""
        f = self.patch_size
        b, c, h, w = images.shape
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {f}")
        x = images.reshape(b, c, h // f, f, w // f, f).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, h // f, w // f, c * f * f)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patches(images.float())
        b, h, w, k = p.shape
        cb = self._codebook.to(p.device)
        return _nearest(p.reshape(-1, k), cb).reshape(b, h, w)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        f = self.patch_size
        b, h, w = ids.shape
        p = self._codebook.to(ids.device)[ids.reshape(-1)].reshape(b, h, w, 3, f, f)
        return p.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * f, w * f).clamp(0, 1)

    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"codebook": self._codebook.cpu()}, str(d / CODEBOOK_FILE))
        meta = {
            "kind": "kmeans",
            "patch_size": self.patch_size,
            "vocab_size": self.vocab_size,
            "codebook_hash": codebook_hash(self._codebook),
        }
        (d / TOKENIZER_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory) -> KMeansPatchTokenizer:
        d = Path(directory)
        meta_path, cb_path = d / TOKENIZER_FILE, d / CODEBOOK_FILE
        if not meta_path.is_file() or not cb_path.is_file():
            raise FileNotFoundError(f"{d}: a k-means tokenizer needs {TOKENIZER_FILE} and {CODEBOOK_FILE}")
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != "kmeans":
            raise ValueError(f"{meta_path}: kind is {meta.get('kind')!r}, expected 'kmeans'")
        return cls(load_file(str(cb_path))["codebook"], int(meta["patch_size"]))

    # ---- fitting -------------------------------------------------------------------------------
    @classmethod
    def distinct_patches(cls, images: Iterable[torch.Tensor], patch_size: int, max_patches: int = 400_000) -> torch.Tensor:
        """The distinct ``patch_size`` x ``patch_size`` patches (8-bit values) of ``images`` (``[B, 3, H, W]``
        batches in [0, 1]), flattened to ``[P, 3 p p]``; reading stops after ``4 * max_patches`` patches."""
        dummy = cls(torch.zeros(1, 3 * patch_size * patch_size), patch_size)
        chunks, n = [], 0
        for batch in images:
            p = dummy.patches(batch.float()).reshape(-1, 3 * patch_size * patch_size)
            chunks.append(p)
            n += p.shape[0]
            if n >= 4 * max_patches:
                break
        x = torch.cat(chunks)
        return torch.unique((x * 255).round().to(torch.uint8), dim=0).float() / 255.0

    @classmethod
    def fit(
        cls,
        images: Iterable[torch.Tensor],
        vocab_size: int,
        patch_size: int,
        *,
        iters: int = 20,
        max_patches: int = 400_000,
        seed: int = 0,
        progress: bool = True,
    ) -> KMeansPatchTokenizer:
        """Fit the codebook by Lloyd's k-means (k-means++ seeding) on the distinct patches of ``images``
        (``[B, 3, H, W]`` batches in [0, 1]; duplicates are frequent in flat images and would only add
        weight): :meth:`fit_patches` on :meth:`distinct_patches`."""
        return cls.fit_patches(
            cls.distinct_patches(images, patch_size, max_patches),
            vocab_size,
            patch_size,
            iters=iters,
            max_patches=max_patches,
            seed=seed,
            progress=progress,
        )

    @classmethod
    def fit_patches(
        cls,
        patches: torch.Tensor,
        vocab_size: int,
        patch_size: int,
        *,
        iters: int = 20,
        max_patches: int = 400_000,
        seed: int = 0,
        progress: bool = True,
    ) -> KMeansPatchTokenizer:
        """Fit the codebook on distinct flattened patches ``[P, 3 p p]`` (:meth:`distinct_patches`);
        at most ``max_patches`` of them, drawn at random, are used."""
        gen = torch.Generator().manual_seed(seed)
        x = patches
        if x.shape[0] > max_patches:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_patches]]
        if x.shape[0] < vocab_size:
            raise ValueError(
                f"only {x.shape[0]} distinct {patch_size}x{patch_size} patches in the fitting images; "
                f"cannot fit a codebook of {vocab_size}"
            )
        centers = _kmeans_pp(x, vocab_size, gen)
        bar = tqdm(range(iters), desc="k-means", disable=not progress, leave=False)
        for _ in bar:
            assign = _nearest(x, centers)
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=vocab_size).float()
            empty = counts == 0
            centers = torch.where(empty[:, None], centers, sums / counts.clamp(min=1)[:, None])
            if empty.any():  # re-seed dead codes on the worst-fit points
                err = ((x - centers[assign]) ** 2).sum(1)
                far = err.topk(int(empty.sum())).indices
                centers[empty] = x[far]
            bar.set_postfix(dead=int(empty.sum()))
        return cls(centers, patch_size)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator, sample: int = 50_000) -> torch.Tensor:
    """k-means++ seeding on a random subset (plus greedy D^2 sampling)."""
    if x.shape[0] > sample:
        x = x[torch.randperm(x.shape[0], generator=gen)[:sample]]
    first = torch.randint(0, x.shape[0], (1,), generator=gen)
    centers = [x[first]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / d2.numel())
        idx = torch.multinomial(probs, 1, generator=gen)
        c = x[idx]
        centers.append(c)
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    return torch.cat(centers).contiguous()
