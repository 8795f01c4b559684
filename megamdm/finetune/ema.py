"""EMA of the trainable weights in DeepSpeed fine-tuning, sharded over the ranks.

Under ZeRO-3 each rank averages its own partition of every parameter (``ds_tensor``); under ZeRO
0-2, where every rank holds whole parameters, each parameter is averaged by one rank (round-robin
over the sorted names). Either way the EMA costs 4 bytes per trainable parameter divided by the
world size. The average is of the module's weights after each optimizer step: the fp32 masters
with ``precision: fp32``, their bf16 copies with ``bf16`` (each update computed in fp32).

Each rank saves its share as ``ema_rank<r>.safetensors`` in the DeepSpeed checkpoint's tag folder
(keys: parameter names; ZeRO-3 partitions with the world size in the metadata), before DeepSpeed
writes ``latest``; loading reads whichever files hold this rank's share, so it resumes at another
world size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..training.ema import decay_at


class FinetuneEMA:
    def __init__(self, module: torch.nn.Module, decay: float, *, warmup: bool, rank: int, world: int, zero3: bool):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"finetune.ema_decay={decay} must be in (0, 1), or 0 for no EMA")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.rank, self.world, self.zero3 = rank, world, zero3
        self.params = {n: p for n, p in sorted(module.named_parameters()) if p.requires_grad}
        self.owner = {n: i % world for i, n in enumerate(self.params)}  # without ZeRO-3: who averages it
        owned = list(self.params) if zero3 else [n for n, r in self.owner.items() if r == rank]
        self.ema = {n: self._source(n).detach().float().clone() for n in owned}

    def _source(self, name: str) -> torch.Tensor:
        p = self.params[name]
        return p.ds_tensor if self.zero3 else p

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.ema)
        d = decay_at(self.decay, self.warmup, self.updates)
        if names:
            torch._foreach_lerp_([self.ema[n] for n in names], [self._source(n).float() for n in names], 1.0 - d)
        self.updates += 1

    def save(self, tag_dir: Path) -> None:
        tag_dir.mkdir(parents=True, exist_ok=True)
        path = tag_dir / f"ema_rank{self.rank:05d}.safetensors"
        meta = {"updates": str(self.updates), "world": str(self.world), "zero3": str(int(self.zero3))}
        tmp = path.with_suffix(".tmp")
        save_file({n: t.contiguous().cpu() for n, t in self.ema.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @torch.no_grad()
    def load(self, tag_dir: Path) -> bool:
        """This rank's share from ``tag_dir``; False when the checkpoint has no EMA."""
        files = sorted(tag_dir.glob("ema_rank*.safetensors"))
        if not files:
            return False
        opened = [safe_open(str(f), "pt") for f in files]
        meta = opened[0].metadata()
        if int(meta["zero3"]) != int(self.zero3):
            raise ValueError(f"{tag_dir}: its EMA was saved {'with' if int(meta['zero3']) else 'without'} ZeRO-3 partitions")
        for name, t in self.ema.items():
            if not self.zero3:
                src = next(f for f in opened if name in f.keys())
                t.copy_(src.get_tensor(name))
                continue
            full = torch.cat([f.get_tensor(name) for f in opened])  # the saved partitions, in rank order
            n = t.numel()
            part = full[self.rank * n : (self.rank + 1) * n]
            t.zero_()[: part.numel()].copy_(part)
        self.updates = int(meta["updates"])
        return True

    @torch.no_grad()
    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """Every trainable parameter's EMA, whole and on the CPU, on rank 0 (None elsewhere)."""
        out = {}
        for name, p in self.params.items():
            if self.zero3:
                parts = [torch.empty_like(self.ema[name]) for _ in range(self.world)]
                dist.all_gather(parts, self.ema[name])
                full = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
            else:
                full = self.ema[name] if self.owner[name] == self.rank else torch.empty(p.shape, device=p.device)
                dist.broadcast(full, src=self.owner[name])
            if self.rank == 0:
                out[name] = full.cpu().clone()
        return out if self.rank == 0 else None
