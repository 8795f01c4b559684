"""Run megatron-core on CPU with gloo: an opt-in backend, enabled only when ``train.device`` is cpu.

megatron-core 0.16 assumes CUDA in three ways (measured in shared/notes/megatron-core-on-cpu.md):
``torch.cuda.current_device()`` calls, ~40 hard-coded ``device="cuda"`` / ``.cuda()`` literals, and
``param.type() == 'torch.cuda.FloatTensor'`` checks. :func:`enable` redirects all three for this
process: ``current_device`` returns the CPU device, ``synchronize``/``empty_cache`` do nothing, and a
process-wide ``TorchFunctionMode`` rewrites CUDA devices to CPU, makes ``Tensor.cuda()`` a no-op and
reports CPU tensors under their CUDA type names. The mode is re-entered inside autograd's engine,
because a mode is switched off while its own handler (here: ``backward``) runs.

:func:`install_rng_tracker` replaces ``model_parallel_cuda_manual_seed`` (which needs CUDA RNG)
with CPU generator states of the same seed layout. :func:`patch_distributed_optimizer` fixes three
megatron-core bugs of the distributed optimizer with torch's AdamW (the fallback when neither TE
nor apex is installed, i.e. always on CPU) that break resuming.

Nothing here is imported on GPU machines; the model and training code never see it.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE = None


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


def enable() -> None:
    """Redirect megatron-core's CUDA assumptions to the CPU for this process (idempotent)."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.set_device = lambda *a, **k: None
    _MODE = _CudaToCpu()
    _MODE.__enter__()
    # the mode sees megatron-core's `.grad` probes of non-leaf views that CUDA runs never route
    # through Python; they read None either way
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")

    import torch.autograd.graph as graph

    inner = graph._engine_run_backward

    @functools.wraps(inner)
    def run_backward(*args, **kwargs):
        with _CudaToCpu():
            return inner(*args, **kwargs)

    graph._engine_run_backward = run_backward
    torch.autograd._engine_run_backward = run_backward  # torch.autograd imported the name directly
    _ENABLED = True


def install_rng_tracker(seed: int) -> None:
    """Megatron's RNG trackers on CPU generator states: default stream ``seed`` (same on all TP
    ranks), ``model-parallel-rng`` ``seed + 2718 + tp_rank``, expert stream as upstream."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, s):
            self._is_initialized = True
            if s in self.seeds_:
                raise Exception(f"seed {s} already exists")
            self.seeds_.add(s)
            self.states_[name] = torch.Generator().manual_seed(s).get_state()

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank())
