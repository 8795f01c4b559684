"""The pretraining loop on megatron-core: ``megamdm-train --config ...`` runs :func:`pretrain`.

One step (:meth:`Trainer.train_step`): this rank's micro-batches of the global batch go through
megatron's pipeline schedule (``get_forward_backward_func``), gradients are normalised by the number
of supervised tokens of the whole global batch (``calculate_per_token_loss``), and the optimizer
steps unless the loss was NaN/Inf on any rank (then the step is skipped and counted). Checkpoints
are written every ``save_interval`` steps, on SIGTERM / SIGUSR1 (SLURM preemption,
``--signal=USR1@120``) and at the end; ``resume: auto`` continues from the latest complete one.

A :class:`Trainer` is a context: entering it sets up processes, model, optimizer and data (on CPU
inside :func:`~megamdm.compat.megatron_cpu.megatron_on_cpu`), leaving it closes the checkpointer
and the logger and puts the process back as it was (the process group stays, as the launcher's).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..compat.dist_ckpt import writer_queue
from ..compat.megatron_cpu import megatron_on_cpu
from ..config import Config, to_yaml, with_absolute_paths
from ..data.loader import TrainLoader, ValidSet
from ..formats.run_layout import RunLayoutError, iteration_dir, latest_iteration, resolve_iteration_dir
from ..gce import GCEGroups
from ..models.mcore.model import build_model
from ..models.mcore.spec import te_available
from ..objective import LOGGED_SUMS, STEP_SUMS, LossSpec, pack_step_sums, reduce_metrics, unpack_sums
from ..sampling.grid import image_grid
from ..text import load_text_tokenizer
from ..vq import codebook_hash, load_image_tokenizer
from . import parallel
from .checkpoint import Checkpointer, load_model_weights
from .ema import ShardedEMA
from .flops import peak_tflops
from .fp8 import check_fp8_recipe
from .logging import METRICS_FILE, RunLogger
from .metrics import MetricsWindow, StepResult, batch_sums
from .optim import build_optimizer, params_in_sync, wrap_model
from .samples import sample_images


class StopSignal:
    """Set by SIGTERM / SIGUSR1 while installed; checked (and agreed on by all ranks) after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.requested = True


def resolve_transformer_impl(impl: str, device: str) -> bool:
    """True for the Transformer Engine spec."""
    if impl == "local":
        return False
    if impl == "transformer_engine":
        if not te_available():
            raise RuntimeError("train.transformer_impl=transformer_engine but Transformer Engine does not import")
        return True
    return device == "cuda" and te_available()


def cpu_note() -> str:
    """The CPUs this rank may use, and what SLURM granted its task (data workers live on them)."""
    note = f"{len(os.sched_getaffinity(0))} CPUs visible"
    granted = os.environ.get("SLURM_CPUS_PER_TASK")
    return note + (f" (SLURM granted {granted} per task)" if granted else "")


def _resume_dir(cfg: Config, run_dir: Path | None) -> Path | None:
    """The checkpoint ``checkpoint.resume`` names: ``auto`` the run's latest (None: a fresh run), ``none``
    None, or a run or ``iter_NNNNNNN`` directory."""
    r = cfg.checkpoint.resume
    if r == "none" or (r == "auto" and run_dir is None):
        return None
    if r == "auto":
        it = latest_iteration(run_dir)
        return iteration_dir(run_dir, it) if it is not None else None
    try:
        return resolve_iteration_dir(r)
    except RunLayoutError as e:
        raise RunLayoutError(f"checkpoint.resume={r}: {e}") from None


def _init_dir(init_from: str, run_dir: Path | None, rank: int) -> Path:
    """A torch_dist directory for ``checkpoint.init_from``: used as is, or converted once from the
    single-GPU format (in a subprocess on rank 0, which has its own process group)."""
    p = Path(init_from)
    if (p / "config.json").is_file():  # single-GPU format
        out = (run_dir or Path(".")) / "init_from_single"
        if rank == 0 and latest_iteration(out) is None:
            code = "import sys; from megamdm.convert import from_single; from_single(sys.argv[1], sys.argv[2])"
            subprocess.run(
                [sys.executable, "-c", code, str(p), str(out)],
                check=True,
                env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"},
            )
        dist.barrier()
        return iteration_dir(out, latest_iteration(out))
    return resolve_iteration_dir(p)


