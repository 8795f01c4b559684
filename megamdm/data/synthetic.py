"""Random token datasets for throughput runs: speed does not depend on the token values, only on the
shapes, so a random k-means tokenizer of the right vocabulary and patch size and random image tokens
stand in for a real dataset. Prompts are random words of a realistic caption length, so that prompt
trimming and masking see the lengths they would in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megamdm.data.shards import BucketBuffer, consolidate, write_part
from megamdm.vq import KMeansPatchTokenizer
from megamdm.vq.base import codebook_hash

WORDS = "a the red blue small large dog cat tree house on under near with two three old new bright dark city river".split()


def random_tokenizer(vocab: int, patch: int, path: Path | None = None, seed: int = 0):
    """A k-means patch tokenizer with ``vocab`` random codes over ``patch x patch`` pixels, saved at
    ``path`` when one is given."""
    g = torch.Generator().manual_seed(seed)
    tok = KMeansPatchTokenizer(torch.rand(vocab, 3 * patch * patch, generator=g), patch)
    if path is not None:
        tok.save(path)
    return tok


def synthetic_shards(root: Path, *, n: int, grid: int, tokenizer, words: tuple[int, int] = (8, 60), seed: int = 0) -> Path:
    """A consolidated zarr token dataset at ``root/ds.zarr``: ``n`` random ``grid x grid`` samples, each
    prompt ``words`` random words long (uniform; 8-60 words are about 10-80 tokens)."""
    g = np.random.default_rng(seed)
    b = BucketBuffer()
    px = grid * tokenizer.downsample
    for i in range(n):
        prompt = " ".join(g.choice(WORDS, int(g.integers(words[0], words[1] + 1))))
        b.add(g.integers(0, tokenizer.vocab_size, (grid, grid)), prompt, f"s{i}", (px, px), (0, 0), 6.0)
    h = codebook_hash(tokenizer.codebook())
    write_part(root / "ds.zarr", "00000", {f"{px}x{px}": b}, {"codebook_hash": h})
    consolidate(root / "ds.zarr", tokenizer=tokenizer.name, codebook_hash=h)
    return root / "ds.zarr"


def synthetic_overrides(work: Path, *, vocab: int, patch: int, size: int, n: int) -> dict[str, str]:
    """Config overrides that train on a fresh synthetic dataset in ``work``: ``n`` samples of
    ``size x size`` pixels, a random tokenizer, no GCE groups file, no checkpoint, no wandb."""
    tok = random_tokenizer(vocab, patch, work / "tok")
    shards = synthetic_shards(work, n=n, grid=size // patch, tokenizer=tok)
    return {
        "data.shards": f"[{shards}]",
        "image_tokenizer.kind": "kmeans",
        "image_tokenizer.path": str(work / "tok"),
        "gce.groups_file": "null",
        "checkpoint.save_dir": "null",
        "checkpoint.init_from": "null",
        "logging.wandb_mode": "disabled",
    }
