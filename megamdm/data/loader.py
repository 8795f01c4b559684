"""Training batches from token shards: deterministic, data-parallel, bucketed, resumable.

The plan of an epoch is a pure function of ``(seed, epoch)``:
  * every resolution bucket is shuffled by a keyed Feistel permutation (a bijection on the bucket's
    indices computed per index, so no rank materialises a billion-entry permutation) and cut into
    global batches of ``global_batch_size`` (the remainder is dropped);
  * the global batches of all buckets are interleaved in a shuffled order;
  * with ``data.group_by_length = W``, each window of W consecutive global batches of a bucket is
    sorted by prompt length and cut again into W global batches (the samples of each batch keep
    their shuffled order among themselves), so a step holds prompts of similar length and
    trimming removes most of their padding; the epoch then shuffles windows, each window's
    batches following each other in shuffled order;
  * data-parallel rank ``d`` takes the ``d``-th contiguous slice of each global batch and splits it
    into micro-batches.
So the ranks see disjoint samples whose union is the epoch, a batch never mixes resolutions, and
the loader's whole state is the number of global steps consumed: a run resumed from a checkpoint,
at any data-parallel size, sees exactly the samples an uninterrupted run would have seen. Each
sample is corrupted with its own generator seeded from ``(seed, epoch, bucket, index)``.

Batches are built in background worker processes (``torch.utils.data.DataLoader``, spawned:
tensorstore aborts in forked children), so reading, text tokenisation and corruption overlap the
training step.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..config import Config, ConfigError
from ..diffusion import Corrupted, corrupt_batch
from ..gce import GCEGroups
from ..text import format_prompt, template_tail, tokenize_prompts
from .shards import TokenShards, parse_res

_M64 = (1 << 64) - 1


def _mix(*vals: int) -> int:
    """splitmix64 over a tuple of integers: a well-spread 63-bit seed."""
    x = 0x9E3779B97F4A7C15
    for v in vals:
        x = (x ^ (v & _M64)) & _M64
        x = (x + 0x9E3779B97F4A7C15) & _M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        x = z ^ (z >> 31)
    return x >> 1


def feistel_permute(idx: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of ``[0, n)`` evaluated at ``idx`` (cycle-walking over a power of 4)."""
    if n <= 1:
        return np.zeros_like(idx)
    bits = max(2, math.ceil(math.log2(n)))
    bits += bits % 2
    half = bits // 2
    mask = (1 << half) - 1
    keys = [_mix(key, r) & 0xFFFFFFFF for r in range(rounds)]
    x = idx.astype(np.uint64).copy()
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        y = x[todo]
        left, right = y >> np.uint64(half), y & np.uint64(mask)
        for k in keys:
            f = ((right * np.uint64(0x9E3779B1) + np.uint64(k)) ^ (right >> np.uint64(3))) & np.uint64(mask)
            left, right = right, left ^ f
        y = (left << np.uint64(half)) | right
        x[todo] = y
        todo[todo] = y >= n  # cycle-walk values outside [0, n)
    return x.astype(np.int64)


@dataclasses.dataclass
class MicroBatch:
    corrupted: Corrupted
    resolution: str
    sample_ids: torch.Tensor  # [B, 2] (dataset index, sample index within its resolution bucket)
    prompts_cut: int = 0  # captions longer than text.max_len, truncated