class Trainer:
    """Set-up on ``__enter__``, one optimizer step per :meth:`train_step`, the whole run in :meth:`train`."""

    def __init__(self, cfg: Config):
        # precision: auto is resolved into it, paths are made absolute (the saved config works from any
        # folder); a config built in code is checked too
        self.cfg = with_absolute_paths(copy.deepcopy(cfg)).validate()
        self._stack = contextlib.ExitStack()

    # ---- set-up ----------------------------------------------------------------------------------
    def __enter__(self) -> Trainer:
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _setup(self) -> None:
        self._setup_runtime()
        self._setup_data()
        self._setup_model()
        self._restore()
        self._setup_ema()
        cfg = self.cfg
        self.valid = None
        if cfg.train.eval_interval:  # data.valid_shards is there: Config.validate checked it
            self.valid = ValidSet(cfg, self.groups, self.text_tok, **self.data_args)
        self.last_valid: dict = {}
        if self.ckpt is not None:
            self._stack.callback(self.ckpt.close)
        dev_name = torch.cuda.get_device_name() if self.device == "cuda" else "cpu"
        self.peak = peak_tflops(dev_name, cfg.train.precision, cfg.logging.peak_tflops)
        self.skipped = 0

    def _setup_runtime(self) -> None:
        """Device, process groups, RNG, precision and layer spec; the logger."""
        cfg, train = self.cfg, self.cfg.train
        self.device = device = parallel.resolve_device(train.device)
        if device == "cpu":
            self._stack.enter_context(megatron_on_cpu())
        self.rank, self.world, _ = parallel.init_distributed(device)
        parallel.init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
        parallel.seed_model_parallel(train.seed, device)
        train.precision, self.precision_note = parallel.resolve_precision(train.precision, device)
        self.use_te = resolve_transformer_impl(train.transformer_impl, device)
        if train.precision == "fp8" and not self.use_te:
            raise ValueError("train.precision=fp8 needs the Transformer Engine spec (a GPU with TE installed)")
        if train.precision == "fp8":
            check_fp8_recipe(
                train.fp8_recipe, torch.cuda.get_device_capability(), torch.version.cuda, torch.cuda.get_device_name()
            )
        self.run_dir = Path(cfg.checkpoint.save_dir) if cfg.checkpoint.save_dir else None
        self.log = RunLogger(cfg, active=self.rank == self.world - 1, run_dir=self.run_dir, total_steps=train.steps)
        self._stack.callback(self.log.finish)

    def _setup_data(self) -> None:
        """GCE groups, tokenizers and this rank's share of every global batch."""
        cfg, parallel_cfg = self.cfg, self.cfg.parallel
        self.groups = (
            GCEGroups.load(cfg.gce.groups_file).with_weights(cfg.gce.group_weights)
            if cfg.gce.groups_file
            else GCEGroups.identity(cfg.model.image_vocab_size, cfg.gce.group_sizes, cfg.gce.group_weights)
        )
        self.text_tok = load_text_tokenizer(cfg.text.tokenizer, cfg.text.mask_token)
        self.image_tok = (
            load_image_tokenizer(cfg.image_tokenizer.kind, cfg.image_tokenizer.path) if cfg.image_tokenizer.path else None
        )
        self.data_args = dict(
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            codebook_hash=codebook_hash(self.image_tok.codebook()) if self.image_tok else None,
            seq_multiple=parallel_cfg.tensor_parallel if parallel_cfg.sequence_parallel else 1,
        )
        self.loader = TrainLoader(cfg, self.groups, self.text_tok, **self.data_args)

    def _setup_model(self) -> None:
        """This rank's model stage, megatron's DDP wrapper, the optimizer and its schedule."""
        cfg, parallel_cfg, train = self.cfg, self.cfg.parallel, self.cfg.train
        self.model = build_model(cfg, LossSpec.from_config(cfg.gce, self.groups), device=self.device, use_te=self.use_te)
        self.ddp = wrap_model(self.model, self.model.config, parallel_cfg, self.device)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, self.model.config, cfg.optim, parallel_cfg, train.steps)
        self.state_module = self.ddp.module  # Float16Module or MDMModel: the sharded state dict owner
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log.info(
            f"megamdm: {self.world} ranks (TP {parallel_cfg.tensor_parallel}, PP {parallel_cfg.pipeline_parallel}, "
            f"DP {ps.get_data_parallel_world_size()}), {self.device}, "
            f"{'Transformer Engine' if self.use_te else 'local'} layers, {train.precision} ({self.precision_note}), "
            f"{n_params / 1e6:.1f}M parameters on this rank, {self.loader.plan.steps_per_epoch} steps/epoch, "
            f"{cpu_note()}"
        )

    def _restore(self) -> None:
        """The checkpointer, and the state to start from: a resumed run, ``init_from`` weights, or none."""
        cfg, ckpt = self.cfg, self.cfg.checkpoint
        self._stack.enter_context(writer_queue())
        self.ckpt = (
            Checkpointer(
                self.run_dir,
                keep_last=ckpt.keep_last,
                async_save=ckpt.async_save,
                device=self.device,
                reshardable=ckpt.reshardable,
            )
            if self.run_dir
            else None
        )
        self.config_yaml = to_yaml(cfg)
        if self.run_dir is not None and self.rank == 0:  # the resolved config, beside the checkpoints
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
        if self.run_dir is not None:
            self.log.info(
                f"config (resolved, paths absolute): {self.run_dir / 'config.yaml'}; metrics: {self.run_dir / METRICS_FILE}"
            )
        self.step = 0
        self.resumed = False
        self.resume_dir = _resume_dir(cfg, self.run_dir)
        self.common: dict = {}
        if self.resume_dir is not None:
            if self.ckpt is None:
                self.ckpt = Checkpointer(
                    self.resume_dir.parent, keep_last=ckpt.keep_last, device=self.device, reshardable=ckpt.reshardable
                )
            self.step, self.common = self.ckpt.load(
                self.resume_dir,
                self.state_module,
                self.optimizer,
                self.scheduler,
                self.loader,
                config=cfg,
                allow_changed_model=ckpt.resume_changed_model,
            )
            self.resumed = True
            self.log.info(f"resumed from {self.resume_dir} at step {self.step}")
        elif ckpt.init_from:
            load_model_weights(self.model, _init_dir(ckpt.init_from, self.run_dir, self.rank))
            self.optimizer.reload_model_params()
            self.log.info(f"initialised the model from {ckpt.init_from}")

    def _setup_ema(self) -> None:
        """The EMA of the weights (``train.ema_decay``), from the weights training starts from."""
        train = self.cfg.train
        self.ema = None
        if not train.ema_decay:
            return
        self.ema = ShardedEMA(self.state_module, self.optimizer, train.ema_decay, warmup=train.ema_warmup)
        if self.resumed and self.common.get("ema_updates") is not None:
            self.ema.load(self.resume_dir, self.common["ema_updates"])
        elif self.resumed:
            self.log.info(f"{self.resume_dir} has no EMA: it starts from the resumed weights")
        self.log.info(
            f"EMA decay {train.ema_decay}{' with warm-up' if train.ema_warmup else ''}: {self.ema.numel() / 1e6:.1f}M "
            f"fp32 values on this rank ({4 * self.ema.numel() / 2**30:.2f} GiB)"
        )

    # ---- one step --------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, mdl):
        b = next(data_iterator)
        out = mdl(
            b.text_ids, b.text_pad_mask, b.image_input, target=b.target, loss_weight=b.loss_weight, is_flipped=b.is_flipped
        )

        def loss_func(o):
            loss_sum, n, metric_sums = o
            return loss_sum, n.int(), {"sums": pack_step_sums(loss_sum, n, metric_sums)}

        return out, loss_func

    def _schedule(self, batches, *, forward_only: bool) -> list:
        """The micro-batches of one step through megatron's pipeline schedule (one sequence length)."""
        gh, gw = batches[0].image_input.shape[1:]
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(batches),
            model=[self.ddp],
            num_microbatches=len(batches),
            seq_length=batches[0].text_ids.shape[1] + gh * gw // 4,
            micro_batch_size=batches[0].image_input.shape[0],
            forward_only=forward_only,
        )

    def train_step(self) -> StepResult:
        """One optimizer step on the next global batch; every rank returns the same sums."""
        t_wait = time.perf_counter()
        micro = next(self.loader)
        wait = time.perf_counter() - t_wait
        batches = [m.corrupted.to(self.device) for m in micro]
        grid = tuple(batches[0].image_input.shape[1:])
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        out = self._schedule(batches, forward_only=False)
        # the global batch's LOGGED_SUMS: the loss sums and the batch's own (training/metrics.py)
        sums = torch.zeros(len(LOGGED_SUMS), dtype=torch.float64, device=self.device)
        n_step = len(STEP_SUMS)
        if ps.is_pipeline_last_stage():
            for o in out:
                sums[:n_step] += o["sums"].to(sums)
            sums[n_step:] = torch.tensor(batch_sums(micro, self.cfg.model, grid))
            dist.all_reduce(sums, group=ps.get_data_parallel_group())
        finite = torch.tensor([1.0 if all(math.isfinite(v) for v in sums.tolist()) else 0.0], device=self.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        ok, grad_norm = finite.item() > 0, None
        if ok:
            ok, grad_norm, _ = self.optimizer.step()
            if ok:
                self.scheduler.step(increment=1)
                if self.ema is not None:
                    self.ema.update()
        self.skipped += not ok
        self.step += 1
        if ps.get_pipeline_model_parallel_world_size() > 1:  # the logging rank is on the last stage
            dist.broadcast(sums, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return StepResult.from_sums(sums.cpu(), bool(finite.item() > 0), grad_norm, grid, wait)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The held-out loss (:class:`~megamdm.data.loader.ValidSet`) of the current weights: ``gce``
        (the training objective), ``ce`` and ``edit``, overall and per mask ratio; every rank
        returns the same numbers."""
        ratios = self.valid.ratios
        sums = torch.zeros(len(ratios), len(STEP_SUMS), dtype=torch.float64, device=self.device)
        self.ddp.eval()
        try:
            for r in range(len(ratios)):
                for micro in self.valid.micro_batches(r).values():
                    out = self._schedule([m.corrupted.to(self.device) for m in micro], forward_only=True)
                    if ps.is_pipeline_last_stage():
                        for o in out:
                            sums[r] += o["sums"].to(sums)
        finally:
            self.ddp.train()
        if ps.is_pipeline_last_stage():
            dist.all_reduce(sums, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(sums, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())

        def means(v) -> dict:
            s = unpack_sums(v)
            m = reduce_metrics(s)
            return {"gce": s["loss_sum"] / max(s["n_tokens"], 1), **{k: m[k] for k in ("ce", "edit") if k in m}}

        out = means(sums.sum(0).cpu())
        for r, ratio in enumerate(ratios):
            out.update({f"{k}@{ratio:g}": v for k, v in means(sums[r].cpu()).items()})
        return out

    # ---- the run ---------------------------------------------------------------------------------
    def train(self) -> dict:
        """Train to ``train.steps`` (or ``exit_after_steps``, or a preemption signal); returns per-step
        losses (on the logging rank) and counters, for tests and scripts."""
        cfg, train, log_cfg = self.cfg, self.cfg.train, self.cfg.logging
        losses: list[float] = []
        if self.step >= train.steps:
            self.log.info(
                f"nothing to do: the run is at step {self.step} and train.steps={train.steps}; raise train.steps to go on"
            )
        window = MetricsWindow()
        last_saved = self.step if self.resumed else -1
        exit_after = self.step + train.exit_after_steps if train.exit_after_steps else None
        with StopSignal() as stop:
            while self.step < train.steps:
                r = self.train_step()
                step = self.step
                if not r.finite:
                    self.log.info(f"step {step}: non-finite loss, step skipped ({self.skipped} so far)")
                s = unpack_sums(r.sums)
                losses.append(s["loss_sum"] / max(s["n_tokens"], 1) if r.finite else float("nan"))
                samples = cfg.data.global_batch_size
                window.add(r, samples, r.flops(cfg.model))
                if step % log_cfg.log_interval == 0 or step == train.steps:
                    self.log.log(
                        step,
                        {
                            **window.summary(world=self.world, peak=self.peak),
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "skipped_steps": self.skipped,
                        },
                    )
                    window = MetricsWindow()
                if self.valid is not None and (step % train.eval_interval == 0 or step == train.steps):
                    self.last_valid = {"step": step, **self.evaluate()}
                    self.log.valid(step, self.last_valid)
                if (
                    log_cfg.sample_interval
                    and step % log_cfg.sample_interval == 0
                    and log_cfg.sample_prompts
                    and self.image_tok
                ):
                    self._log_samples(step)
                if self.ckpt is not None:
                    self.ckpt.maybe_finalize()
                flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                preempted = flag.item() > 0
                final = step == exit_after or step == train.steps
                if self.ckpt is not None and (step % cfg.checkpoint.save_interval == 0 or preempted or final):
                    self.save(" (preemption)" if preempted else "", final=final)
                    last_saved = step
                if preempted:
                    marker = os.environ.get("MEGAMDM_PREEMPT_MARKER")
                    if marker and self.rank == 0:
                        Path(marker).write_text(f"{step}\n")  # launch/common.sh requeues the job
                    break
                if step == exit_after:
                    break
        if self.ckpt is not None and last_saved != self.step:
            self.save(final=True)
        return {
            "losses": losses,
            "valid": self.last_valid,
            "skipped": self.skipped,
            "step": self.step,
            "rank": self.rank,
            "logger": self.rank == self.world - 1,
        }

    def save(self, why: str = "", *, final: bool = False) -> None:
        t0 = time.perf_counter()
        with params_in_sync(self.ddp):
            sharding = self.ckpt.save(
                self.step,
                self.state_module,
                self.optimizer,
                self.scheduler,
                self.loader,
                self.config_yaml,
                final=final,
                ema=self.ema,
                valid=self.last_valid,
            )
        self.log.info(
            f"saved checkpoint {iteration_dir(self.run_dir, self.step)}{why}: optimizer {sharding}, "
            f"{time.perf_counter() - t0:.1f} s{' to schedule' if self.ckpt.queue is not None else ''}"
        )

    def _log_samples(self, step: int) -> None:
        cfg = self.cfg
        f = self.image_tok.downsample
        prompts = cfg.logging.sample_prompts
        with params_in_sync(self.ddp), self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            images = sample_images(
                self.ddp,
                cfg,
                self.groups,
                self.text_tok,
                self.image_tok,
                prompts,
                device=self.device,
                grid=(cfg.sample.height // f, cfg.sample.width // f),
                seed=cfg.sample.seed,
            )
        if self.log.active:
            if self.run_dir is not None:
                path = self.run_dir / "samples" / f"step_{step:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image_grid(images, prompts).save(path)
                self.log.info(f"samples of {len(prompts)} prompts: {path}")
            self.log.images(step, images, prompts)


def pretrain(cfg: Config) -> dict:
    """Train ``cfg`` in this process (one rank of torchrun / srun / a test's forked group)."""
    with Trainer(cfg) as trainer:
        return trainer.train()
