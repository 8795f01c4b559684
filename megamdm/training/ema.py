"""Exponential moving average of the fp32 master weights, kept where the optimizer keeps them.

Under the distributed optimizer each data-parallel rank owns a contiguous range of every parameter
it updates (megatron's buffer shard) and keeps the EMA of that range only: 4 bytes per parameter
divided by the DP size, no full copy anywhere. Without it every rank holds the whole EMA, as it
holds the whole optimizer state.

In a checkpoint each piece of a parameter that megatron stores as one box of a global tensor
(``key``, offset, shape; a TP shard, a layer of a stacked key, one half of a SwiGLU ``fc1``) is a
1-D tensor of its own, ``ema:<key>:<offset>:<shape>`` (:func:`megamdm.formats.torch_dist.ema_key`), whose
ranges the DP ranks write without communication. Loading reassembles each rank's range from the
saved boxes that overlap it, so a checkpoint resumes at any TP/PP/DP layout and ``to-single``
rebuilds the global tensors from the same boxes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from ..formats.torch_dist import TorchDistReader, ema_key, load_ema_region


@dataclass
class _Piece:
    """One stored box of a parameter: local flat elements ``[lo, hi)`` are the box ``offset``/``shape``
    of the global tensor ``key`` (shape with the prepended axes as ones)."""

    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    lo: int
    hi: int
    replica_id: object


@dataclass
class _Slot:
    param: torch.nn.Parameter  # the model's parameter (bf16 or fp32)
    start: int  # this rank owns flat elements [start, end) of it
    end: int
    master: torch.Tensor  # their fp32 master weights, 1-D
    ema: torch.Tensor  # their EMA, 1-D fp32
    pieces: list[_Piece]


def decay_at(decay: float, warmup: bool, updates: int) -> float:
    """The decay of update number ``updates + 1``: with warm-up ``min(decay, (1 + n) / (10 + n))``
    (diffusers' EMA warm-up), so early averages follow the fast-moving weights."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def _owned_ranges(optimizer):
    """(model param, start, end, fp32 master 1-D, distributed) for every parameter this rank updates."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            if opt.config.use_precision_aware_optimizer:
                raise NotImplementedError("train.ema_decay with the precision-aware optimizer")
            for model_param, (g, o) in opt.model_param_group_index_map.items():
                r = opt._get_model_param_range_map(model_param)["param"]
                yield model_param, r.start, r.end, opt.optimizer.param_groups[g]["params"][o].view(-1), True
        elif hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params: fp32 copies of bf16 params
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for p, main in zip(model_group, main_group):
                    yield p, 0, p.numel(), main.view(-1), False
            for group in opt.fp32_from_fp32_groups:
                for p in group:
                    yield p, 0, p.numel(), p.view(-1), False
        else:  # FP32Optimizer: the model's parameters are the master weights
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    yield p, 0, p.numel(), p.view(-1), False


def _pieces(model, params) -> dict[int, list[_Piece]]:
    """How each parameter's local elements map onto the boxes megatron's sharded state dict stores
    them as, found by passing flat indices through it (factories split a parameter in several)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    wanted = {id(p) for p in params}
    sd, _ = extract_sharded_tensors_and_factories(model.sharded_state_dict())
    out: dict[int, list[_Piece]] = {}
    stack = list(sd.values())
    while stack:
        sh = stack.pop()
        if isinstance(sh, dict):
            stack.extend(sh.values())
            continue
        if id(sh.data) not in wanted or sh.key.endswith("_extra_state"):
            continue
        if isinstance(sh, ShardedTensorFactory):  # where do the local elements go? pass their indices through
            n = sh.data.numel()
            index = torch.arange(n, dtype=torch.int32 if n < 2**31 else torch.int64).view(sh.data.shape)
            boxes = [b for b in _leaves(replace(sh, data=index).build()) if isinstance(b, ShardedTensor)]
        else:
            boxes = [sh]
        pieces = []
        for b in boxes:
            if b is sh:
                lo, hi = 0, sh.data.numel()
            else:
                flat = b.data.reshape(-1)
                lo, hi = int(flat[0]), int(flat[-1]) + 1
                if not b.data.is_contiguous() or hi - lo != flat.numel():
                    raise NotImplementedError(f"{b.key}: a stored box that is not a contiguous range of its parameter")
            shape = (1,) * b.prepend_axis_num + tuple(b.local_shape)
            pieces.append(_Piece(b.key, tuple(b.global_offset), shape, lo, hi, b.replica_id))
        out[id(sh.data)] = sorted(pieces, key=lambda p: p.lo)
    return out


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, list | tuple):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


