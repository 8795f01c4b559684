"""Fine-tuning a single-GPU-format checkpoint with DeepSpeed ZeRO (no Megatron needed).

The standalone model trains on zarr token shards through the same loader, corruption and GCE +
flip objective as pretraining. ZeRO stage 2 or 3 (optionally offloading optimizer state to CPU)
comes from a DeepSpeed JSON in ``configs/deepspeed/``; batch sizes, learning rate and precision are
filled in from the megamdm config so the two cannot disagree. LoRA (``peft``) can adapt the attention
and MLP projections instead of all weights. The result is written back in the single-GPU format
(LoRA merged), so ``tools/sample.py`` uses it unchanged.

Loss normalisation matches pretraining: the sum of per-token losses over the *global* batch divided
by its number of supervised tokens, so ZeRO at any data-parallel size follows the plain run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import LORA_TARGETS, Config, FinetuneConfig
from .objective import LossSpec, loss_parts, reduce_metrics, select_supervised
from .pretrained import Pretrained, load_single, write_single


class TrainStep(nn.Module):
    """Model + objective in one ``forward``, so ZeRO-3 gathers every weight it touches (the GCE
    head's weight through ``head.forward``)."""

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
        return parts.loss_sum, parts.num_tokens, parts.metrics


def add_lora(model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS):
    """Wrap the targeted projections with LoRA adapters (peft); only adapters train."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    return LoraModel(model, cfg, "default")


def merged_state_dict(state: dict, pretrained: Pretrained, opts: FinetuneConfig) -> dict:
    """Plain model weights from a full (possibly LoRA-wrapped) state dict, LoRA merged in."""
    if not opts.lora_rank:
        return {k[len("model.") :] if k.startswith("model.") else k: v for k, v in state.items()}
    from .models.standalone import MDMTransformer

    base = MDMTransformer(pretrained.config.model)
    lora = add_lora(base, opts.lora_rank, opts.lora_alpha, opts.lora_targets)
    prefix = "model."
    lora.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return {k: v.detach() for k, v in lora.merge_and_unload().state_dict().items()}


def save_lora_adapter(state: dict, opts: FinetuneConfig, path: Path) -> Path:
    """The LoRA weights alone (safetensors, with rank/alpha/targets in the metadata): a few MB to
    share instead of the merged model; :func:`apply_lora_adapter` merges them into a base model."""
    from safetensors.torch import save_file

    lora = {k[len("model.") :]: v.contiguous() for k, v in state.items() if "lora_" in k}
    meta = {"rank": str(opts.lora_rank), "alpha": str(opts.lora_alpha), "targets": ",".join(opts.lora_targets)}
    save_file(lora, str(path), metadata=meta)
    return path


def apply_lora_adapter(model: nn.Module, path) -> nn.Module:
    """``model`` (standalone, base weights) with a saved adapter merged in."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    wrapped = add_lora(model, int(meta["rank"]), float(meta["alpha"]), tuple(meta["targets"].split(",")))
    missing = set(weights) - set(wrapped.state_dict())
    if missing:
        raise ValueError(f"{path}: adapter tensors {sorted(missing)[:3]} do not match this model")
    wrapped.load_state_dict(weights, strict=False)
    return wrapped.merge_and_unload()


def deepspeed_config(opts: FinetuneConfig, cfg: Config, world: int) -> dict:
    path = Path(opts.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    ds = json.loads(path.read_text())
    d = cfg.data
    if d.global_batch_size % (world * d.micro_batch_size):
        raise ValueError(
            f"data.global_batch_size={d.global_batch_size} is not a multiple of "
            f"{world} ranks x micro_batch_size {d.micro_batch_size}"
        )
    ds["train_micro_batch_size_per_gpu"] = d.micro_batch_size
    ds["gradient_accumulation_steps"] = d.global_batch_size // (world * d.micro_batch_size)
    ds["train_batch_size"] = d.global_batch_size
    ds["gradient_clipping"] = opts.clip_grad
    ds["bf16"] = {"enabled": opts.precision == "bf16"}
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    ds["optimizer"]["params"].update(
        lr=opts.lr, weight_decay=opts.weight_decay, betas=[cfg.optim.adam_beta1, cfg.optim.adam_beta2]
    )
    if not torch.cuda.is_available():  # DeepSpeed's fused Adam needs CUDA; torch's AdamW is exact on CPU
        ds["optimizer"]["params"]["torch_adam"] = True
    ds["scheduler"] = {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": max(opts.steps, 1),
            # DeepSpeed refuses 0 warmup steps: one step that starts at the full rate is none
            "warmup_num_steps": max(opts.warmup_steps, 1),
            "warmup_min_ratio": 0.0 if opts.warmup_steps > 0 else 1.0,
            "cos_min_ratio": opts.min_lr / opts.lr,
        },
    }
    if opts.offload_optimizer:
        ds.setdefault("zero_optimization", {})["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds["steps_per_print"] = 10**9  # megamdm logs itself
    return ds


def _init_distributed(device: str) -> tuple[int, int]:
    import deepspeed

    for k, v in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29517"),
    ):
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def finetune(checkpoint, cfg: Config, opts: FinetuneConfig | None = None) -> dict:
    """Run fine-tuning (``opts``: ``cfg.finetune`` unless given); returns per-step losses (identical on
    every rank, including those of the run this one resumed) and the export path."""
    import contextlib

    opts = opts or cfg.finetune
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with contextlib.ExitStack() as stack:
        if device == "cpu":
            from .compat.deepspeed_cpu import no_shm_comm

            stack.enter_context(no_shm_comm())
        return _finetune(checkpoint, cfg, opts, device)


def _finetune(checkpoint, cfg: Config, opts: FinetuneConfig, device: str) -> dict:
    import deepspeed

    from .data.loader import TrainLoader
    from .vq import codebook_hash

    rank, world = _init_distributed(device)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    torch.manual_seed(opts.seed)
    pre = load_single(checkpoint)
    cfg.model, cfg.text = pre.config.model, pre.config.text
    groups = pre.groups.with_weights(cfg.gce.group_weights)
    spec = LossSpec(
        list(groups.group_sizes),
        list(cfg.gce.group_weights),
        impl=cfg.gce.impl,
        z_loss_weight=cfg.gce.z_loss_weight,
        grad_filter=cfg.gce.grad_filter,
    )
    loader = TrainLoader(
        cfg,
        groups,
        pre.text_tokenizer,
        dp_rank=rank,
        dp_size=world,
        codebook_hash=codebook_hash(pre.image_tokenizer.codebook()),
    )
    export_dtype = next(pre.model.parameters()).dtype
    model = pre.model.float().train()
    model.gradient_checkpointing = opts.gradient_checkpointing
    if opts.lora_rank:
        model = add_lora(model, opts.lora_rank, opts.lora_alpha, opts.lora_targets)
    step_module = TrainStep(model, spec)
    params = [p for p in step_module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=step_module, model_parameters=params, config=deepspeed_config(opts, cfg, world)
    )
    out = Path(opts.out)
    ckpt_dir = out / "deepspeed"
    start, losses = 0, []
    resumed = (ckpt_dir / "latest").is_file()
    if resumed:
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start = int(client["step"])
        loader.load_state_dict(client["loader"])
        losses = list(client.get("losses", []))
        if rank == 0:
            print(f"resumed from {ckpt_dir} at step {start}", flush=True)
    ema = None
    if opts.ema_decay:  # from the weights fine-tuning starts from
        from .finetune_ema import FinetuneEMA

        zero3 = engine.zero_optimization_stage() == 3
        ema = FinetuneEMA(engine.module, opts.ema_decay, warmup=opts.ema_warmup, rank=rank, world=world, zero3=zero3)
        tag_dir = ckpt_dir / (ckpt_dir / "latest").read_text().strip() if resumed else None
        if tag_dir is not None and not ema.load(tag_dir) and rank == 0:
            print(f"{tag_dir} has no EMA: it starts from the resumed weights", flush=True)
    dev = engine.device
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3 leaves numel() == 0
    if rank == 0:
        print(
            f"megamdm finetune: {world} ranks, ZeRO stage {engine.zero_optimization_stage()}, {device}, "
            f"{opts.precision}, {n_trainable / 1e6:.2f}M trainable parameters"
            + (f" (LoRA r={opts.lora_rank})" if opts.lora_rank else ""),
            flush=True,
        )
    t0 = time.perf_counter()
    for step in range(start, opts.steps):
        micro = next(loader)
        batches = [m.corrupted.to(dev) for m in micro]
        local = torch.tensor([float((b.loss_weight > 0).sum()) for b in batches], device=dev).sum()
        total = local.clone()
        dist.all_reduce(total)
        # DeepSpeed averages over accumulation steps and ranks; pre-scaling by that factor over the
        # global token count makes the update that of sum(loss) / global supervised tokens
        scale = engine.gradient_accumulation_steps() * world / total.clamp_min(1.0)
        sums = {"loss": torch.zeros((), device=dev)}
        for b in batches:
            loss_sum, _, metrics = engine(b.text_ids, b.text_pad_mask, b.image_input, b.target, b.loss_weight, b.is_flipped)
            engine.backward(loss_sum * scale)
            engine.step()
            sums["loss"] += loss_sum.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, torch.zeros((), device=dev)) + v
        if ema is not None:  # the micro-batches' last engine.step() was the optimizer step
            ema.update()
        stacked = torch.stack([sums[k].float() for k in sorted(sums)])
        dist.all_reduce(stacked)
        agg = dict(zip(sorted(sums), stacked.tolist()))
        loss = agg["loss"] / max(total.item(), 1.0)
        losses.append(loss)
        if rank == 0 and ((step + 1) % opts.log_interval == 0 or step + 1 == opts.steps):
            dt = time.perf_counter() - t0
            m = reduce_metrics(agg)
            print(
                f"step {step + 1:>6d}/{opts.steps} | loss {loss:.4f} | ce {m.get('ce', float('nan')):.4f} | "
                f"edit {m.get('edit', float('nan')):.4f} | lr {engine.get_lr()[0]:.3e} | "
                f"{cfg.data.global_batch_size * opts.log_interval / dt:.1f} samples/s",
                flush=True,
            )
            t0 = time.perf_counter()
        if (step + 1) % opts.save_interval == 0 or step + 1 == opts.steps:
            tag = f"step_{step + 1:07d}"
            if ema is not None:  # before DeepSpeed's files and its `latest`, so a crash leaves no EMA-less "latest"
                ema.save(ckpt_dir / tag)
            engine.save_checkpoint(
                str(ckpt_dir),
                tag=tag,
                client_state={"step": step + 1, "loader": loader.state_dict(), "losses": list(losses)},
            )
    export = None
    if opts.export:
        export = export_single(engine, pre, opts, out / "single", rank, export_dtype, ema)
    return {"losses": losses, "export": export, "rank": rank}


def export_single(
    engine, pre: Pretrained, opts: FinetuneConfig, out: Path, rank: int, dtype: torch.dtype, ema=None
) -> Path | None:
    """Gather the full weights (ZeRO-3 partitions them) and write the single-GPU format on rank 0:
    the EMA of the trainable weights when ``ema`` is given (``config.json`` says ``weights: ema``)."""
    import deepspeed

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
    if rank == 0 and opts.lora_rank:
        save_lora_adapter(state, opts, out.parent / "lora_adapter.safetensors")
    if rank == 0:
        weights = merged_state_dict(state, pre, opts)
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
        print(f"exported {path}", flush=True)
    dist.barrier()
    return path
