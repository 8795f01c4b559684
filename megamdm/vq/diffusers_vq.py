"""Adapter for a diffusers ``VQModel`` (aMUSEd / Meissonic-style VQ-GAN) from a local directory."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import codebook_hash


class DiffusersVQTokenizer:
    def __init__(self, vq_model, directory: str | Path | None = None):
        self.vq = vq_model.eval()
        cfg = vq_model.config
        self.directory = Path(directory) if directory else None
        self.vocab_size = int(cfg.num_vq_embeddings)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.name = f"diffusers-vq-v{self.vocab_size}-{codebook_hash(self.codebook())}"

    @classmethod
    def load(cls, directory) -> DiffusersVQTokenizer:
        try:
            from diffusers import VQModel
        except ImportError as e:
            raise ImportError("the diffusers VQ tokenizer needs `diffusers`: pip install diffusers") from e
        d = Path(directory)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}: not a diffusers VQModel directory (no config.json)")
        # use_safetensors: never unpickle a downloaded checkpoint
        return cls(VQModel.from_pretrained(str(d), local_files_only=True, use_safetensors=True), d)

    def codebook(self) -> torch.Tensor:
        return self.vq.quantize.embedding.weight.detach().float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.vq.parameters())
        x = images.to(p.device, p.dtype) * 2.0 - 1.0
        h = self.vq.encode(x).latents
        _, _, (_, _, idx) = self.vq.quantize(h)
        b, _, hh, ww = h.shape
        return idx.reshape(b, hh, ww).long()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        b, h, w = ids.shape
        shape = (b, h, w, self.vq.quantize.vq_embed_dim)
        if self.vq.config.lookup_from_codebook:  # decode() does the codebook lookup itself
            out = self.vq.decode(ids.reshape(-1), force_not_quantize=True, shape=shape).sample
        else:
            q = self.vq.quantize.get_codebook_entry(ids.reshape(-1), shape)
            out = self.vq.decode(q, force_not_quantize=True).sample
        return ((out.float() + 1.0) / 2.0).clamp(0, 1)

    def save(self, directory) -> None:
        self.vq.save_pretrained(str(directory), safe_serialization=True)
