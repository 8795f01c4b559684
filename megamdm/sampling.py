"""Sampling with token editing (docs/design.md §1.3) and the diffusers-style :class:`MDMSampler`.

Each step: one forward pass predicts every image position (cond and uncond in one batch); guidance
is applied to the head input, ``h = (1 + s) h_cond - s h_uncond`` (the head is linear, so this is
CFG on logits at half the head's work); a token ``x0`` is sampled per position (temperature, top-k,
top-p) with confidence ``p(x0)``; exactly ``n_k`` masked positions are committed, chosen by a policy
(``gumbel``: top-n of ``log p + tau * Gumbel``; ``maskgit``: drawn in proportion to confidence;
``stratified``: a fixed, spatially spread order); then **token editing** overwrites, in place, every
position unmasked in an earlier step whose prediction differs from its token with confidence above
``edit_threshold`` (nothing is re-masked). ``edit_threshold <= 0`` turns editing off: plain
MaskGIT-style decoding, and the head runs only at masked positions.

Logits exist only for a chunk of positions at a time (:func:`chunk_rows`: 256 MiB of fp32 logits on
GPUs, 16 MiB on CPUs), never for a whole image or batch: at 1024 px and a 131072-token vocabulary
a whole image's logits are 2 GiB.
Every random draw of image ``k`` comes from its own generator (``seed + k``), so an image does not
depend on the batch it was generated in, nor on the chunk size. This module never imports megatron-core.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import SampleSettings, choices
from .diffusion import unmask_counts

POLICIES = choices(SampleSettings, "policy")
SCHEDULES = choices(SampleSettings, "schedule")


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, h, w] model-order ids
    edits_per_step: list[list[int]] = field(default_factory=list)  # [B][steps]
    committed_per_step: list[list[int]] = field(default_factory=list)  # [B][steps]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``(1 + s) cond - s uncond`` (of head inputs, or of logits)."""
    return (1.0 + scale) * cond - scale * uncond


