"""Small single-GPU-format checkpoints for tests."""

from __future__ import annotations

import torch

from megamdm.config import Config, ModelConfig
from megamdm.formats.single import save_single
from megamdm.gce import GCEGroups
from megamdm.models.standalone import MDMTransformer
from megamdm.sampling.settings import SampleConfig
from megamdm.text import ByteTokenizer
from megamdm.vq import KMeansPatchTokenizer


def tiny_config(vocab: int = 64) -> Config:
    return Config(
        model=ModelConfig(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            head_dim=16,
            ffn_hidden_size=128,
            image_vocab_size=vocab,
            text_vocab_size=384,
        ),
        sample=SampleConfig(steps=4, cfg=2.0, height=32, width=32),
    )


def make_tiny_checkpoint(path, seed: int = 0, vocab: int = 64, **model):
    """``model``: ModelConfig fields to set (e.g. a RoPE scaling)."""
    cfg = tiny_config(vocab)
    cfg.text.max_len = 24
    for k, v in model.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(seed)
    model = MDMTransformer(cfg.model)
    for name in ("merge_norm", "unmerge_norm"):
        if hasattr(model, name):
            with torch.no_grad():
                getattr(model, name).weight.uniform_(0.5, 1.5)
    # a real codebook: random colours per patch, so decoded images differ with the tokens
    tok = KMeansPatchTokenizer(torch.rand(vocab, 48, generator=torch.Generator().manual_seed(seed)), 4)
    g = torch.Generator().manual_seed(seed + 1)
    groups = GCEGroups(torch.randperm(vocab, generator=g), [8], [0.2])
    return save_single(path, model, cfg, groups, tok, ByteTokenizer())
