"""The fine-tuning loop: DeepSpeed ZeRO on the standalone model, built from the pretraining loop's pieces.

The standalone model trains on zarr token shards through the same loader, corruption and GCE +
flip objective as pretraining (:class:`~megamdm.objective.LossSpec` from the config, checked against
the groups). Processes come up as pretraining's do (:func:`megamdm.training.parallel.init_distributed`:
torchrun, srun or one process); each step's sums are the named :data:`~megamdm.objective.LOGGED_SUMS`
and the log line and W&B run are pretraining's (:class:`~megamdm.training.metrics.MetricsWindow`,
:class:`~megamdm.training.logging.RunLogger`). Steps, learning rate, precision, EMA, checkpoints and
logging come from the shared ``train``, ``optim``, ``checkpoint`` and ``logging`` sections, with
fine-tuning's own defaults (:data:`DEFAULTS`); ZeRO stage 2 or 3 comes from a DeepSpeed JSON whose batch
sizes, optimizer and schedule are filled in from the config, so the two cannot disagree.

Loss normalisation matches pretraining: the sum of per-token losses over the *global* batch divided
by its number of supervised tokens, so ZeRO at any data-parallel size follows the plain run. The
result is written back in the single-GPU format (LoRA merged), so ``megamdm-sample`` uses it unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..compat.deepspeed_cpu import no_shm_comm
from ..config import Config, ConfigError, ModelConfig, TextConfig, find_config, load_config
from ..data.loader import TrainLoader
from ..formats.single import Pretrained, load_single, write_single
from ..objective import LOGGED_SUMS, STEP_SUMS, LossSpec, loss_parts, pack_metric_sums, pack_step_sums, select_supervised
from ..sampling.grid import image_grid
from ..sampling.pipeline import MDMSampler
from ..sampling.settings import SampleConfig
from ..training import parallel
from ..training.flops import peak_tflops
from ..training.logging import RunLogger
from ..training.metrics import MetricsWindow, StepResult, batch_sums
from ..vq import codebook_hash
from .ema import FinetuneEMA
from .lora import add_lora, merged_state_dict, save_lora_adapter

# Fine-tuning's defaults for the sections it shares with pretraining (a fine-tune starts from trained
# weights: a small learning rate, no weight decay, bf16, every checkpoint kept).
DEFAULTS = {
    "optim.lr": 1e-5,
    "optim.min_lr": 1e-6,
    "optim.warmup_steps": 50,
    "optim.weight_decay": 0.0,
    "train.precision": "bf16",
    "checkpoint.save_dir": "finetune_out",
    "checkpoint.save_interval": 500,
    "checkpoint.keep_last": 0,
}
DEEPSPEED_DIR = "deepspeed"  # under checkpoint.save_dir: DeepSpeed's checkpoints, one tag folder per save
EXPORT_DIR = "single"  # under checkpoint.save_dir: the result in the single-GPU format


def finetune_config(path=None, overrides: list[str] | None = None) -> Config:
    """A fine-tuning :class:`Config`: :data:`DEFAULTS` under the file ``path`` and the dotted ``overrides``."""
    return load_config(path, overrides, defaults=DEFAULTS)


class TrainStep(nn.Module):
    """Model + objective in one ``forward``, so ZeRO-3 gathers every weight it touches (the GCE
    head's weight through ``head.forward``). Returns ``(loss_sum, num_tokens, metric sums)`` as
    ``MDMModel`` does (:data:`~megamdm.objective.METRIC_SUMS`)."""

    def __init__(self, model: nn.Module, spec: LossSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, text_ids, text_pad_mask, image_input, target, loss_weight, is_flipped):
        hidden = self.model(text_ids, text_pad_mask, image_input)
        hs, ts, ws, fl = select_supervised(hidden, target, loss_weight, is_flipped)
        stats = self.model.head(
            hs,
            ts,
            ws,
            group_sizes=self.spec.group_sizes,
            group_weights=self.spec.group_weights,
            impl=self.spec.impl,
            grad_filter=self.spec.grad_filter,
        )
        parts = loss_parts(stats, fl, self.spec)
        return parts.loss_sum, parts.num_tokens, pack_metric_sums(parts)


def check_config(cfg: Config) -> None:
    """What fine-tuning cannot follow, refused in one line each, before any process or DeepSpeed starts."""
    changed = [
        s for s, cls in (("model", ModelConfig), ("text", TextConfig), ("sample", SampleConfig)) if getattr(cfg, s) != cls()
    ]
    if changed:
        raise ConfigError(
            f"{', '.join(s + '.*' for s in changed)} come from the checkpoint: fine-tuning cannot change them "
            "(remove those settings)"
        )
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: give the token-shard datasets to fine-tune on (data.shards=[DIR])")
    missing = [d for d in cfg.data.shards if not Path(d).is_dir()]
    if missing:
        raise ConfigError(f"data.shards: {missing[0]} is not a folder (a token-shard dataset from megamdm-preprocess)")
    if not find_config(cfg.finetune.deepspeed_config).is_file():
        raise ConfigError(f"finetune.deepspeed_config: {cfg.finetune.deepspeed_config} not found")
    if cfg.train.steps <= cfg.optim.warmup_steps:
        raise ConfigError(
            f"train.steps={cfg.train.steps} does not pass optim.warmup_steps={cfg.optim.warmup_steps}: the learning "
            "rate would never reach optim.lr (lower the warm-up or train longer)"
        )
    if cfg.train.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision={cfg.train.precision}: fine-tuning trains in bf16 or fp32 (or auto)")
    if cfg.optim.lr_decay_style != "cosine":
        raise ConfigError(
            f"optim.lr_decay_style={cfg.optim.lr_decay_style}: fine-tuning's DeepSpeed schedule is warm-up, then "
            "cosine to optim.min_lr (lr_decay_style cosine)"
        )
    if not cfg.checkpoint.save_dir:
        raise ConfigError("checkpoint.save_dir (megamdm-finetune --out) is not set: the folder for checkpoints and the export")
    if cfg.checkpoint.resume not in ("auto", "none"):
        raise ConfigError(
            f"checkpoint.resume={cfg.checkpoint.resume}: fine-tuning resumes from checkpoint.save_dir (auto) "
            "or starts fresh (none)"
        )


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON of ``finetune.deepspeed_config`` with batch sizes, optimizer, schedule and
    precision filled in from ``cfg``."""
    ds = json.loads(find_config(cfg.finetune.deepspeed_config).read_text())
    data, optim, steps = cfg.data, cfg.optim, cfg.train.steps
    if data.global_batch_size % (world * data.micro_batch_size):
        raise ValueError(
            f"data.global_batch_size={data.global_batch_size} is not a multiple of "
            f"{world} ranks x micro_batch_size {data.micro_batch_size}"
        )
    ds["train_micro_batch_size_per_gpu"] = data.micro_batch_size
    ds["gradient_accumulation_steps"] = data.global_batch_size // (world * data.micro_batch_size)
    ds["train_batch_size"] = data.global_batch_size
    ds["gradient_clipping"] = optim.clip_grad
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    ds["optimizer"]["params"].update(lr=optim.lr, weight_decay=optim.weight_decay, betas=[optim.adam_beta1, optim.adam_beta2])
    if not torch.cuda.is_available():  # DeepSpeed's fused Adam needs CUDA; torch's AdamW is exact on CPU
        ds["optimizer"]["params"]["torch_adam"] = True
    ds["scheduler"] = {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": max(steps, 1),
            # DeepSpeed refuses 0 warmup steps: one step that starts at the full rate is none
            "warmup_num_steps": max(optim.warmup_steps, 1),
            "warmup_min_ratio": 0.0 if optim.warmup_steps > 0 else 1.0,
            "cos_min_ratio": optim.min_lr / optim.lr,
        },
    }
    if cfg.finetune.offload_optimizer:
        ds.setdefault("zero_optimization", {})["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds["steps_per_print"] = 10**9  # megamdm logs itself
    return ds


def finetune(checkpoint, cfg: Config) -> dict:
    """Fine-tune the single-GPU-format ``checkpoint`` as ``cfg`` says; returns per-step losses
    (identical on every rank, including those of the run this one resumed) and the export path."""
    cfg = copy.deepcopy(cfg)  # the model and text sections become the checkpoint's, precision is resolved
    check_config(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with contextlib.ExitStack() as stack:
        if device == "cpu":
            stack.enter_context(no_shm_comm())
        run = Finetuner(checkpoint, cfg, device)
        stack.callback(run.log.finish)
        return run.train()


class Finetuner:
    """One fine-tuning run: set up in the constructor, :meth:`train` to the end and export."""

    def __init__(self, checkpoint, cfg: Config, device: str):
        import deepspeed  # the train extra: fine-tuning alone needs DeepSpeed

        self.rank, self.world, _ = parallel.init_distributed(device)
        train = cfg.train
        train.precision, precision_note = parallel.resolve_precision(train.precision, device)
        torch.manual_seed(train.seed)
        self.pre = pre = load_single(checkpoint)
        cfg.model, cfg.text = pre.config.model, pre.config.text
        self.cfg, self.device = cfg, device
        self.out = Path(cfg.checkpoint.save_dir)
        self.ckpt_dir = self.out / DEEPSPEED_DIR
        self.log = RunLogger(cfg, active=self.rank == 0, run_dir=self.out, total_steps=train.steps)
        groups = pre.groups.with_weights(cfg.gce.group_weights)
        self.loader = TrainLoader(
            cfg,
            groups,
            pre.text_tokenizer,
            dp_rank=self.rank,
            dp_size=self.world,
            codebook_hash=codebook_hash(pre.image_tokenizer.codebook()),
        )
        self.export_dtype = next(pre.model.parameters()).dtype
        model = pre.model.float().train()
        model.gradient_checkpointing = cfg.finetune.gradient_checkpointing
        if cfg.finetune.lora_rank:
            model = add_lora(model, cfg.finetune.lora_rank, cfg.finetune.lora_alpha, cfg.finetune.lora_targets)
        step_module = TrainStep(model, LossSpec.from_config(cfg.gce, groups))
        params = [p for p in step_module.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(
            model=step_module, model_parameters=params, config=deepspeed_config(cfg, self.world)
        )
        self.step, self.losses = 0, []
        self._resume()
        self._setup_ema()
        n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3 leaves numel() == 0
        lora = f" (LoRA r={cfg.finetune.lora_rank})" if cfg.finetune.lora_rank else ""
        self.log.info(
            f"megamdm finetune: {self.world} ranks, ZeRO stage {self.engine.zero_optimization_stage()}, {device}, "
            f"{train.precision} ({precision_note}), {n_trainable / 1e6:.2f}M trainable parameters{lora}"
        )
        dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        self.peak = peak_tflops(dev_name, train.precision, cfg.logging.peak_tflops)

    def _resume(self) -> None:
        self.resumed_tag = None
        if self.cfg.checkpoint.resume == "none" or not (self.ckpt_dir / "latest").is_file():
            return
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        self.step = int(client["step"])
        self.loader.load_state_dict(client["loader"])
        self.losses = list(client.get("losses", []))
        self.resumed_tag = self.ckpt_dir / (self.ckpt_dir / "latest").read_text().strip()
        self.log.info(f"resumed from {self.ckpt_dir} at step {self.step}")

    def _setup_ema(self) -> None:
        """The EMA of the trainable weights (``train.ema_decay``), from the weights fine-tuning starts from."""
        train = self.cfg.train
        self.ema = None
        if not train.ema_decay:
            return
        zero3 = self.engine.zero_optimization_stage() == 3
        self.ema = FinetuneEMA(
            self.engine.module, train.ema_decay, warmup=train.ema_warmup, rank=self.rank, world=self.world, zero3=zero3
        )
        if self.resumed_tag is not None and not self.ema.load(self.resumed_tag):
            self.log.info(f"{self.resumed_tag} has no EMA: it starts from the resumed weights")

    def train_step(self) -> StepResult:
        """One optimizer step on the next global batch; every rank returns the same sums."""
        engine, dev = self.engine, self.engine.device
        t_wait = time.perf_counter()
        micro = next(self.loader)
        wait = time.perf_counter() - t_wait
        batches = [m.corrupted.to(dev) for m in micro]
        grid = tuple(batches[0].image_input.shape[1:])
        total = torch.tensor([float((b.loss_weight > 0).sum()) for b in batches], device=dev).sum()
        dist.all_reduce(total)
        # DeepSpeed averages over accumulation steps and ranks; pre-scaling by that factor over the
        # global token count makes the update that of sum(loss) / global supervised tokens
        scale = engine.gradient_accumulation_steps() * self.world / total.clamp_min(1.0)
        n_step = len(STEP_SUMS)
        sums = torch.zeros(len(LOGGED_SUMS), dtype=torch.float64, device=dev)
        for b in batches:
            loss_sum, n, metric_sums = engine(b.text_ids, b.text_pad_mask, b.image_input, b.target, b.loss_weight, b.is_flipped)
            engine.backward(loss_sum * scale)
            engine.step()
            sums[:n_step] += pack_step_sums(loss_sum, n, metric_sums).to(sums)
        if self.ema is not None:  # the micro-batches' last engine.step() was the optimizer step
            self.ema.update()
        sums[n_step:] = torch.tensor(batch_sums(micro, self.cfg.model, grid))
        dist.all_reduce(sums)
        self.step += 1
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else None
        sums = sums.cpu()
        return StepResult.from_sums(sums, all(math.isfinite(v) for v in sums.tolist()), grad_norm, grid, wait)

    def train(self) -> dict:
        """Train to ``train.steps``, saving every ``checkpoint.save_interval`` steps and at the end, then
        export; returns the per-step losses, the export path and this rank."""
        cfg = self.cfg
        window = MetricsWindow()
        while self.step < cfg.train.steps:
            r = self.train_step()
            step = self.step
            self.losses.append(float(r.sums[0] / r.sums[1].clamp_min(1.0)))
            window.add(r, cfg.data.global_batch_size, r.flops(cfg.model))
            if step % cfg.logging.log_interval == 0 or step == cfg.train.steps:
                summary = window.summary(world=self.world, peak=self.peak)
                self.log.log(step, {**summary, "lr": self.engine.get_lr()[0]})
                window = MetricsWindow()
            log_cfg = cfg.logging
            if log_cfg.sample_interval and step % log_cfg.sample_interval == 0 and log_cfg.sample_prompts:
                self._log_samples(step)
            if step % cfg.checkpoint.save_interval == 0 or step == cfg.train.steps:
                self.save()
        export = self.export() if cfg.finetune.export else None
        return {"losses": self.losses, "export": export, "rank": self.rank}

    def _log_samples(self, step: int) -> None:
        """``logging.sample_prompts`` sampled with the current weights and the checkpoint's sampler
        settings (the standalone sampler), written to ``SAVE_DIR/samples/step_N.png`` and W&B, as
        pretraining does. Under ZeRO-3 every rank gathers the weights and samples the same images
        (its forward hooks communicate, so all ranks must run them); otherwise rank 0 alone samples."""
        import deepspeed  # the train extra

        model = self.engine.module.model  # the standalone model (LoRA-wrapped with finetune.lora_rank)
        zero3 = self.engine.zero_optimization_stage() == 3
        gathered = deepspeed.zero.GatheredParameters(list(model.parameters())) if zero3 else contextlib.nullcontext()
        prompts = self.cfg.logging.sample_prompts
        with gathered:
            if zero3 or self.rank == 0:
                images = self._sample(model, prompts)
        if self.rank == 0:
            path = self.out / "samples" / f"step_{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image_grid(images, prompts).save(path)
            self.log.images(step, images, prompts)
            self.log.info(f"samples of {len(prompts)} prompts: {path}")
        dist.barrier()

    def _sample(self, model: nn.Module, prompts: list[str]) -> list:
        was_training = model.training
        dtype = next(model.parameters()).dtype  # the sampler moves nothing: the weights stay as they train
        sampler = MDMSampler(dataclasses.replace(self.pre, model=model), device=self.engine.device, dtype=dtype)
        try:
            return sampler(prompts, seed=self.pre.config.sample.seed, progress=False).images
        finally:
            model.train(was_training)

    def save(self) -> None:
        tag = f"step_{self.step:07d}"
        if self.ema is not None:  # before DeepSpeed's files and its `latest`, so a crash leaves no EMA-less "latest"
            self.ema.save(self.ckpt_dir / tag)
        self.engine.save_checkpoint(
            str(self.ckpt_dir),
            tag=tag,
            client_state={"step": self.step, "loader": self.loader.state_dict(), "losses": list(self.losses)},
        )
        keep = self.cfg.checkpoint.keep_last
        if keep > 0 and self.rank == 0:  # DeepSpeed's `latest` names the newest, which stays
            for old in sorted(self.ckpt_dir.glob("step_*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def export(self) -> Path | None:
        return export_single(
            self.engine, self.pre, self.cfg, self.out / EXPORT_DIR, self.rank, self.export_dtype, self.ema, self.log
        )


def export_single(
    engine, pre: Pretrained, cfg: Config, out: Path, rank: int, dtype: torch.dtype, ema=None, log=None
) -> Path | None:
    """Gather the full weights (ZeRO-3 partitions them) and write the single-GPU format on rank 0:
    the EMA of the trainable weights when ``ema`` is given (``config.json`` says ``weights: ema``)."""
    import deepspeed  # the train extra

    options = cfg.finetune
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        state = {}
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    state[name] = p.detach().cpu().clone()
        for name, b in module.named_buffers():
            state[name] = b.detach().cpu()
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    if ema is not None:
        averaged = ema.full_weights()
        if rank == 0:
            state.update({k: v.to(state[k].dtype) for k, v in averaged.items()})
    path = None
    if rank == 0 and options.lora_rank:
        save_lora_adapter(state, options, out.parent / "lora_adapter.safetensors")
    if rank == 0:
        weights = merged_state_dict(state, pre, options)
        path = write_single(
            out,
            ((k, v.to(dtype)) for k, v in weights.items()),
            pre.config,
            pre.groups,
            pre.image_tokenizer,
            pre.text_tokenizer,
            overwrite=True,
            weights="ema" if ema is not None else "raw",
        )
        if log is not None:
            log.info(f"exported {path}")
    dist.barrier()
    return path