class EpochPlan:
    """Which samples form global batch ``k`` of epoch ``e``, over several datasets.

    ``group_by_length``: windows of that many global batches per bucket are regrouped by
    ``prompt_length(bucket, idx, ds, local)``, the prompt lengths of those samples (0: no regrouping).
    """

    def __init__(
        self,
        counts: Sequence[dict[str, int]],
        global_batch: int,
        seed: int,
        resolutions: Sequence[str] | None = None,
        *,
        group_by_length: int = 0,
        prompt_length=None,
    ):
        self.global_batch, self.seed = global_batch, seed
        keys = sorted({r for c in counts for r in c}, key=parse_res)
        if resolutions:
            unknown = set(resolutions) - set(keys)
            if unknown:
                raise ConfigError(f"data.resolutions {sorted(unknown)} are not in the datasets (have {keys})")
            keys = [r for r in keys if r in set(resolutions)]
        self.buckets = keys
        self.cum = {r: np.cumsum([0] + [c.get(r, 0) for c in counts]) for r in keys}
        self.sizes = {r: int(self.cum[r][-1]) for r in keys}
        self.batches_per_bucket = {r: self.sizes[r] // global_batch for r in keys}
        self.steps_per_epoch = sum(self.batches_per_bucket.values())
        if self.steps_per_epoch == 0:
            raise ConfigError(f"no bucket holds a full global batch of {global_batch} samples (sizes {self.sizes})")
        if group_by_length and prompt_length is None:
            raise ValueError("group_by_length needs prompt_length")
        self.group_by_length, self.prompt_length = group_by_length, prompt_length
        self._order_epoch, self._order = None, None
        self._window_key, self._window = None, None

    def order(self, epoch: int) -> list[tuple[str, int]]:
        """(bucket, global batch) of each step of ``epoch``. With ``group_by_length`` the windows are
        shuffled and each one's batches follow each other, so a process reads a window's prompt
        lengths once."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng(_mix(self.seed, epoch))
            w = self.group_by_length or 1
            windows = [(r, f) for r in self.buckets for f in range(0, self.batches_per_bucket[r], w)]
            self._order = []
            for i in rng.permutation(len(windows)):
                r, first = windows[i]
                self._order += [(r, first + int(j)) for j in rng.permutation(min(w, self.batches_per_bucket[r] - first))]
            self._order_epoch = epoch
        return self._order

    def _shuffled(self, epoch: int, r: str, pos: np.ndarray) -> np.ndarray:
        return feistel_permute(pos, self.sizes[r], _mix(self.seed, epoch, zlib.crc32(r.encode())))

    def _locate(self, r: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ds = np.searchsorted(self.cum[r], idx, side="right") - 1
        return ds, idx - self.cum[r][ds]

    def _batch(self, epoch: int, r: str, j: int, start: int, count: int) -> np.ndarray:
        """Bucket indices of samples ``[start, start + count)`` of global batch ``j`` of bucket ``r``."""
        gb, w = self.global_batch, self.group_by_length
        if not w:
            return self._shuffled(epoch, r, j * gb + np.arange(start, start + count))
        first = j // w * w
        if self._window_key != (epoch, r, first):  # one window's lengths are read once, for all its batches
            last = min(first + w, self.batches_per_bucket[r])
            idx = self._shuffled(epoch, r, np.arange(first * gb, last * gb))
            lengths = np.asarray(self.prompt_length(r, idx, *self._locate(r, idx)))
            self._window = idx, np.argsort(lengths, kind="stable")  # ties keep the shuffled order
            self._window_key = (epoch, r, first)
        idx, by_length = self._window
        members = np.sort(by_length[(j - first) * gb : (j - first + 1) * gb])  # back in shuffled order
        return idx[members[start : start + count]]

    def samples(self, step: int, start: int, count: int):
        """(epoch, bucket, indices, dataset of each, index within it) of samples ``[start, start +
        count)`` of global step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        r, j = self.order(epoch)[k]
        idx = self._batch(epoch, r, j, start, count)
        return (epoch, r, idx, *self._locate(r, idx))


class StepBatches(torch.utils.data.Dataset):
    """Item ``k``: this data-parallel rank's micro-batches of global step ``k``."""

    def __init__(
        self,
        datasets: Sequence[TokenShards],
        plan: EpochPlan,
        cfg: Config,
        groups: GCEGroups,
        text_tokenizer,
        *,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        num_micro_batches: int,
        seq_multiple: int = 1,
    ):
        self.datasets, self.plan, self.cfg, self.groups, self.tok = datasets, plan, cfg, groups, text_tokenizer
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.mbs, self.nmb = micro_batch_size, num_micro_batches
        self.seq_multiple = seq_multiple

    def __len__(self) -> int:  # a sampler drives it past one epoch
        return self.plan.steps_per_epoch

    def micro_batch(self, step: int, m: int) -> MicroBatch:
        start = (self.dp_rank * self.nmb + m) * self.mbs
        epoch, res, idx, ds, local = self.plan.samples(step, start, self.mbs)
        seeds = [_mix(self.cfg.data.seed, epoch, zlib.crc32(res.encode()), int(i)) for i in idx]
        return make_micro_batch(self.datasets, self.cfg, self.groups, self.tok, res, ds, idx, local, seeds)

    def __getitem__(self, step: int) -> list[MicroBatch]:
        micro = [self.micro_batch(step, m) for m in range(self.nmb)]
        return trim_text(micro, seq_multiple=self.seq_multiple) if self.cfg.data.trim_text else micro


PROMPT_FIELDS = ("captions", "orig_size", "crop", "score")


def _read(datasets, res: str, ds, local, fields) -> list[list]:
    """``fields`` of samples ``local`` of datasets ``ds`` in bucket ``res``, in the samples' order."""
    parts = {f: [] for f in fields}
    for d in np.unique(ds):
        sel = np.nonzero(ds == d)[0]
        got = datasets[d].read(res, local[sel], fields)
        for f in fields:
            parts[f].append((sel, got[f]))
    return [_scatter(parts[f], len(ds)) for f in fields]


def _prompts(cfg: Config, captions, orig, crop, score) -> list[str]:
    t = cfg.text
    return [
        format_prompt(
            c,
            width=int(o[0]),
            height=int(o[1]),
            crop=(int(cr[0]), int(cr[1])),
            score=t.default_score if math.isnan(float(s)) else float(s),
            micro_conditioning=t.micro_conditioning,
            template=t.template,
        )
        for c, o, cr, s in zip(captions, orig, crop, score)
    ]


def prompt_lengths(datasets, cfg: Config, text_tokenizer, res: str, idx, ds, local) -> np.ndarray:
    """Tokens in each sample's prompt, as training builds it (at most ``text.max_len``)."""
    texts = _prompts(cfg, *_read(datasets, res, ds, local, PROMPT_FIELDS))
    tail = template_tail(text_tokenizer, cfg.text.template, cfg.model.text_after_image)
    _ids, pad, _cut = tokenize_prompts(text_tokenizer, texts, cfg.text.max_len, tail.kept)
    return (~pad).sum(1).numpy()


def make_micro_batch(
    datasets, cfg: Config, groups: GCEGroups, text_tokenizer, res: str, ds, idx, local, seeds, *, mask_ratio=None
) -> MicroBatch:
    """Read samples ``local`` (of datasets ``ds``, bucket ``res``), build their prompts and corrupt
    each with its own seed (at a fixed ``mask_ratio`` and without prompt dropout when given)."""
    tokens, *prompt_fields = _read(datasets, res, ds, local, ("tokens", *PROMPT_FIELDS))
    texts = _prompts(cfg, *prompt_fields)
    t = cfg.text
    tail = template_tail(text_tokenizer, t.template, cfg.model.text_after_image)
    ids, pad, cut = tokenize_prompts(text_tokenizer, texts, t.max_len, tail.kept)
    img = groups.to_model(torch.from_numpy(np.stack(tokens).astype(np.int64)))
    diffusion = cfg.diffusion if mask_ratio is None else dataclasses.replace(cfg.diffusion, prompt_drop=0.0)
    c = corrupt_batch(
        img,
        ids,
        pad,
        diffusion,
        vocab_size=cfg.model.image_vocab_size,
        text_mask_id=text_tokenizer.mask_id,
        flip_group_size=groups.group_sizes[0] if groups.group_sizes else 1,
        seeds=seeds,
        mask_ratio=mask_ratio,
        drop_len=cfg.text.drop_len,
        drop_keep_last=tail.kept,
    )
    return MicroBatch(c, res, torch.from_numpy(np.stack([ds, idx], axis=1)), cut)


def trim_text(micro: list[MicroBatch], *, multiple: int = 8, seq_multiple: int = 1) -> list[MicroBatch]:
    """The micro-batches of one step with their prompts cut to the longest one of the step (rounded
    up to ``multiple``; with the image positions a multiple of ``seq_multiple``, which sequence
    parallelism needs). Padding is masked out of attention and always a suffix, so nothing else
    changes; one length per step keeps the pipeline's tensor shapes equal across micro-batches."""
    if not micro:
        return micro
    full = micro[0].corrupted.text_ids.shape[1]
    m = micro[0].corrupted.image_input.shape[1] * micro[0].corrupted.image_input.shape[2] // 4
    longest = max(int((~mb.corrupted.text_pad_mask).sum(1).max()) for mb in micro)
    n = max(multiple, -(-longest // multiple) * multiple)
    while (n + m) % seq_multiple and n < full:
        n += 1
    if n >= full or (n + m) % seq_multiple:
        return micro
    for mb in micro:
        c = mb.corrupted
        c.text_ids, c.text_pad_mask = c.text_ids[:, :n].contiguous(), c.text_pad_mask[:, :n].contiguous()
    return micro


def _scatter(parts, n):
    out = [None] * n
    for sel, vals in parts:
        for i, v in zip(sel, vals):
            out[i] = v
    return out


class _From(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def _collate(x):
    return x


class TrainLoader:
    """Iterate global steps: ``next(loader)`` is this rank's list of micro-batches for one step."""

    def __init__(
        self,
        cfg: Config,
        groups: GCEGroups,
        text_tokenizer,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        codebook_hash: str | None = None,
        seq_multiple: int = 1,
    ):
        """``seq_multiple``: what the sequence length of a step must be a multiple of (the TP size
        under sequence parallelism) when prompts are trimmed (``data.trim_text``)."""
        d = cfg.data
        if not d.shards:
            raise ConfigError("data.shards is empty: give one or more token-shard datasets")
        per_rank = d.global_batch_size // dp_size
        if d.global_batch_size % (dp_size * d.micro_batch_size):
            raise ConfigError(
                f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                f"data-parallel size {dp_size} x micro_batch_size {d.micro_batch_size}"
            )
        self.num_micro_batches = per_rank // d.micro_batch_size
        backend = None if d.reader == "auto" else d.reader
        self.datasets = [TokenShards(p, backend=backend, codebook_hash=codebook_hash) for p in d.shards]
        for ds in self.datasets:
            if ds.partial:
                warnings.warn(
                    f"{ds.root} is a partial dataset (consolidated with --partial): {len(ds.missing_parts)} of its "
                    "expected parts are missing",
                    stacklevel=2,
                )
        self.plan = EpochPlan(
            [s.counts for s in self.datasets],
            d.global_batch_size,
            d.seed,
            d.resolutions or None,
            group_by_length=d.group_by_length,
            prompt_length=functools.partial(prompt_lengths, self.datasets, cfg, text_tokenizer),
        )
        self.steps = StepBatches(
            self.datasets,
            self.plan,
            cfg,
            groups,
            text_tokenizer,
            dp_rank=dp_rank,
            dp_size=dp_size,
            micro_batch_size=d.micro_batch_size,
            num_micro_batches=self.num_micro_batches,
            seq_multiple=seq_multiple,
        )
        self.num_workers, self.prefetch = d.num_workers, d.prefetch
        self.step = 0
        self._it: Iterator | None = None

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.plan.seed,
            "global_batch": self.plan.global_batch,
            "sizes": dict(self.plan.sizes),
            "group_by_length": self.plan.group_by_length,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.plan.global_batch or state["sizes"] != self.plan.sizes:
            raise ConfigError(
                f"data-loader state does not fit this data: saved global batch {state['global_batch']} "
                f"and bucket sizes {state['sizes']}, now {self.plan.global_batch} and {self.plan.sizes}"
            )
        saved = state.get("group_by_length", 0)  # states from before the setting had none
        if saved != self.plan.group_by_length:
            raise ConfigError(
                f"data.group_by_length={self.plan.group_by_length}, but this run was saved with {saved}: the rest of "
                "the epoch would repeat and skip samples; set it back (or start a new run with checkpoint.init_from)"
            )
        self.step = int(state["step"])
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> list[MicroBatch]:
        if self._it is None:
            if self.num_workers > 0:
                self._it = iter(
                    torch.utils.data.DataLoader(
                        self.steps,
                        batch_size=None,
                        sampler=_From(self.step),
                        num_workers=self.num_workers,
                        prefetch_factor=self.prefetch,
                        persistent_workers=False,
                        collate_fn=_collate,
                        multiprocessing_context="spawn",
                    )
                )  # tensorstore aborts in forked children
            else:
                self._it = (self.steps[k] for k in itertools.count(self.step))
        out = next(self._it)
        self.step += 1
        return out

    @property
    def epoch(self) -> float:
        return self.step / self.plan.steps_per_epoch


class ValidSet:
    """The held-out loss's data: the first ``data.valid_samples`` samples of ``data.valid_shards``
    (datasets in order, buckets by size, samples by index), corrupted at each fixed mask ratio of
    ``data.valid_mask_ratios`` with draws seeded by the sample alone, so the number does not depend
    on the data-parallel size, the step or a resume. Micro-batches never mix buckets; the last one
    of a bucket is filled up with weight-0 repeats; DP rank ``d`` takes every ``D``-th."""

    def __init__(
        self, cfg: Config, groups: GCEGroups, text_tokenizer, *, dp_rank: int, dp_size: int, codebook_hash=None, seq_multiple=1
    ):
        self.seq_multiple = seq_multiple
        d = cfg.data
        backend = None if d.reader == "auto" else d.reader
        self.datasets = [TokenShards(p, backend=backend, codebook_hash=codebook_hash) for p in d.valid_shards]
        self.cfg, self.groups, self.tok = cfg, groups, text_tokenizer
        self.ratios = list(d.valid_mask_ratios)
        left, chosen = d.valid_samples, []  # (dataset, bucket, index)
        for k, ds in enumerate(self.datasets):
            for res in sorted(ds.counts, key=parse_res):
                take = min(left, ds.counts[res])
                chosen += [(k, res, i) for i in range(take)]
                left -= take
        groups_by_res: dict[str, list] = {}
        for k, res, i in chosen:
            groups_by_res.setdefault(res, []).append((k, i))
        mbs = d.micro_batch_size
        self.micro = []  # (bucket, [(dataset, index, weight)]) of this rank
        n = 0
        for res, items in groups_by_res.items():
            for s in range(0, len(items), mbs):
                chunk = items[s : s + mbs]
                chunk = [(k, i, 1.0) for k, i in chunk] + [(*chunk[-1], 0.0)] * (mbs - len(chunk))
                if n % dp_size == dp_rank:
                    self.micro.append((res, chunk))
                n += 1

    def micro_batches(self, ratio_index: int) -> dict[str, list[MicroBatch]]:
        """This rank's micro-batches at mask ratio ``ratios[ratio_index]``, by bucket."""
        out: dict[str, list[MicroBatch]] = {}
        for res, chunk in self.micro:
            ds = np.array([k for k, _, _ in chunk])
            local = np.array([i for _, i, _ in chunk])
            seeds = [_mix(self.cfg.data.seed, 0x76616C6964, ratio_index, k, zlib.crc32(res.encode()), i) for k, i, _ in chunk]
            mb = make_micro_batch(
                self.datasets,
                self.cfg,
                self.groups,
                self.tok,
                res,
                ds,
                local,
                local,
                seeds,
                mask_ratio=self.ratios[ratio_index],
            )
            w = torch.tensor([x for _, _, x in chunk]).view(-1, 1, 1)
            mb.corrupted.loss_weight = mb.corrupted.loss_weight * w
            if (w == 0).any():  # weight 0 removes a position from supervision, so from every sum
                mb.corrupted.is_flipped = mb.corrupted.is_flipped & (w > 0)
                mb.corrupted.is_masked = mb.corrupted.is_masked & (w > 0)
            out.setdefault(res, []).append(mb)
        return {
            res: trim_text(micro, seq_multiple=self.seq_multiple) if self.cfg.data.trim_text else micro
            for res, micro in out.items()
        }
