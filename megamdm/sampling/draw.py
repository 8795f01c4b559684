"""One image's predictions at a step, a chunk of positions at a time: filtering, the draw, the
confidence, and which unmasked tokens token editing may revise.

Logits exist only for a chunk of positions at a time (:func:`chunk_rows`: 256 MiB of fp32 logits on
GPUs, 16 MiB on CPUs), never for a whole image or batch: at 1024 px and a 131072-token vocabulary
a whole image's logits are 2 GiB. Every candidate position takes one draw from the image's own
generator, in ascending order, so the draws do not depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .settings import SampleSettings

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


def candidates(masked: torch.Tensor, editable: torch.Tensor | None, settings: SampleSettings, bound: int) -> torch.Tensor:
    """Positions (one image, ascending) whose prediction may be used, as an index of a size known on
    the host, so that no step waits for the device: the masked ones (``bound`` of them: the count the
    schedule leaves), with editing every position or the masked and ``editable`` ones (``bound``: an
    upper limit of their count; the rest of the index is ``N``, a scratch slot)."""
    n = masked.numel()
    if settings.editing and editable is None:
        return torch.arange(n, device=masked.device)
    return (masked | editable if settings.editing else masked).nonzero_static(size=bound, fill_value=n).squeeze(1)


def predict(
    hidden: torch.Tensor,
    head_fn: Callable[[torch.Tensor], torch.Tensor],
    masked: torch.Tensor,
    cand: torch.Tensor,
    settings: SampleSettings,
    gen: torch.Generator,
    chunk: int,
    x0: torch.Tensor,
    conf: torch.Tensor,
    keep_all: bool = False,
) -> None:
    """Sampled tokens ``x0`` and their confidences ``conf`` (one image, ``[N + 1]`` with a scratch
    slot at ``N``, filled in place) at the candidate positions ``cand`` (:func:`candidates`) where
    they matter: masked positions, and with editing unmasked positions whose top probability exceeds
    the threshold (no other sampled token there could pass it); elsewhere ``x0`` keeps the current
    token and ``conf`` 0. Every candidate takes one draw, in ascending order, so the draws do not
    depend on ``chunk``. ``keep_all``: every candidate gets its prediction, whatever its probability
    (``final_prediction``). Nothing here reads the device back."""
    n = masked.numel()
    masked = torch.cat([masked, masked.new_zeros(1)])  # the scratch slot is never masked
    # raw / untempered: the confidence is the untempered softmax's, unfiltered or filtered, so its
    # log-normaliser lse_raw is taken before or after filtering; kept logits are the raw ones / tau
    untempered = settings.confidence in ("raw", "untempered")
    tau = settings.temperature if settings.temperature > 0 else 1.0
    for rows in cand.split(chunk):
        z = head_fn(hidden[rows.clamp(max=n - 1)])
        lse_raw = torch.logsumexp(z.float(), -1) if settings.confidence == "raw" else None
        z = filter_logits(
            z,
            settings.temperature,
            settings.top_k,
            settings.top_p,
            inplace=True,
            filter_first=settings.filter_order == "filter_first",
        )
        if settings.confidence == "untempered":
            lse_raw = torch.logsumexp(z * tau, -1)
        # softmax, not exp_(z - max): its own exp is the fast vectorised one (exp_ cost 1.7x per image
        # at the demo's head on CPU, docs/sampling.md)
        probs = torch.softmax(z, -1)
        keep = None
        if settings.editing and not keep_all:
            top = torch.exp(z.max(-1).values * tau - lse_raw) if untempered else probs.max(-1).values
            keep = masked[rows] | (top > settings.edit_threshold)
        pick = _draw(probs, gen) if settings.temperature > 0 else probs.argmax(-1)
        if untempered:  # the picked token is never filtered out, so its raw logit is tau times the kept one
            c = torch.exp(z.gather(1, pick[:, None]).squeeze(1) * tau - lse_raw)
        else:
            c = probs.gather(1, pick[:, None]).squeeze(1)
        if keep is not None:
            pick, c = torch.where(keep, pick, x0[rows]), torch.where(keep, c, 0.0)
        x0[rows] = pick
        conf[rows] = c
