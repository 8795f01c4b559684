"""megatron-core on CPU with gloo, as an explicit, reversible context.

megatron-core 0.16 assumes CUDA in three ways (measured; docs/design.md, "Parallel runtime"):
``torch.cuda.current_device()`` calls, ~40 hard-coded ``device="cuda"`` / ``.cuda()`` literals, and
``param.type() == 'torch.cuda.FloatTensor'`` checks; and its RNG trackers need CUDA RNG states.
Inside :func:`megatron_on_cpu` all of these are redirected for this process: ``current_device``
returns the CPU device, ``synchronize``/``empty_cache``/``set_device`` do nothing, a
``TorchFunctionMode`` rewrites CUDA devices to CPU, makes ``Tensor.cuda()`` a no-op and reports CPU
tensors under their CUDA type names (re-entered inside autograd's engine, because a mode is switched
off while its own handler, here ``backward``, runs), and :func:`seed_rng_tracker` puts CPU generator
states behind megatron's tracker. Leaving the context restores every one of them.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE: list[contextlib.ExitStack] = []


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _swap(stack: contextlib.ExitStack, owner, name: str, value) -> None:
    """Set ``owner.name = value`` until ``stack`` closes."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    stack.callback(setattr, owner, name, old)


def active() -> bool:
    return bool(_ACTIVE)


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Run megatron-core on the CPU until the block ends (re-entrant: an inner use is a no-op)."""
    if _ACTIVE:
        yield
        return
    import torch.autograd.graph as graph

    with contextlib.ExitStack() as stack:
        cpu = torch.device("cpu")
        _swap(stack, torch.cuda, "current_device", lambda: cpu)
        for name in ("synchronize", "empty_cache", "set_device"):
            _swap(stack, torch.cuda, name, lambda *a, **k: None)
        inner = graph._engine_run_backward

        @functools.wraps(inner)
        def run_backward(*args, **kwargs):
            with _CudaToCpu():
                return inner(*args, **kwargs)

        _swap(stack, graph, "_engine_run_backward", run_backward)
        _swap(stack, torch.autograd, "_engine_run_backward", run_backward)  # imported by name there
        # the mode sees megatron-core's `.grad` probes of non-leaf views that CUDA runs never route
        # through Python; they read None either way
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")
        stack.enter_context(_CudaToCpu())
        _ACTIVE.append(stack)
        try:
            yield
        finally:
            _ACTIVE.pop()


def seed_rng_tracker(seed: int) -> None:
    """Megatron's RNG trackers on CPU generator states, until :func:`megatron_on_cpu` ends: default
    stream ``seed`` (same on all TP ranks), ``model-parallel-rng`` ``seed + 2718 + tp_rank``, expert
    stream as upstream (``model_parallel_cuda_manual_seed``'s layout)."""
    if not _ACTIVE:
        raise RuntimeError("seed_rng_tracker() needs an active megatron_on_cpu() context")
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, s):
            self._is_initialized = True
            if s in self.seeds_:
                raise Exception(f"seed {s} already exists")
            self.seeds_.add(s)
            self.states_[name] = torch.Generator().manual_seed(s).get_state()

    stack = _ACTIVE[-1]
    tracker = CpuRNGStatesTracker()
    _swap(stack, mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _swap(stack, mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    _swap(stack, mrandom, "_CUDA_RNG_STATE_TRACKER", tracker)
    _swap(stack, mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(
        mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME,
        seed + 1024 + 100 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank(),
    )
