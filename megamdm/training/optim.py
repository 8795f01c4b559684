"""DDP wrapping, megatron-core's (distributed) optimizer and its warmup + decay LR schedule (cosine, WSD, ...).

When neither Transformer Engine nor apex is installed, megatron-core falls back to torch's AdamW,
and its distributed optimizer then cannot resume (megatron-core 0.16, measured; docs/design.md,
"Parallel runtime"): the ``step`` state breaks ``fully_reshardable`` loading and is silently reset
to 0 by ``dp_reshardable`` loading, the fp32 main-param copy runs outside ``no_grad``, one ``step``
tensor is shared by every parameter (so AdamW's bias correction drifts after a resume), and a fresh
optimizer has no state to load into. :func:`fix_torch_adam_fallback` mends those four places on the
optimizer it is given (not on the class); with TE/apex nothing is touched.
"""

from __future__ import annotations

import contextlib
import types

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, distrib_optimizer, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..models.mcore.model import with_precision


def wrap_model(model, tcfg, par, device: str):
    """Float16Module (bf16/fp8) + megatron DDP, wired into the config as the schedules expect."""

    model = with_precision(model)
    overlap = par.overlap_grad_reduce if par.overlap_grad_reduce is not None else device == "cuda"
    gather = par.overlap_param_gather if par.overlap_param_gather is not None else device == "cuda"
    gather = gather and par.use_distributed_optimizer  # there is no parameter all-gather without it
    ddp = DistributedDataParallel(
        config=tcfg,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=par.grad_reduce_dtype == "fp32",
            overlap_grad_reduce=overlap,
            overlap_param_gather=gather,
            align_param_gather=gather,
            use_distributed_optimizer=par.use_distributed_optimizer,
            fp8_param_gather=tcfg.fp8_param,  # FP8 parameters are all-gathered in FP8
        ),
        module=model,
    )
    tcfg.no_sync_func = ddp.no_sync
    tcfg.finalize_model_grads_func = finalize_model_grads
    if overlap:
        tcfg.grad_sync_func = ddp.start_grad_sync
    if gather:  # each stage's first forward waits for its parameters (megatron's forward pre-hooks)
        tcfg.param_sync_func = ddp.start_param_sync
    return ddp


@contextlib.contextmanager
def params_in_sync(ddp):
    """The whole parameters on every rank inside the block (a checkpoint save, EMA sampling): with
    ``overlap_param_gather`` the all-gather of a step's parameters otherwise waits for the next forward."""
    if not getattr(ddp, "use_forward_hook", False):
        yield
        return
    ddp.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp.enable_forward_pre_hook()


def build_optimizer(ddp, tcfg, optim, par, steps: int):
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        clip_grad=optim.clip_grad,
        bf16=tcfg.bf16,
        params_dtype=tcfg.params_dtype,
        use_distributed_optimizer=par.use_distributed_optimizer,
    )
    opt = get_megatron_optimizer(ocfg, [ddp])
    fix_torch_adam_fallback(opt)
    return opt, build_scheduler(opt, optim, steps)


def build_scheduler(opt, optim, steps: int):
    """megatron-core's ``OptimizerParamScheduler``: linear warmup, then ``optim.lr_decay_style`` over ``steps``."""
    return OptimizerParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(steps, optim.warmup_steps + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(steps, 1),
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay_steps(optim, steps) if optim.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style=optim.lr_wsd_decay_style,
    )


def wsd_decay_steps(optim, steps: int) -> int:
    """Steps of the WSD anneal: the last ``lr_wsd_decay_fraction`` of the run, after the warmup."""
    return max(1, min(round(optim.lr_wsd_decay_fraction * steps), steps - optim.warmup_steps))


def uses_torch_adam() -> bool:
    return not distrib_optimizer.HAVE_APEX_OR_TE


def fix_torch_adam_fallback(optimizer) -> None:
    """Mend megatron's distributed optimizer around torch AdamW, on this optimizer's instances only
    (the class is left as it is)."""
    if not uses_torch_adam():
        return

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, t in dst.items():
                # torch AdamW's per-param "step" comes back through the param groups
                # (load_state_dict); dp_reshardable hands the current, unloaded one here
                if key in tensors and key != "step":
                    t.copy_(tensors[key])

    def load_state_dict(self, state_dict):
        init_torch_adam_state(self)
        DistributedOptimizer.load_state_dict(self, state_dict)
        for st in self.optimizer.state.values():  # one step tensor per parameter, not a shared one
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            opt._set_main_param_and_optimizer_states = types.MethodType(set_states, opt)
            opt.load_state_dict = types.MethodType(load_state_dict, opt)


def init_torch_adam_state(optimizer) -> None:
    """Give torch AdamW empty state for every parameter (it creates it lazily at the first step),
    so a checkpoint can be loaded into an optimizer that has not stepped yet."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
