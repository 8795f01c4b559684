"""Discrete image tokenizers: the protocol, the built-in k-means patch tokenizer, a diffusers VQ adapter."""

from __future__ import annotations

import json
from pathlib import Path

from .base import ImageTokenizer, check_image_size, codebook_hash, pil_to_tensor, tensor_to_pil
from .diffusers_vq import DiffusersVQTokenizer
from .emu3_vq import Emu3VQTokenizer
from .kmeans import KMeansPatchTokenizer


def load_image_tokenizer(kind: str, path) -> ImageTokenizer:
    """Load a tokenizer by kind (``kmeans``, ``diffusers`` or ``emu3``) from a local directory."""
    if path is None:
        raise ValueError("image_tokenizer.path is not set")
    if kind == "kmeans":
        return KMeansPatchTokenizer.load(path)
    if kind == "diffusers":
        return DiffusersVQTokenizer.load(path)
    if kind == "emu3":
        return Emu3VQTokenizer.load(path)
    raise ValueError(f"unknown image tokenizer kind {kind!r}; allowed: kmeans, diffusers, emu3")


def tokenizer_kind(path) -> str:
    """Guess the kind of a saved tokenizer directory."""
    p = Path(path)
    meta = p / "tokenizer.json"
    if meta.is_file() and json.loads(meta.read_text()).get("kind") == "kmeans":
        return "kmeans"
    if (p / "megamdm_vq.json").is_file():
        return json.loads((p / "megamdm_vq.json").read_text())["kind"]
    if (p / "config.json").is_file():
        raw = json.loads((p / "config.json").read_text())
        return "emu3" if "ch_mult" in {**raw, **raw.get("ddconfig", {})} else "diffusers"
    raise ValueError(f"{p}: not a k-means tokenizer (tokenizer.json) nor a VQGAN folder (config.json)")


__all__ = [
    "ImageTokenizer",
    "KMeansPatchTokenizer",
    "check_image_size",
    "codebook_hash",
    "load_image_tokenizer",
    "tokenizer_kind",
    "pil_to_tensor",
    "tensor_to_pil",
]
