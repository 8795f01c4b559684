"""Discrete image tokenizers: the protocol, the built-in k-means patch tokenizer, a diffusers VQ adapter."""

from __future__ import annotations

import json
from pathlib import Path

from .base import ImageTokenizer, check_image_size, codebook_hash, pil_to_tensor, tensor_to_pil
from .kmeans import KMeansPatchTokenizer


def load_image_tokenizer(kind: str, path) -> ImageTokenizer:
    """Load a tokenizer by kind (``kmeans`` or ``diffusers``) from a local directory."""
    if path is None:
        raise ValueError("image_tokenizer.path is not set")
    if kind == "kmeans":
        return KMeansPatchTokenizer.load(path)
    if kind == "diffusers":
        from .diffusers_vq import DiffusersVQTokenizer

        return DiffusersVQTokenizer.load(path)
    raise ValueError(f"unknown image tokenizer kind {kind!r}; allowed: kmeans, diffusers")


def tokenizer_kind(path) -> str:
    """Guess the kind of a saved tokenizer directory."""
    p = Path(path)
    meta = p / "tokenizer.json"
    if meta.is_file() and json.loads(meta.read_text()).get("kind") == "kmeans":
        return "kmeans"
    if (p / "config.json").is_file():
        return "diffusers"
    raise ValueError(f"{p}: not a k-means tokenizer (tokenizer.json) nor a diffusers VQModel (config.json)")


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