class ShardedEMA:
    """EMA of the master weights this rank's optimizer updates; :meth:`update` after each applied step."""

    def __init__(self, model, optimizer, decay: float, *, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in (0, 1), or 0 for no EMA")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.model, self.optimizer = model, optimizer
        owned = list(_owned_ranges(optimizer))
        pieces = _pieces(model, [p for p, *_ in owned])
        self.distributed = any(d for *_, d in owned)
        self.slots = []
        for p, start, end, master, _ in owned:
            if id(p) not in pieces:
                raise RuntimeError("a parameter the optimizer updates is not in the model's sharded state dict")
            ema = master.detach().clone().float()
            self.slots.append(_Slot(p, start, end, master, ema, pieces[id(p)]))

    def numel(self) -> int:
        return sum(s.end - s.start for s in self.slots)

    @torch.no_grad()
    def update(self) -> None:
        d = decay_at(self.decay, self.warmup, self.updates)
        torch._foreach_lerp_([s.ema for s in self.slots], [s.master.float() for s in self.slots], 1.0 - d)
        self.updates += 1

    # ---- checkpoints ----------------------------------------------------------------------------
    def sharded_state_dict(self) -> dict:
        """This rank's ranges as 1-D boxes ``ema:<key>:<offset>:<shape>`` (DP ranks write disjoint
        ranges; replicated pieces are written by their main replica)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        out = {}
        for s in self.slots:
            for pc in s.pieces:
                lo, hi = max(s.start, pc.lo), min(s.end, pc.hi)
                if lo >= hi:
                    continue
                rid = pc.replica_id
                if self.distributed:  # the DP ranks hold different ranges: each is a main replica
                    rid = (*rid[:-1], 0) if isinstance(rid, tuple) else 0
                data = s.ema[lo - s.start : hi - s.start]
                key = ema_key(pc.key, pc.offset, pc.shape)
                out[f"{key}@{lo - pc.lo}"] = ShardedTensor(
                    key, data, data.dtype, (hi - lo,), (pc.hi - pc.lo,), (lo - pc.lo,), None, replica_id=rid
                )
        return out

    @torch.no_grad()
    def load(self, it_dir, updates: int) -> None:
        """Fill this rank's ranges from checkpoint ``it_dir`` (saved at this or any other layout)."""
        reader = TorchDistReader(it_dir)
        for s in self.slots:
            for pc in s.pieces:
                lo, hi = max(s.start, pc.lo), min(s.end, pc.hi)
                if lo < hi:
                    region = load_ema_region(reader, pc.key, pc.offset, pc.shape).reshape(-1)
                    s.ema[lo - s.start : hi - s.start].copy_(region[lo - pc.lo : hi - pc.lo])
        self.updates = updates

    # ---- sampling from the EMA ------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the EMA weights inside the block (gathered over DP under the distributed
        optimizer, as a step gathers the weights) and its own weights again after it."""
        with torch.no_grad():
            saved = [s.param.view(-1)[s.start : s.end].to("cpu", copy=True) for s in self.slots]
            self._write([s.ema for s in self.slots])
        try:
            yield
        finally:
            with torch.no_grad():
                self._write(saved)

    def _write(self, values) -> None:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        for s, v in zip(self.slots, values):
            s.param.view(-1)[s.start : s.end].copy_(v)
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if isinstance(opt, DistributedOptimizer):
                group = opt.data_parallel_group
                rank, size = group.rank(), group.size()
                for buf in opt.buffers:
                    for bucket in buf.buckets:
                        n = bucket.param_data.numel() // size
                        torch.distributed.all_gather_into_tensor(
                            bucket.param_data, bucket.param_data[rank * n : (rank + 1) * n].clone(), group=group
                        )
