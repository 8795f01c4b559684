"""The masked-diffusion transformer of docs/design.md §1.1 in plain PyTorch: the single-GPU model.

One joint sequence ``[prompt (L_text)] + [image positions]`` with bidirectional attention and a
key-padding mask over prompt padding; positions follow the sequence as written (``models/rope.py``:
each image right after its prompt's real tokens, the prompt's last ``text_after_image`` tokens after
it). Image ids are embedded (``V + 1`` rows, MASK = V), 2x2 neighbourhoods are merged (concat of
four embeddings -> Linear(4d -> d)), the Llama-style blocks run (RMSNorm, GQA, SwiGLU, RoPE over the
joint sequence), then the image positions are unmerged (Linear(d -> 4d)) and the image head
(Linear(d -> V)) scores every token.

Parameter names follow Hugging Face Llama (``layers.N.self_attn.q_proj.weight`` ...), so the
single-GPU format reads like any Llama checkpoint and ``from-hf`` is a renaming.
This module never imports megatron-core.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..config import ModelConfig
from ..gce import GCEStats, gce_loss
from .layers import RMSNorm, check_grid, merge_2x2, unmerge_2x2
from .rope import apply_rope, model_rope


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.ng, self.hd = cfg.num_attention_heads, cfg.num_query_groups, hd
        self.q_proj = nn.Linear(d, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(d, self.ng * hd, bias=False)
        self.v_proj = nn.Linear(d, self.ng * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, d, bias=False)

    def forward(self, x, emb, keep):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.ng, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.ng, self.hd).transpose(1, 2)
        q, k = apply_rope(q, emb), apply_rope(k, emb)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=self.nh != self.ng)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, emb, keep):
        x = x + self.self_attn(self.input_layernorm(x), emb, keep)
        return x + self.mlp(self.post_attention_layernorm(x))


class GCEHead(nn.Module):
    """The image head. ``forward(hidden)`` gives logits; ``forward(hidden, target, ...)`` gives the
    fused GCE loss without logits. The loss lives in ``forward`` so that wrappers which gather
    parameters around a module's forward (DeepSpeed ZeRO-3) see the head weight."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(
        self,
        hidden,
        target=None,
        token_weight=None,
        *,
        group_sizes=(),
        group_weights=(),
        impl: str = "torch",
        grad_filter: float = 0.0,
    ) -> torch.Tensor | GCEStats:
        if target is None:
            return hidden @ self.weight.t()
        return gce_loss(
            hidden,
            self.weight,
            target,
            group_sizes,
            group_weights,
            impl=impl,
            reduction="none",
            token_weight=token_weight,
            return_stats=True,
            grad_filter=grad_filter,
        )


class MDMTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.hidden_size
        self.text_embed = nn.Embedding(cfg.text_vocab_size, d)
        self.image_embed = nn.Embedding(cfg.image_embed_rows, d)
        if cfg.merge_norm:
            self.merge_norm = RMSNorm(d, cfg.merge_norm_eps)
        self.merge = nn.Linear(4 * d, d, bias=False)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        if cfg.unmerge_norm:
            self.unmerge_norm = RMSNorm(d, cfg.merge_norm_eps)
        self.unmerge = nn.Linear(d, 4 * d, bias=False)
        self.head = GCEHead(d, cfg.image_vocab_size)
        self.gradient_checkpointing = False  # recompute each block in backward (fine-tuning large models)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) weights; the two residual output projections of each block are
        scaled by 1/sqrt(2 num_layers) as in Megatron; norms are 1."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            with torch.no_grad():
                if name.endswith(("layernorm.weight", "norm.weight")):
                    p.fill_(1.0)
                else:
                    s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    # ---- pieces --------------------------------------------------------------------------------
    def embed(self, text_ids: torch.Tensor, image_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.text_embed(text_ids)
        if image_ids is not None:
            check_grid(image_ids.shape[1], image_ids.shape[2])
            ie = self.image_embed(image_ids)
            if self.config.merge_norm:
                ie = self.merge_norm(ie)
            x = torch.cat([x, self.merge(merge_2x2(ie))], dim=1)
        return x

    def hidden_states(self, text_ids, text_pad_mask, image_ids=None) -> torch.Tensor:
        """Hidden states ``[B, S, d]`` of the whole joint sequence after the final norm."""
        x = self.embed(text_ids, image_ids)
        b, s, _ = x.shape
        gh, gw = (image_ids.shape[1] // 2, image_ids.shape[2] // 2) if image_ids is not None else (0, 0)
        emb = model_rope(self.config, text_pad_mask, gh, gw)
        keep = torch.ones(b, s, dtype=torch.bool, device=x.device)
        keep[:, : text_ids.shape[1]] = ~text_pad_mask
        keep = keep[:, None, None, :]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, emb, keep, use_reentrant=False)
            else:
                x = layer(x, emb, keep)
        return self.norm(x)

    def forward(self, text_ids, text_pad_mask, image_ids) -> torch.Tensor:
        """Hidden states of the image tokens, ``[B, h, w, d]``, ready for the head / fused loss."""
        hs = self.hidden_states(text_ids, text_pad_mask, image_ids)
        img = hs[:, text_ids.shape[1] :]
        if self.config.unmerge_norm:
            img = self.unmerge_norm(img)
        return unmerge_2x2(self.unmerge(img), image_ids.shape[1], image_ids.shape[2])

    def logits(self, text_ids, text_pad_mask, image_ids) -> torch.Tensor:
        """``[B, h, w, V]`` logits over the image vocabulary (model order), for sampling."""
        return self.head(self.forward(text_ids, text_pad_mask, image_ids))
