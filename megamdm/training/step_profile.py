"""Where a training step's time goes: a few :meth:`Trainer.train_step` calls under ``torch.profiler``,
split into body, core attention, GCE head, optimizer and data wait (``tools/bench_train.py``).

Each profiler event is charged to the first category that it or one of its ancestors names: the GCE
head is the fused operator's autograd function and its backward (``ChunkedGCE`` / the Triton op);
core attention is megatron's or PyTorch's attention module in forward (tagged here with
``record_function``) and, in backward, the autograd nodes of its products and softmax; the optimizer
is ``optimizer.step`` (tagged the same way). Times are self times (device time on CUDA, over the
host-side events, which hold their kernels' time; CPU time otherwise) summed per category; the body
is the step's wall time less the other four, so the five add up to the step. Tokens and FLOPs are
counted as the training log counts them (``training/flops.py``): real prompt tokens plus image
tokens, model FLOPs of the real positions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

ATTENTION_TAG = "megamdm::core_attention"
OPTIMIZER_TAG = "megamdm::optimizer"
GCE_NAMES = ("ChunkedGCE", "TritonGCE", "_gce_")
ATTENTION_NAMES = (
    ATTENTION_TAG,
    "scaled_dot_product",
    "flash_attention",
    "efficient_attention",
    "cudnn_attention",
    "BaddbmmBackward",
    "BmmBackward",
    "SoftmaxBackward",
)
CATEGORIES = ("body", "attention", "gce_head", "optimizer", "data_wait")


def _category(ev) -> str | None:
    while ev is not None:
        name = ev.name
        if any(k in name for k in GCE_NAMES):
            return "gce_head"
        if any(k in name for k in ATTENTION_NAMES):
            return "attention"
        if OPTIMIZER_TAG in name:
            return "optimizer"
        ev = ev.cpu_parent
    return None


def spent_by_category(events, *, on_device: bool) -> dict[str, float]:
    """Seconds per category (attention, GCE head, optimizer) of profiler ``events``. On a GPU, the
    device time of the host-side events only: a kernel's own event repeats the time its launching op
    already holds (the Triton GCE kernels, named ``_gce_...``, were counted twice that way)."""
    spent = dict.fromkeys(CATEGORIES[1:4], 0.0)
    for ev in events:
        if on_device and ev.device_type != DeviceType.CPU:
            continue
        cat = _category(ev)
        if cat is not None:
            spent[cat] += (ev.self_device_time_total if on_device else ev.self_cpu_time_total) / 1e6
    return spent


@contextlib.contextmanager
def tagged(trainer) -> Iterator[None]:
    """Tag core attention (forward) and the optimizer step for the profiler, for the length of the call."""
    stack = []

    def pre(_m, _args):
        stack.append(record_function(ATTENTION_TAG).__enter__())

    def post(_m, _args, _out):
        stack.pop().__exit__(None, None, None)

    handles = []
    for m in trainer.model.modules():
        name = type(m).__name__
        if name == "SDPAttention" or name.endswith("DotProductAttention"):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    opt = trainer.optimizer
    own = vars(opt).get("step")  # an instance attribute, if the optimizer already had one
    step = opt.step

    def tagged_step(*a, **kw):
        with record_function(OPTIMIZER_TAG):
            return step(*a, **kw)

    opt.step = tagged_step  # this instance only, restored below
    try:
        yield
    finally:
        if own is None:
            del opt.step
        else:
            opt.step = own
        for h in handles:
            h.remove()


def profile_steps(trainer, steps: int = 2) -> dict:
    """Profile ``steps`` training steps of a set-up :class:`~megamdm.training.trainer.Trainer` (warm it
    up first). Returns per-step means: ``step_s``, the five categories in seconds, and the counts."""
    cfg = trainer.cfg
    cuda = trainer.device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    wall, wait, flops, samples, image_tokens, prompt_tokens = 0.0, 0.0, 0.0, 0, 0, 0
    with tagged(trainer), profile(activities=acts) as prof:
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            r = trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            wall += time.perf_counter() - t
            wait += r.wait_s
            flops += r.flops(cfg.model)
            samples += cfg.data.global_batch_size
            image_tokens += cfg.data.global_batch_size * r.grid[0] * r.grid[1]
            prompt_tokens += r.prompt_tokens
    spent = spent_by_category(prof.events(), on_device=cuda)
    out = {"step_s": wall / steps, "data_wait": wait / steps}
    out.update({k: v / steps for k, v in spent.items()})
    out["body"] = out["step_s"] - sum(out[k] for k in CATEGORIES[1:])
    out.update(
        samples=samples / steps,
        image_tokens=image_tokens / steps,
        real_tokens=(prompt_tokens + image_tokens) / steps,
        flops=flops / steps,
        world=trainer.world,
        peak_tflops=trainer.peak,
    )
    out["tokens_per_s"] = out["real_tokens"] / out["step_s"]
    out["tflops_per_gpu"] = out["flops"] / out["step_s"] / trainer.world / 1e12
    out["mfu"] = out["tflops_per_gpu"] / trainer.peak if trainer.peak else None
    return out