def head_logits(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[n, V]`` of head inputs ``rows [n, d]`` through the head weight ``[V, d]``. A
    half-precision head on CUDA runs as a cuBLAS GEMM with fp32 output: bf16 logits would lose the
    precision that guidance and the editing threshold need."""
    x = rows.to(weight.dtype)
    if weight.is_cuda and weight.dtype != torch.float32:
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return (x @ weight.t()).float()


def trim_padding(ids: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts without the trailing positions that are padding in every row (they change nothing:
    padding is masked out of attention, and it is always a suffix)."""
    keep = int((~pad).sum(1).max()) if pad.numel() else 0
    return ids[:, : max(keep, 1)], pad[:, : max(keep, 1)]


def _dilate(region: torch.Tensor, border: int) -> torch.Tensor:
    """``region [h, w]`` grown by ``border`` tokens in every direction (a square neighbourhood)."""
    if border <= 0:
        return region.clone()
    k = 2 * border + 1
    grown = torch.nn.functional.max_pool2d(region.float()[None, None], k, stride=1, padding=border)
    return grown[0, 0] > 0


LOGITS_BUDGET = {"cuda": 256 << 20, "cpu": 16 << 20}  # bytes of fp32 logits per chunk of positions


def chunk_rows(vocab_size: int, device="cpu") -> int:
    """Positions per chunk so that a chunk's fp32 logits take ``LOGITS_BUDGET`` bytes (filtering and
    drawing need a few times that in temporaries). On CPU the chunks are small enough for the
    allocator to reuse its heap (256 MiB chunks, each a fresh ``mmap``, sampled up to 2.3x slower there)."""
    kind = torch.device(device).type
    return max(1, LOGITS_BUDGET.get(kind, LOGITS_BUDGET["cuda"]) // (4 * vocab_size))


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, *, inplace: bool = False, filter_first: bool = False
):
    """Temperature, then top-k, then nucleus filtering on ``[..., V]`` logits, in fp32 (``filter_first``:
    the filters on the untempered logits, then the temperature; ``inplace``: overwriting fp32
    ``logits``, as the sampler does with its own chunk)."""
    z = logits.float() if inplace else logits.float().clone()
    scale = temperature > 0 and temperature != 1
    if scale and not filter_first:
        z.div_(temperature)
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z.masked_fill_(z < kth, float("-inf"))
    if top_p < 1.0:
        sz, si = torch.sort(z, dim=-1, descending=True)
        p = torch.softmax(sz, -1)
        drop = p.cumsum(-1).sub_(p) >= top_p  # keep the smallest prefix reaching top_p
        del p
        z.scatter_(-1, si, sz.masked_fill_(drop, float("-inf")))
    if scale and filter_first:
        z.div_(temperature)
    return z


@lru_cache(maxsize=32)
def stratified_order(h: int, w: int) -> torch.Tensor:
    """Rank of each grid cell in a spatially spread order: cells are visited as the 2-D Halton
    sequence (bases 2, 3) first lands in them, so every prefix covers the grid evenly."""

    def radical_inverse(i: int, base: int) -> float:
        f, r = 1.0, 0.0
        while i:
            f /= base
            r += f * (i % base)
            i //= base
        return r

    rank = torch.full((h * w,), -1, dtype=torch.long)
    seen, i = 0, 1
    while seen < h * w:
        cell = min(int(radical_inverse(i, 3) * h), h - 1) * w + min(int(radical_inverse(i, 2) * w), w - 1)
        if rank[cell] < 0:
            rank[cell] = seen
            seen += 1
        i += 1
        if i > 64 * h * w:  # the sequence has covered almost everything; finish in raster order
            rest = (rank < 0).nonzero().squeeze(1)
            rank[rest] = torch.arange(seen, seen + rest.numel())
            break
    return rank


@lru_cache(maxsize=32)
def pmj_order(h: int, w: int, seed: int = 42) -> torch.Tensor:
    """Rank of each cell of a square power-of-two grid in NL-Diffusion-Image's stratified order: a
    progressive multi-jittered sequence from Python's ``random.Random(seed)``. The grid is split into
    quadrants level by level; at each level the quadrants are shuffled and every quadrant that holds no
    visited cell gets one, uniform within it (x then y, drawn again while taken); the cells never
    visited come last, shuffled."""
    import random

    if h != w or h & (h - 1):
        raise ValueError(f"stratified_order=pmj needs a square power-of-two token grid, got {h}x{w}")
    n, rng = h, random.Random(seed)
    taken = [[False] * n for _ in range(n)]
    order: list[int] = []
    blocks, size = [(0, 0)], n
    while size > 1:
        half = size // 2
        children = [(x + dx, y + dy) for x, y in blocks for dx, dy in ((0, 0), (half, 0), (0, half), (half, half))]
        rng.shuffle(children)
        for x0, y0 in children:
            if any(taken[y][x] for y in range(y0, y0 + half) for x in range(x0, x0 + half)):
                continue
            while True:
                x, y = rng.randrange(x0, x0 + half), rng.randrange(y0, y0 + half)
                if not taken[y][x]:
                    break
            taken[y][x] = True
            order.append(y * n + x)
        blocks, size = children, half
    rest = [y * n + x for y in range(n) for x in range(n) if not taken[y][x]]
    rng.shuffle(rest)
    order += rest
    rank = torch.empty(n * n, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(n * n)
    return rank


def _draw_block(v: int) -> int:
    """The block width of :func:`_draw`'s first level: the largest power of two up to 512 dividing ``v``."""
    b = 512
    while v % b:
        b //= 2
    return b


def _draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs [n, V]`` (weights; they need not sum to 1) by inverse CDF: one
    uniform per row from ``gen`` (rows in order, so the draws do not depend on how rows are
    chunked), fp64 sums, on any device. In two
    levels, so that one pass over the probabilities does it: the block of columns from the cumulative
    block sums, then the column from the cumulative sum within that block."""
    n, v = probs.shape
    b = _draw_block(v)
    blocks = probs.view(n, v // b, b)
    cdf = blocks.sum(-1, dtype=torch.float64).cumsum_(-1)  # [n, V / b]
    u = torch.rand(n, 1, generator=gen, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    block = torch.searchsorted(cdf, u).clamp_(max=v // b - 1)  # [n, 1]
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, block[:, :, None].expand(n, 1, b))[:, 0].double().cumsum_(-1)  # [n, b]
    col = torch.searchsorted(inner, u - before).clamp_(max=b - 1)
    return (block * b + col).squeeze(1)


def _choose(
    policy: str,
    conf: torch.Tensor,
    masked: torch.Tensor,
    n: int,
    rank: torch.Tensor,
    gumbel_temperature: float,
    gen: torch.Generator,
    maskgit_draw: str = "confidence",
) -> torch.Tensor:
    """Indices of ``n`` masked positions to commit (one image; ``conf``/``masked`` are ``[N]``)."""
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=conf.device)
    if policy == "gumbel":
        u = torch.rand(conf.shape, generator=gen, device=conf.device).clamp_(1e-20, 1.0)
        score = torch.log(conf.clamp_min(1e-30)) + gumbel_temperature * (-torch.log(-torch.log(u)))
        return torch.topk(score.masked_fill(~masked, float("-inf")), n).indices
    if policy == "maskgit":
        if maskgit_draw == "softmax":  # in proportion to softmax(confidence / tau) over the masked positions
            p = torch.softmax((conf / max(gumbel_temperature, 1e-6)).masked_fill(~masked, float("-inf")), -1)
        else:
            p = conf.clamp_min(1e-12) * masked
        return _draw_without_replacement(p, n, gen)
    if policy == "stratified":
        r = rank.masked_fill(~masked, torch.iinfo(torch.long).max)
        return torch.topk(r, n, largest=False).indices
    raise ValueError(f"unknown policy {policy!r}; allowed: {', '.join(POLICIES)}")


def _draw_without_replacement(p: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``torch.multinomial(p, n, replacement=False, generator=gen)``, draw for draw (the same
    exponential race ``p / Exp(1)``), without its validity check, which reads the device back."""
    q = torch.empty_like(p).exponential_(1, generator=gen)
    race = p / q
    return race.argmax(-1, keepdim=True) if n == 1 else torch.topk(race, n).indices


def _candidates(masked: torch.Tensor, editable: torch.Tensor | None, st: SampleSettings, bound: int) -> torch.Tensor:
    """Positions (one image, ascending) whose prediction may be used, as an index of a size known on
    the host, so that no step waits for the device: the masked ones (``bound`` of them: the count the
    schedule leaves), with editing every position or the masked and ``editable`` ones (``bound``: an
    upper limit of their count; the rest of the index is ``N``, a scratch slot)."""
    n = masked.numel()
    if st.editing and editable is None:
        return torch.arange(n, device=masked.device)
    return (masked | editable if st.editing else masked).nonzero_static(size=bound, fill_value=n).squeeze(1)


def _predict(
    hidden: torch.Tensor,
    head_fn: Callable[[torch.Tensor], torch.Tensor],
    masked: torch.Tensor,
    cand: torch.Tensor,
    st: SampleSettings,
    gen: torch.Generator,
    chunk: int,
    x0: torch.Tensor,
    conf: torch.Tensor,
    keep_all: bool = False,
) -> None:
    """Sampled tokens ``x0`` and their confidences ``conf`` (one image, ``[N + 1]`` with a scratch
    slot at ``N``, filled in place) at the candidate positions ``cand`` (:func:`_candidates`) where
    they matter: masked positions, and with editing unmasked positions whose top probability exceeds
    the threshold (no other sampled token there could pass it); elsewhere ``x0`` keeps the current
    token and ``conf`` 0. Every candidate takes one draw, in ascending order, so the draws do not
    depend on ``chunk``. ``keep_all``: every candidate gets its prediction, whatever its probability
    (``final_prediction``). Nothing here reads the device back."""
    n = masked.numel()
    masked = torch.cat([masked, masked.new_zeros(1)])  # the scratch slot is never masked
    # raw / untempered: the confidence is the untempered softmax's, unfiltered or filtered, so its
    # log-normaliser lse_raw is taken before or after filtering; kept logits are the raw ones / tau
    untempered = st.confidence in ("raw", "untempered")
    tau = st.temperature if st.temperature > 0 else 1.0
    for rows in cand.split(chunk):
        z = head_fn(hidden[rows.clamp(max=n - 1)])
        lse_raw = torch.logsumexp(z.float(), -1) if st.confidence == "raw" else None
        z = filter_logits(z, st.temperature, st.top_k, st.top_p, inplace=True, filter_first=st.filter_order == "filter_first")
        if st.confidence == "untempered":
            lse_raw = torch.logsumexp(z * tau, -1)
        # softmax, not exp_(z - max): its own exp is the fast vectorised one (exp_ cost 1.7x per image
        # at the demo's head on CPU, docs/sampling.md)
        probs = torch.softmax(z, -1)
        keep = None
        if st.editing and not keep_all:
            top = torch.exp(z.max(-1).values * tau - lse_raw) if untempered else probs.max(-1).values
            keep = masked[rows] | (top > st.edit_threshold)
        pick = _draw(probs, gen) if st.temperature > 0 else probs.argmax(-1)
        if untempered:  # the picked token is never filtered out, so its raw logit is tau times the kept one
            c = torch.exp(z.gather(1, pick[:, None]).squeeze(1) * tau - lse_raw)
        else:
            c = probs.gather(1, pick[:, None]).squeeze(1)
        if keep is not None:
            pick, c = torch.where(keep, pick, x0[rows]), torch.where(keep, c, 0.0)
        x0[rows] = pick
        conf[rows] = c


@torch.no_grad()
def sample_tokens(
    hidden_fn: Callable[[torch.Tensor], torch.Tensor],
    head_fn: Callable[[torch.Tensor], torch.Tensor],
    init: torch.Tensor,
    mask_id: int,
    settings: SampleSettings,
    generators: Sequence[torch.Generator],
    *,
    chunk: int = 256,
    editable: torch.Tensor | None = None,
    progress: tqdm | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> SampleResult:
    """Run the sampling loop from ``init [B, h, w]`` (MASK where to generate).

    ``hidden_fn(x [B, h, w], step) -> [B, h, w, d]``: the (guided, if ``settings.guided(step)``)
    head input for the current tokens; ``head_fn(rows [n, d]) -> [n, V]``: fp32 logits of some of
    those rows (:func:`head_logits`), called with at most ``chunk`` rows (:func:`chunk_rows`).
    ``editable [B, h, w]``: where token editing may revise an unmasked token (default: everywhere)."""
    settings.validate()
    x = init.clone()
    b, h, w = x.shape
    n = h * w
    flat = x.view(b, n)
    rank = None
    if settings.policy == "stratified":
        rank = stratified_order(h, w) if settings.stratified_order == "halton" else pmj_order(h, w)
        rank = rank.to(x.device)
    # the only reads of the device before the loop: each image's masked count (and editable region)
    n_masked = [int((flat[i] == mask_id).sum()) for i in range(b)]
    schedules = [
        unmask_counts(n_masked[i], settings.steps, settings.schedule, settings.shift, settings.schedule_counts)
        for i in range(b)
    ]
    may_edit = editable.reshape(b, n) if editable is not None else None
    n_editable = [int(may_edit[i].sum()) for i in range(b)] if may_edit is not None and settings.editing else [0] * b
    result = SampleResult(flat.view(b, h, w), committed_per_step=[[] for _ in range(b)])
    edit_counts: list[list[torch.Tensor]] = [[] for _ in range(b)]  # on the device until the end
    shown = _LaggedCount()
    for k in range(settings.steps):
        tau_k = settings.gumbel_temperature_at(k)
        hidden = hidden_fn(flat.view(b, h, w), k).reshape(b, n, -1)
        for i in range(b):
            masked = flat[i] == mask_id
            x0 = torch.cat([flat[i], flat.new_zeros(1)])  # [N + 1]: a scratch slot for padded candidates
            conf = torch.zeros(n + 1, device=x.device)
            allowed = may_edit[i] if may_edit is not None else None
            last = settings.final_prediction and settings.editing and k == settings.steps - 1
            cand = _candidates(masked, allowed, settings, min(n, n_masked[i] + n_editable[i]))
            _predict(hidden[i], head_fn, masked, cand, settings, generators[i], chunk, x0, conf, keep_all=last)
            x0, conf = x0[:n], conf[:n]
            policy, n_commit = settings.policy, schedules[i][k]
            chosen = _choose(policy, conf, masked, n_commit, rank, tau_k, generators[i], settings.maskgit_draw)
            n_masked[i] -= n_commit
            committed = torch.zeros_like(masked)
            committed.index_fill_(0, chosen, True)  # a scalar fill: no host tensor to copy over
            edits = torch.zeros((), dtype=torch.long, device=x.device)
            if settings.editing:  # positions unmasked before this step, not the ones committed now
                before = ~masked & ~committed
                if allowed is not None:
                    before &= allowed
                changed = before & (x0 != flat[i]) & ((conf > settings.edit_threshold) | last)
                flat[i].copy_(torch.where(changed, x0, flat[i]))  # no host sync, unlike a masked assignment
                edits = changed.sum()
            flat[i][chosen] = x0[chosen]
            edit_counts[i].append(edits)
            result.committed_per_step[i].append(int(chosen.numel()))
        if on_step is not None:
            on_step(k, flat.view(b, h, w))
        if progress is not None:
            progress.update(1)
            if settings.editing:
                shown.put(sum(e[-1] for e in edit_counts))
                if shown.value is not None:
                    progress.set_postfix(edits=shown.value)
    # one host sync for the edit counts instead of one per image and step
    result.edits_per_step = torch.stack([torch.stack(e) for e in edit_counts]).tolist() if b else []
    return result


class _LaggedCount:
    """A device count shown without waiting for the device: copied to pinned host memory as soon
    as it is computed, and read once that copy has finished (on CPU at once)."""

    def __init__(self):
        self.value = None
        self._pending = None

    def put(self, count: torch.Tensor) -> None:
        if not count.is_cuda:
            self.value = int(count)
            return
        if self._pending is not None:
            host, done = self._pending
            if not done.query():  # the last copy is still on its way: this count is not shown
                return
            self.value = int(host)
        host = torch.empty((), dtype=count.dtype, pin_memory=True)
        host.copy_(count, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending = (host, done)


# ---- the pipeline -------------------------------------------------------------------------------
@dataclass
class SamplerOutput:
    images: list  # PIL images, prompt-major
    tokens: torch.Tensor  # [B, h, w] tokenizer-order ids
    edits_per_step: list[list[int]]
    settings: dict
    seconds: float = 0.0
    prompts_cut: int = 0  # prompts (and negative prompts) longer than text.max_len, truncated


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: bf16, fp16, fp32")
    return table[dtype]


class MDMSampler:
    """Prompts in, PIL images out, in the style of a diffusers pipeline.

    sampler = MDMSampler.from_pretrained("ckpt/", device="cuda", dtype="bf16")
    out = sampler(["a red circle"], steps=20, cfg=5.0, edit_threshold=0.9, seed=0)
    out.images[0].save("x.png")

    ``preset`` (:data:`megamdm.config.SAMPLE_PRESETS`, e.g. ``"nld"``) replaces the checkpoint's own
    sampler settings as the defaults of every call.
    """

    def __init__(self, pretrained, device="cpu", dtype="fp32", compile: bool = False, preset: str | None = None):
        self.pretrained = pretrained
        self.cfg = pretrained.config
        if preset is not None:  # on a copy: the caller's Pretrained keeps its own settings
            from .config import preset_settings

            self.cfg = dataclasses.replace(self.cfg, sample=dataclasses.replace(self.cfg.sample, **preset_settings(preset)))
        self.device = torch.device(device)
        self.dtype = _dtype(dtype)
        self.model = pretrained.model.to(self.device, self.dtype).eval()
        self.groups = pretrained.groups
        self.image_tokenizer = pretrained.image_tokenizer
        self.text_tokenizer = pretrained.text_tokenizer
        if hasattr(self.image_tokenizer, "vq"):
            self.image_tokenizer.vq.to(self.device)
        self._hidden = torch.compile(self.model.forward, dynamic=False) if compile else self.model.forward

    @classmethod
    def from_pretrained(
        cls, path, device: str | None = None, dtype="bf16", compile: bool = False, preset: str | None = None
    ) -> MDMSampler:
        from .pretrained import load_single

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_single(path), device=device, dtype=dtype, compile=compile, preset=preset)

    def default_settings(self, **overrides) -> SampleSettings:
        base = self.cfg.sample.settings()
        for k, v in overrides.items():
            if v is not None:
                setattr(base, k, v)
        return base.validate()

    def encode_prompts(self, prompts: Sequence[str], height: int, width: int):
        from .text import format_prompt, tokenize_prompts

        t = self.cfg.text
        texts = [
            format_prompt(
                p,
                width=width,
                height=height,
                score=t.default_score,
                micro_conditioning=t.micro_conditioning,
                template=t.template,
            )
            for p in prompts
        ]
        return tokenize_prompts(self.text_tokenizer, texts, t.max_len, self.template_tail.kept)

    @property
    def template_tail(self):
        from .text import template_tail

        return template_tail(self.text_tokenizer, self.cfg.text.template, self.cfg.model.text_after_image)

    def guided_hidden_fn(self, text_ids, text_pad, settings: SampleSettings, negative=None):
        """``(x, step) ->`` the head input for prompts ``text_ids``: at guided steps
        (``settings.guided``) ``(1 + s) h_cond - s h_uncond`` from one forward of both branches,
        elsewhere the conditional branch alone. The unconditional branch is the masked prompt, or
        ``negative = (ids, pad)``, tokenized negative prompts. Prompt positions that are padding in
        every row of a forward are left out of it."""
        from .text import masked_prompt

        b = text_ids.shape[0]
        dev = self.device
        if negative is None:
            u_ids, u_pad = masked_prompt(
                self.text_tokenizer.mask_id, text_ids, text_pad, self.cfg.text.drop_len, self.template_tail.kept
            )
        else:
            u_ids, u_pad = negative
        cond = trim_padding(text_ids, text_pad)
        both = trim_padding(torch.cat([text_ids, u_ids]), torch.cat([text_pad, u_pad]))
        cond = tuple(t.to(dev) for t in cond)
        both = tuple(t.to(dev) for t in both)

        def fn(x, step):
            if not settings.guided(step):
                return self._hidden(*cond, x)
            hs = self._hidden(*both, torch.cat([x, x])).float()
            return cfg_combine(hs[:b], hs[b:], settings.cfg)

        return fn

    def head_fn(self, rows: torch.Tensor) -> torch.Tensor:
        return head_logits(rows, self.model.head.weight)

    def auto_batch_size(self, height: int, width: int, settings: SampleSettings, jobs: int) -> int:
        """The largest batch (at most ``jobs``) whose sampling fits 80% of the free memory, from one
        measured guided forward and the logits chunk: CUDA's free memory, or the host's available
        memory on CPU."""
        if jobs <= 1:
            return 1
        gh, gw = self.grid_for(height, width)
        ids, pad, _ = self.encode_prompts(["x"], height, width)
        fn = self.guided_hidden_fn(ids, pad, settings)
        x = torch.full((1, gh, gw), self.cfg.model.image_mask_id, dtype=torch.long, device=self.device)
        v = self.cfg.model.image_vocab_size
        fixed = 24 * chunk_rows(v, self.device) * v  # a chunk's fp32 logits and its temporaries, ~24 B per entry
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(x, 0)
            per_image = torch.cuda.max_memory_allocated() - base
            free = torch.cuda.mem_get_info()[0]
        else:
            import psutil

            from .memory import peak_rise_during

            per_image = peak_rise_during(lambda: fn(x, 0))
            free = psutil.virtual_memory().available
        return int(max(1, min(jobs, (0.8 * free - fixed) // max(per_image, 1))))

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        from .vq import check_image_size

        f = self.image_tokenizer.downsample
        check_image_size(height, width, f)
        return height // f, width // f

    def prepare_inpainting(self, init_image, mask, height, width, edit_border: int = 2):
        """Model-order start tokens with MASK where the mask is white (any masked pixel masks its
        token), and where token editing may act: the masked tokens and ``edit_border`` tokens around them."""
        if mask is None:
            raise ValueError("--init-image needs --mask (white = regenerate) or --outpaint")
        if init_image.size != mask.size:
            raise ValueError(
                f"mask size {mask.size[0]}x{mask.size[1]} does not match the image size "
                f"{init_image.size[0]}x{init_image.size[1]}"
            )
        if (init_image.size[1], init_image.size[0]) != (height, width):
            raise ValueError(
                f"init image is {init_image.size[0]}x{init_image.size[1]}, but the requested size is {width}x{height}"
            )
        f = self.image_tokenizer.downsample
        start = self._encode(init_image)
        m = torch.from_numpy(np.asarray(mask.convert("L")) > 127)
        tm = m.view(height // f, f, width // f, f).any(3).any(1)
        start[tm] = self.cfg.model.image_mask_id
        return start, _dilate(tm, edit_border)

    def prepare_outpainting(self, init_image, outpaint: Sequence[int], edit_border: int = 2):
        """The canvas extended by ``outpaint = (left, top, right, bottom)`` pixels around
        ``init_image``: start tokens (the image's, MASK in the new region), where token editing
        may act (the new region and ``edit_border`` tokens into the image), and the canvas (h, w) in pixels."""
        f = self.image_tokenizer.downsample
        if len(outpaint) != 4 or any(int(p) < 0 for p in outpaint) or not any(outpaint):
            raise ValueError(f"outpaint takes four pixel margins left,top,right,bottom >= 0, not all 0; got {list(outpaint)}")
        if any(int(p) % f for p in outpaint):
            raise ValueError(f"outpaint margins {list(outpaint)} must be multiples of the tokenizer's {f} px patches")
        left, top, right, bottom = (int(p) // f for p in outpaint)
        w, h = init_image.size
        self.grid_for(h, w)
        height, width = h + (top + bottom) * f, w + (left + right) * f
        gh, gw = self.grid_for(height, width)
        start = torch.full((gh, gw), self.cfg.model.image_mask_id, dtype=torch.long)
        start[top : top + h // f, left : left + w // f] = self._encode(init_image)
        new = start == self.cfg.model.image_mask_id
        return start, _dilate(new, edit_border), (height, width)

    def _encode(self, image) -> torch.Tensor:
        from .vq import pil_to_tensor

        ids = self.image_tokenizer.encode(pil_to_tensor([image]).to(self.device))
        return self.groups.to_model(ids[0].cpu())

    def __call__(
        self,
        prompts,
        *,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        init_image=None,
        mask=None,
        outpaint: Sequence[int] | None = None,
        edit_border: int = 2,
        progress: bool = True,
        **settings,
    ) -> SamplerOutput:
        """Generate ``num_images_per_prompt`` images per prompt. Image ``j`` of prompt ``i`` is drawn
        with seed ``seeds[i] + j`` (default ``seeds[i] = seed + i * num_images_per_prompt``), so it
        does not depend on batching. Keyword settings override the checkpoint's sampling defaults.

        ``negative_prompt`` (one, or one per prompt) is the unconditional branch of guidance
        instead of the masked prompt. ``init_image`` with ``mask`` regenerates the masked region;
        with ``outpaint = (left, top, right, bottom)`` pixels it extends the canvas around the
        image. Token editing then acts only within ``edit_border`` tokens of the new region.
        ``batch_size=None``: as many images per forward as fit in memory (:meth:`auto_batch_size`)."""
        from .vq import tensor_to_pil

        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        if negative_prompt is not None and len(negative_prompt) != len(prompts):
            raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts; give one, or one per prompt")
        st = self.default_settings(**settings)
        start = editable = None
        if init_image is not None:
            if outpaint is not None and mask is not None:
                raise ValueError("give --mask (inpainting) or --outpaint (extend the canvas), not both")
            if outpaint is not None:
                start, editable, (height, width) = self.prepare_outpainting(init_image, outpaint, edit_border)
            else:
                width, height = init_image.size
                start, editable = self.prepare_inpainting(init_image, mask, height, width, edit_border)
        elif outpaint is not None or mask is not None:
            raise ValueError("--outpaint and --mask need --init-image")
        height = height or self.cfg.sample.height
        width = width or self.cfg.sample.width
        gh, gw = self.grid_for(height, width)
        n = num_images_per_prompt
        if n < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(
                f"num_images_per_prompt={n} and batch_size={batch_size}: give 1 or more (batch_size None: fit memory)"
            )
        if seeds is None:
            base = self.cfg.sample.seed if seed is None else seed
            seeds = [base + i * n for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        negs = negative_prompt or [None] * len(prompts)
        jobs = [(p, sd + j, neg) for p, sd, neg in zip(prompts, seeds, negs) for j in range(n)]
        bs = batch_size or self.auto_batch_size(height, width, st, len(jobs))
        mask_id = self.cfg.model.image_mask_id
        images, tokens, edits, cut_jobs = [], [], [], 0
        t0 = time.time()
        bar = tqdm(total=math.ceil(len(jobs) / bs) * st.steps, desc="sampling", unit="step", disable=not progress, leave=False)
        for s in range(0, len(jobs), bs):
            chunk = jobs[s : s + bs]
            ids, pad, cut = self.encode_prompts([p for p, _, _ in chunk], height, width)
            negative = None
            if negative_prompt:
                *negative, neg_cut = self.encode_prompts([q for _, _, q in chunk], height, width)
                cut += neg_cut
            cut_jobs += cut
            init = torch.full((len(chunk), gh, gw), mask_id, dtype=torch.long)
            if start is not None:
                init[:] = start
            gens = [torch.Generator(self.device).manual_seed(sd) for _, sd, _ in chunk]
            res = sample_tokens(
                self.guided_hidden_fn(ids, pad, st, negative),
                self.head_fn,
                init.to(self.device),
                mask_id,
                st,
                gens,
                chunk=chunk_rows(self.cfg.model.image_vocab_size, self.device),
                editable=editable.expand(len(chunk), gh, gw).to(self.device) if editable is not None else None,
                progress=bar,
            )
            tok = self.groups.to_tokenizer(res.tokens.cpu())
            pix = self.image_tokenizer.decode(tok.to(self.device))
            images += tensor_to_pil(pix.float().cpu())
            tokens.append(tok)
            edits += res.edits_per_step
        bar.close()
        settings_out = {
            **st.__dict__,
            "height": height,
            "width": width,
            "seeds": [sd for _, sd, _ in jobs],
            "dtype": str(self.dtype).replace("torch.", ""),
            "batch_size": bs,
        }
        if negative_prompt is not None:
            settings_out["negative_prompts"] = [q for _, _, q in jobs]
        if outpaint is not None:
            settings_out["outpaint"] = [int(p) for p in outpaint]
        # every prompt (and negative prompt) is in exactly n jobs
        return SamplerOutput(images, torch.cat(tokens), edits, settings_out, time.time() - t0, prompts_cut=cut_jobs // n)
