"""DeepSpeed ZeRO fine-tuning of the single-GPU format on CPU/gloo, 2 ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("deepspeed")

from megamdm.config import Config, DataConfig, DiffusionConfig
from megamdm.data.loader import TrainLoader
from megamdm.finetune import finetune, finetune_config
from megamdm.formats.single import load_single
from megamdm.objective import LossSpec, loss_parts, select_supervised

from .support.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def config(toy_dataset) -> Config:
    return Config(
        data=DataConfig(
            shards=[str(toy_dataset / "ds.zarr")], micro_batch_size=2, global_batch_size=8, num_workers=0, reader="zarr", seed=3
        ),
        diffusion=DiffusionConfig(prompt_drop=0.1),
    )


def zero3_partitioning_everything(tmp_path) -> str:
    """configs/deepspeed/zero3.json with no persistence threshold: every parameter of the tiny
    model is partitioned (with the shipped 1e5 threshold, none would be)."""
    ds = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_partition_all.json"
    path.write_text(json.dumps(ds))
    return str(path)


# the settings these tests vary, by the name of their flag, and where each lives in the config
KEYS = {
    "out": "checkpoint.save_dir",
    "steps": "train.steps",
    "precision": "train.precision",
    "ema_decay": "train.ema_decay",
    "lr": "optim.lr",
    "min_lr": "optim.min_lr",
    "warmup_steps": "optim.warmup_steps",
    "save_interval": "checkpoint.save_interval",
    "log_interval": "logging.log_interval",
}


def options(toy_dataset, out, **kw) -> Config:
    """The fine-tuning config of these tests (fine-tuning's defaults, the toy data, four fp32 steps)."""
    base = dict(
        out=str(out),
        steps=4,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=1,
        precision="fp32",
        save_interval=2,
        log_interval=1,
        deepspeed_config=str(ROOT / "configs/deepspeed/zero2.json"),
    )
    base.update(kw)
    overrides = [f"{KEYS.get(k, 'finetune.' + k)}={json.dumps(v)}" for k, v in base.items()]
    cfg = finetune_config(overrides=overrides)
    data = config(toy_dataset)
    cfg.data, cfg.diffusion = data.data, data.diffusion
    return cfg


@pytest.fixture(scope="module")
def base_ckpt(toy_dataset):
    # the toy dataset was tokenised with its own k-means tokenizer: build the checkpoint around it
    from megamdm.formats.single import save_single
    from megamdm.gce import GCEGroups
    from megamdm.models.standalone import MDMTransformer
    from megamdm.text import ByteTokenizer
    from megamdm.vq import KMeansPatchTokenizer

    from .support.checkpoints import tiny_config

    cfg = tiny_config(64)
    cfg.text.max_len = 24
    torch.manual_seed(5)
    return save_single(
        toy_dataset / "ft_base",
        MDMTransformer(cfg.model),
        cfg,
        GCEGroups.load(toy_dataset / "groups.safetensors"),
        KMeansPatchTokenizer.load(toy_dataset / "tok"),
        ByteTokenizer(),
    )


def _finetune(ckpt, cfg):
    return finetune(ckpt, cfg)


def fixed_batch_loss(ckpt, cfg) -> float:
    """The objective of a checkpoint on one fixed global batch (deterministic)."""
    pre = load_single(ckpt)
    cfg.model, cfg.text = pre.config.model, pre.config.text
    loader = TrainLoader(cfg, pre.groups, pre.text_tokenizer)
    total, n = 0.0, 0
    with torch.no_grad():
        for _ in range(3):
            for m in next(loader):
                c = m.corrupted
                hs, ts, ws, fl = select_supervised(
                    pre.model(c.text_ids, c.text_pad_mask, c.image_input), c.target, c.loss_weight, c.is_flipped
                )
                p = loss_parts(pre.model.head(hs, ts, ws, group_sizes=[8], group_weights=[0.2]), fl, LossSpec([8], [0.2]))
                total, n = total + p.loss_sum.item(), n + int(p.num_tokens)
    return total / n


def plain_losses(ckpt, cfg, steps, lr, lr_fn):
    """The same steps without DeepSpeed: one process, torch AdamW, the whole global batch."""
    pre = load_single(ckpt)
    cfg.model, cfg.text = pre.config.model, pre.config.text
    model = pre.model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    loader = TrainLoader(cfg, pre.groups, pre.text_tokenizer)
    spec = LossSpec([8], [0.2])
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_fn(step)
        total = 0.0
        opt.zero_grad()
        micro = next(loader)
        tokens = sum(int((m.corrupted.loss_weight > 0).sum()) for m in micro)
        for m in micro:
            c = m.corrupted
            hs, ts, ws, fl = select_supervised(
                model(c.text_ids, c.text_pad_mask, c.image_input), c.target, c.loss_weight, c.is_flipped
            )
            p = loss_parts(model.head(hs, ts, ws, group_sizes=[8], group_weights=[0.2]), fl, spec)
            (p.loss_sum / tokens).backward()
            total += p.loss_sum.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(total / tokens)
    return losses


@pytest.mark.parametrize("stage,recompute", [(2, True), (3, False), (3, True)])
def test_zero_matches_the_plain_run_and_learns(toy_dataset, base_ckpt, tmp_path, stage, recompute):
    ds = zero3_partitioning_everything(tmp_path) if stage == 3 else str(ROOT / "configs/deepspeed/zero2.json")
    cfg = options(
        toy_dataset,
        tmp_path / "ft",
        deepspeed_config=ds,
        steps=8,
        lr=1e-2,
        min_lr=1e-3,
        save_interval=100,
        gradient_checkpointing=recompute,
    )
    res = run_distributed(_finetune, 2, base_ckpt, cfg)
    losses = res[0]["losses"]
    assert res[1]["losses"] == losses

    # the learning rate DeepSpeed's WarmupCosineLR gives at each step
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    sched_lrs = []
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sch = WarmupCosineLR(dummy, total_num_steps=8, warmup_num_steps=1, cos_min_ratio=0.1)
    for _ in range(8):
        sched_lrs.append(dummy.param_groups[0]["lr"])
        dummy.step()
        sch.step()
    ref = plain_losses(base_ckpt, config(toy_dataset), 8, 1e-2, lambda s: sched_lrs[s])
    for a, b in zip(losses, ref):
        assert abs(a - b) / b < 1e-4, (losses, ref)
    export = res[0]["export"]
    assert export is not None and (export / "model.safetensors").is_file()
    before, after = fixed_batch_loss(base_ckpt, config(toy_dataset)), fixed_batch_loss(export, config(toy_dataset))
    assert after < 0.97 * before, (before, after)  # it learned: the same batches score better
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/sample.py"),
            "--checkpoint",
            str(export),
            "--prompt",
            "pattern 3",
            "--out",
            str(tmp_path / "samples"),
            "--steps",
            "3",
            "--height",
            "32",
            "--width",
            "32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "samples" / "00000_00.png").is_file()


def test_resumed_run_continues_the_same_trajectory(toy_dataset, base_ckpt, tmp_path):
    """Losses and the EMA (saved per rank beside DeepSpeed's files) follow the uninterrupted run."""
    from safetensors.torch import load_file

    straight = run_distributed(_finetune, 2, base_ckpt, options(toy_dataset, tmp_path / "a", ema_decay=0.8))[0]["losses"]
    run_distributed(_finetune, 2, base_ckpt, options(toy_dataset, tmp_path / "b", steps=2, export=False, ema_decay=0.8))
    resumed = run_distributed(_finetune, 2, base_ckpt, options(toy_dataset, tmp_path / "b", ema_decay=0.8))[0]["losses"]
    assert len(resumed) == 4
    for a, b in zip(resumed, straight):
        assert abs(a - b) / b < 1e-6, (resumed, straight)
    a, b = (load_file(tmp_path / d / "single/model.safetensors") for d in ("a", "b"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("stage", [2, 3])
def test_ema_is_sharded_over_the_ranks_and_exported(toy_dataset, base_ckpt, tmp_path, stage):
    """The exported weights are the EMA of the per-step weights DeepSpeed saved (ZeRO-2: each rank
    averages half the parameters; ZeRO-3: each its partitions), not the last step's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from megamdm.training.ema import decay_at

    ds = zero3_partitioning_everything(tmp_path) if stage == 3 else str(ROOT / "configs/deepspeed/zero2.json")
    out = tmp_path / "ema"
    run_distributed(_finetune, 2, base_ckpt, options(toy_dataset, out, save_interval=1, ema_decay=0.8, deepspeed_config=ds))
    ref = {k: v.float() for k, v in load_file(base_ckpt / "model.safetensors").items()}
    for k in range(1, 5):
        w = get_fp32_state_dict_from_zero_checkpoint(str(out / "deepspeed"), tag=f"step_{k:07d}")
        d = decay_at(0.8, True, k - 1)
        ref = {n: d * v + (1 - d) * w["model." + n].float() for n, v in ref.items()}
    got = load_file(out / "single/model.safetensors")
    for n in ref:
        assert torch.allclose(got[n].float(), ref[n], rtol=1e-5, atol=1e-6), n
    assert max((got[n].float() - w["model." + n].float()).abs().max().item() for n in ref) > 1e-4
    assert json.loads((out / "single/config.json").read_text())["weights"] == "ema"
    shares = [sum(t.numel() for t in load_file(f).values()) for f in sorted((out / "deepspeed/step_0000004").glob("ema_rank*"))]
    total = sum(v.numel() for v in ref.values())
    assert len(shares) == 2 and sum(shares) >= total and max(shares) < 0.8 * total


def test_lora_trains_adapters_only_and_exports_merged(toy_dataset, base_ckpt, tmp_path):
    pytest.importorskip("peft")
    # ZeRO-3 + recompute + frozen base weights: the combination DeepSpeed issue #4332 breaks
    cfg = options(
        toy_dataset,
        tmp_path / "lora",
        lora_rank=4,
        lora_alpha=8.0,
        lr=1e-2,
        steps=4,
        gradient_checkpointing=True,
        deepspeed_config=zero3_partitioning_everything(tmp_path),
    )
    res = run_distributed(_finetune, 2, base_ckpt, cfg)
    export = res[0]["export"]
    before, after = load_single(base_ckpt).model.state_dict(), load_single(export).model.state_dict()
    assert set(before) == set(after)  # merged: plain single-GPU weights, no adapter tensors
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(t in k for t in ("_proj",)) for k in changed)  # only the targeted projections
    assert torch.equal(before["head.weight"], after["head.weight"])
    # the adapter file alone, merged into the base weights, gives the exported model
    from megamdm.finetune import apply_lora_adapter

    adapter = tmp_path / "lora" / "lora_adapter.safetensors"
    merged = apply_lora_adapter(load_single(base_ckpt).model.float(), adapter).state_dict()
    for k in changed:
        assert torch.allclose(merged[k], after[k].float(), atol=1e-6), k


def test_the_command_fine_tunes_in_one_process_from_its_flags(toy_dataset, base_ckpt, tmp_path):
    """megamdm-finetune as a user runs it, from any folder: flags for the shared settings, the log line
    of pretraining, checkpoint.keep_last honoured, the export written."""
    out = tmp_path / "cli"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/finetune.py"),
            "--checkpoint",
            str(base_ckpt),
            "--out",
            str(out),
            "--steps",
            "3",
            "--precision",
            "fp32",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "1",
            "--save-interval",
            "1",
            "--keep-last",
            "1",
            "--log-interval",
            "1",
            f"data.shards=[{toy_dataset / 'ds.zarr'}]",
            "data.micro_batch_size=2",
            "data.global_batch_size=4",
            "data.num_workers=0",
            "data.reader=zarr",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MASTER_PORT": "29531"},
        cwd=tmp_path,  # outside the repository: the default DeepSpeed config is the shipped one
    )
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [line for line in r.stdout.splitlines() if "samples_per_s" in line and "tokens_per_s" in line]
    assert len(steps) == 3 and "step      3/3 | loss" in steps[-1], r.stdout
    assert sorted(p.name for p in (out / "deepspeed").glob("step_*")) == ["step_0000003"]
    assert (out / "single" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_sample_grids_during_fine_tuning_as_during_pretraining(toy_dataset, base_ckpt, tmp_path, stage):
    """logging.sample_interval: the fixed prompts sampled with the current weights (ZeRO-3 gathers them),
    and training goes on exactly as without: the same losses."""
    ds = zero3_partitioning_everything(tmp_path) if stage == 3 else str(ROOT / "configs/deepspeed/zero2.json")
    plain = run_distributed(_finetune, 2, base_ckpt, options(toy_dataset, tmp_path / "a", deepspeed_config=ds))
    cfg = options(toy_dataset, tmp_path / "b", deepspeed_config=ds)
    cfg.logging.sample_interval, cfg.logging.sample_prompts = 2, ["pattern 1", "pattern 2"]
    sampled = run_distributed(_finetune, 2, base_ckpt, cfg)
    assert sampled[0]["losses"] == plain[0]["losses"]
    grids = sorted(p.name for p in (tmp_path / "b/samples").glob("*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png"]
    first, last = (Image.open(tmp_path / "b/samples" / g) for g in grids)
    assert first.width > 2 * 32 and first.tobytes() != last.tobytes()  # two tiles, and the weights moved
