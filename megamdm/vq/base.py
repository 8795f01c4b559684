"""The image-tokenizer protocol shared by every discrete tokenizer, and image helpers.

Images are float tensors ``[B, 3, H, W]`` in ``[0, 1]``; ids are long tensors ``[B, H/f, W/f]``
in the tokenizer's own order (the GCE permutation is applied later, when batches are built).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image


@runtime_checkable
class ImageTokenizer(Protocol):
    name: str
    vocab_size: int
    downsample: int  # f: an H x W image becomes an (H/f) x (W/f) grid

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor) -> torch.Tensor: ...

    def codebook(self) -> torch.Tensor: ...

    def save(self, directory) -> None: ...


def codebook_hash(codebook: torch.Tensor) -> str:
    """A short, stable fingerprint of a codebook; token shards and GCE groups record it."""
    arr = np.ascontiguousarray(codebook.detach().to(torch.float32).cpu().numpy())
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


def check_image_size(height: int, width: int, downsample: int) -> None:
    """Refuse sizes the model cannot take: the token grid must split into 2x2 merge blocks."""
    step = 2 * downsample
    if height <= 0 or width <= 0 or height % step or width % step:
        examples = ", ".join(str(step * k) for k in (1, 2, 4, 8, 16) if step * k <= 2048)
        raise ValueError(
            f"image size {height}x{width} is not allowed: height and width must be positive multiples "
            f"of 2*f = {step} (f = {downsample} is the tokenizer's downsampling), e.g. {examples}"
        )


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
