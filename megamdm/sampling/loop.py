"""The sampling loop with token editing (docs/design.md §1.3), on any model through two callables.

Each step: one forward pass predicts every image position (cond and uncond in one batch); guidance
is applied to the head input, ``h = (1 + s) h_cond - s h_uncond`` (the head is linear, so this is
CFG on logits at half the head's work); a token ``x0`` is sampled per position (temperature, top-k,
top-p) with confidence ``p(x0)`` (:mod:`.draw`); exactly ``n_k`` masked positions are committed
(:mod:`.schedules`), chosen by a policy (``gumbel``: top-n of ``log p + tau * Gumbel``; ``maskgit``:
drawn in proportion to confidence; ``stratified``: a fixed, spatially spread order); then **token
editing** overwrites, in place, every position unmasked in an earlier step whose prediction differs
from its token with confidence above ``edit_threshold`` (nothing is re-masked). ``edit_threshold <= 0``
turns editing off: plain MaskGIT-style decoding, and the head runs only at masked positions.

:func:`sample_tokens` takes the model as ``hidden_fn`` and ``head_fn``, so the single-GPU pipeline
(:mod:`.pipeline`) and the in-training sampler on the distributed model (``training/samples.py``)
run the same loop. Every random draw of image ``k`` comes from its own generator, so an image does
not depend on the batch it was generated in, nor on the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..options import choices
from .draw import candidates, predict
from .schedules import pmj_order, stratified_order, unmask_counts
from .settings import SampleSettings

POLICIES = choices(SampleSettings, "policy")


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, h, w] model-order ids
    edits_per_step: list[list[int]] = field(default_factory=list)  # [B][steps]
    committed_per_step: list[list[int]] = field(default_factory=list)  # [B][steps]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``(1 + s) cond - s uncond`` (of head inputs, or of logits)."""
    return (1.0 + scale) * cond - scale * uncond


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
    those rows (:func:`megamdm.models.layers.head_logits`), called with at most ``chunk`` rows (:func:`.draw.chunk_rows`).
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
            cand = candidates(masked, allowed, settings, min(n, n_masked[i] + n_editable[i]))
            predict(hidden[i], head_fn, masked, cand, settings, generators[i], chunk, x0, conf, keep_all=last)
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
