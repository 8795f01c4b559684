"""The pretraining loop on megatron-core: ``python -m megamdm.train --config ...`` runs :func:`pretrain`.

One step: this rank's micro-batches of the global batch go through megatron's pipeline schedule
(``get_forward_backward_func``), gradients are normalised by the number of supervised tokens of
the whole global batch (``calculate_per_token_loss``), and the optimizer steps unless the loss was
NaN/Inf on any rank (then the step is skipped and counted). Checkpoints are written every
``save_interval`` steps, on SIGTERM / SIGUSR1 (SLURM preemption, ``--signal=USR1@120``) and at the
end; ``resume: auto`` continues from the latest complete one.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config import Config, to_yaml
from ..gce import GCEGroups
from ..objective import LossSpec, reduce_metrics
from ..text import load_text_tokenizer
from ..vq import codebook_hash, load_image_tokenizer
from . import parallel
from .checkpoint import Checkpointer, iteration_dir, latest_iteration, load_model_weights
from .flops import forward_flops, peak_tflops
from .logging import RunLogger
from .optim import build_optimizer, wrap_model

METRIC_NAMES = ("loss_sum", "n_tokens", "ce_sum", "group_sum", "n_masked", "edit_sum", "n_flipped")


class StopSignal:
    """Set by SIGTERM / SIGUSR1; checked (and agreed on by all ranks) at the end of each step."""

    def __init__(self):
        self.requested = False
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def resolve_transformer_impl(impl: str, device: str) -> bool:
    """True for the Transformer Engine spec."""
    from ..models.mcore.spec import te_available

    if impl == "local":
        return False
    if impl == "transformer_engine":
        if not te_available():
            raise RuntimeError("train.transformer_impl=transformer_engine but Transformer Engine does not import")
        return True
    if impl != "auto":
        raise ValueError(f"train.transformer_impl={impl!r} is not one of auto, transformer_engine, local")
    return device == "cuda" and te_available()


def _resume_dir(cfg: Config, run_dir: Optional[Path]) -> Optional[Path]:
    r = cfg.train.resume
    if r == "none":
        return None
    if r == "auto":
        if run_dir is None:
            return None
        it = latest_iteration(run_dir)
        return iteration_dir(run_dir, it) if it is not None else None
    p = Path(r)
    if (p / "latest_checkpointed_iteration.txt").is_file():
        return iteration_dir(p, latest_iteration(p))
    if not (p / ".metadata").is_file():
        raise FileNotFoundError(f"train.resume={r}: not a checkpoint (run directory or iter_NNNNNNN)")
    return p


def _init_dir(init_from: str, run_dir: Optional[Path], rank: int) -> Path:
    """A torch_dist directory for ``train.init_from``: used as is, or converted once from the
    single-GPU format (in a subprocess on rank 0, which has its own process group)."""
    p = Path(init_from)
    if (p / "config.json").is_file():  # single-GPU format
        out = (run_dir or Path(".")) / "init_from_single"
        if rank == 0 and latest_iteration(out) is None:
            code = "import sys; from megamdm.convert import from_single; from_single(sys.argv[1], sys.argv[2])"
            subprocess.run([sys.executable, "-c", code, str(p), str(out)], check=True,
                           env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        dist.barrier()
        return iteration_dir(out, latest_iteration(out))
    if (p / "latest_checkpointed_iteration.txt").is_file():
        return iteration_dir(p, latest_iteration(p))
    return p


def pretrain(cfg: Config) -> dict:
    """Train; returns per-step losses (on the logging rank) and counters, for tests and scripts."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..data.loader import TrainLoader
    from ..models.mcore.model import build_model

    t = cfg.train
    device = parallel.resolve_device(t.device)
    rank, world, _ = parallel.init_distributed(device)
    parallel.init_model_parallel(t.tensor_parallel, t.pipeline_parallel)
    parallel.seed_model_parallel(t.seed, device)
    use_te = resolve_transformer_impl(t.transformer_impl, device)
    if t.precision == "fp8" and not use_te:
        raise ValueError("train.precision=fp8 needs the Transformer Engine spec (a GPU with TE installed)")
    run_dir = Path(t.save_dir) if t.save_dir else None
    log = RunLogger(cfg, active=rank == world - 1, run_dir=run_dir, total_steps=t.steps)

    groups = (GCEGroups.load(cfg.gce.groups_file).with_weights(cfg.gce.group_weights) if cfg.gce.groups_file
              else GCEGroups.identity(cfg.model.image_vocab_size, cfg.gce.group_sizes, cfg.gce.group_weights))
    text_tok = load_text_tokenizer(cfg.text.tokenizer, cfg.text.mask_token)
    image_tok = load_image_tokenizer(cfg.image_tokenizer.kind, cfg.image_tokenizer.path) \
        if cfg.image_tokenizer.path else None
    loader = TrainLoader(cfg, groups, text_tok, dp_rank=ps.get_data_parallel_rank(),
                         dp_size=ps.get_data_parallel_world_size(),
                         codebook_hash=codebook_hash(image_tok.codebook()) if image_tok else None)

    model = build_model(cfg, LossSpec.from_config(cfg.gce, groups), device=device, use_te=use_te)
    tcfg = model.config
    ddp = wrap_model(model, tcfg, t, device)
    optimizer, scheduler = build_optimizer(ddp, tcfg, t)
    state_module = ddp.module  # Float16Module or MDMModel: the sharded state dict owner
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"megamdm: {world} ranks (TP {t.tensor_parallel}, PP {t.pipeline_parallel}, "
             f"DP {ps.get_data_parallel_world_size()}), {device}, {'Transformer Engine' if use_te else 'local'} "
             f"layers, {t.precision}, {n_params / 1e6:.1f}M parameters on this rank, "
             f"{loader.plan.steps_per_epoch} steps/epoch")

    ckpt = Checkpointer(run_dir, keep_last=t.keep_last, async_save=t.async_save, device=device) if run_dir else None
    config_yaml = to_yaml(cfg)
    start = 0
    resume = _resume_dir(cfg, run_dir)
    if resume is not None:
        if ckpt is None:
            ckpt = Checkpointer(resume.parent, keep_last=t.keep_last, device=device)
        start = ckpt.load(resume, state_module, optimizer, scheduler, loader)
        log.info(f"resumed from {resume} at step {start}")
    elif t.init_from:
        src = _init_dir(t.init_from, run_dir, rank)
        load_model_weights(model, src)
        optimizer.reload_model_params()
        log.info(f"initialised the model from {t.init_from}")

    stop = StopSignal()
    fb = get_forward_backward_func()
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(dev_name, t.precision, t.peak_tflops)
    L = cfg.text.max_len
    losses: list[float] = []
    skipped = 0
    window = {"sums": torch.zeros(len(METRIC_NAMES), dtype=torch.float64), "steps": 0, "samples": 0, "tokens": 0,
              "flops": 0.0, "wait": 0.0, "t0": time.perf_counter(), "grad_norm": None}
    step = start
    last_saved = start if resume is not None else -1
    exit_after = start + t.exit_after_steps if t.exit_after_steps else None

    def forward_step(data_iterator, mdl):
        b = next(data_iterator)
        out = mdl(b.text_ids, b.text_pad_mask, b.image_input, target=b.target, loss_weight=b.loss_weight,
                  is_flipped=b.is_flipped)

        def loss_func(o):
            loss_sum, n, metrics = o
            stats = torch.cat([loss_sum.detach().float().view(1), n.float().view(1), metrics.float()])
            return loss_sum, n.int(), {"stats": stats}

        return out, loss_func

    while step < t.steps:
        t_wait = time.perf_counter()
        micro = next(loader)
        wait = time.perf_counter() - t_wait
        batches = [m.corrupted.to(device) for m in micro]
        gh, gw = batches[0].image_input.shape[1:]
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = fb(forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
                 num_microbatches=len(batches), seq_length=L + gh * gw // 4,
                 micro_batch_size=batches[0].image_input.shape[0], forward_only=False)
        stats = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage():
            for o in out:
                stats += o["stats"].to(stats)
            dist.all_reduce(stats, group=ps.get_data_parallel_group())
        finite = torch.tensor([1.0 if all(math.isfinite(v) for v in stats.tolist()) else 0.0], device=device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        grad_norm = None
        if finite.item() > 0:
            ok, grad_norm, _ = optimizer.step()
            if ok:
                scheduler.step(increment=1)
            else:
                skipped += 1
        else:
            skipped += 1
            log.info(f"step {step + 1}: non-finite loss, step skipped ({skipped} so far)")
        step += 1
        # ---- bookkeeping -----------------------------------------------------------------------
        pp_last = ps.get_pipeline_model_parallel_last_rank()
        if ps.get_pipeline_model_parallel_world_size() > 1:  # the logging rank is on the last stage
            dist.broadcast(stats, src=pp_last, group=ps.get_pipeline_model_parallel_group())
        st = stats.cpu()
        if finite.item() > 0:
            window["sums"] += st
            losses.append(float(st[0] / max(st[1], 1)))
        else:
            losses.append(float("nan"))
        samples = cfg.data.global_batch_size
        window["steps"] += 1
        window["samples"] += samples
        window["tokens"] += samples * gh * gw
        per_sample = forward_flops(cfg.model, L, gh, gw, 0.0)
        window["flops"] += 3.0 * (samples * per_sample + 2.0 * float(st[1]) * cfg.model.hidden_size
                                  * cfg.model.image_vocab_size)
        window["wait"] += wait
        window["grad_norm"] = grad_norm if grad_norm is not None else window["grad_norm"]
        if step % t.log_interval == 0 or step == t.steps:
            dt = time.perf_counter() - window["t0"]
            s = window["sums"]
            m = reduce_metrics(dict(zip(METRIC_NAMES, s.tolist())))
            tflops = window["flops"] / dt / world / 1e12
            log.log(step, {"loss": float(s[0] / max(s[1], 1)), **m, "grad_norm": window["grad_norm"],
                           "lr": optimizer.param_groups[0]["lr"], "samples_per_s": window["samples"] / dt,
                           "tokens_per_s": window["tokens"] / dt, "tflops_per_gpu": tflops,
                           "mfu": tflops / peak if peak else None, "skipped_steps": skipped,
                           "data_wait_ms": 1e3 * window["wait"] / window["steps"], "step_time_s": dt / window["steps"]})
            window.update(sums=torch.zeros_like(window["sums"]), steps=0, samples=0, tokens=0, flops=0.0, wait=0.0,
                          t0=time.perf_counter())
        if t.sample_interval and step % t.sample_interval == 0 and t.sample_prompts and image_tok is not None:
            _log_samples(ddp, cfg, groups, text_tok, image_tok, device, step, run_dir, log)
        if ckpt is not None:
            ckpt.maybe_finalize()
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        preempted = flag.item() > 0
        due = ckpt is not None and (step % t.save_interval == 0 or preempted or step == exit_after)
        if due:
            ckpt.save(step, state_module, optimizer, scheduler, loader, config_yaml)
            last_saved = step
            log.info(f"saved checkpoint {iteration_dir(run_dir, step)}" + (" (preemption)" if preempted else ""))
        if preempted:
            marker = os.environ.get("MEGAMDM_PREEMPT_MARKER")
            if marker and rank == 0:
                Path(marker).write_text(f"{step}\n")  # launch/common.sh requeues the job
            break
        if step == exit_after:
            break
    if ckpt is not None:
        if last_saved != step:
            ckpt.save(step, state_module, optimizer, scheduler, loader, config_yaml)
            log.info(f"saved checkpoint {iteration_dir(run_dir, step)}")
        ckpt.close()
    log.finish()
    return {"losses": losses, "skipped": skipped, "step": step, "rank": rank, "logger": rank == world - 1}


def _log_samples(ddp, cfg, groups, text_tok, image_tok, device, step, run_dir, log) -> None:
    from .samples import sample_images

    f = image_tok.downsample
    grid = (cfg.sample.height // f, cfg.sample.width // f)
    images = sample_images(ddp, cfg, groups, text_tok, image_tok, cfg.train.sample_prompts, device=device, grid=grid,
                           seed=cfg.sample.seed)
    if log.active:
        from ..grid import image_grid

        if run_dir is not None:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            image_grid(images, cfg.train.sample_prompts).save(run_dir / "samples" / f"step_{step:07d}.png")
        log.images(step, images, cfg.train.sample_prompts)
