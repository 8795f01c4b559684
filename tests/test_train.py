"""The megatron-core training loop on CPU/gloo: layouts agree, resume is exact, NaNs are skipped."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from megamdm.config import load_config
from megamdm.gce import GCEGroups

from .support.distributed import free_port, run_distributed

ROOT = Path(__file__).resolve().parents[1]


def overrides(root, **extra):
    base = {
        "model.image_vocab_size": 64,
        "model.num_layers": 2,
        "model.hidden_size": 64,
        "model.head_dim": 16,
        "model.ffn_hidden_size": 128,
        "data.shards": f"[{root}/ds.zarr]",
        "data.micro_batch_size": 2,
        "data.global_batch_size": 8,
        "data.num_workers": 0,
        "data.reader": "zarr",
        "gce.groups_file": f"{root}/groups.safetensors",
        "image_tokenizer.path": f"{root}/tok",
        "train.device": "cpu",
        "train.steps": 4,
        "logging.log_interval": 1,
        "train.precision": "fp32",
        "text.max_len": 24,
        "optim.warmup_steps": 1,
        "optim.lr": 2e-3,
        "parallel.use_distributed_optimizer": False,
        "checkpoint.save_interval": 1000,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(ov, patch_nan_calls=()):
    from megamdm.training.trainer import pretrain

    if patch_nan_calls:
        from megamdm.models.mcore.model import MDMModel

        original = MDMModel.forward
        calls = {"n": 0}

        def forward(self, *a, **kw):
            out = original(self, *a, **kw)
            calls["n"] += 1
            if calls["n"] in patch_nan_calls and isinstance(out, tuple):
                return (out[0] * float("nan"), *out[1:])
            return out

        MDMModel.forward = forward
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ov)
    return pretrain(cfg)


def train(world, ov, **kw):
    res = run_distributed(_train, world, ov, **kw)
    return next(r for r in res if r["logger"])


@pytest.fixture(scope="module")
def init_ckpt(toy_dataset):
    """Every layout starts from these weights (under PP, fresh initialisation differs by stage)."""
    from megamdm.convert import from_single

    from .support.checkpoints import make_tiny_checkpoint

    single = make_tiny_checkpoint(toy_dataset / "single", seed=4)
    run_distributed(from_single, 1, single, toy_dataset / "init")
    return toy_dataset / "init"


@pytest.fixture(scope="module")
def reference(toy_dataset, init_ckpt):
    return train(1, overrides(toy_dataset, **{"checkpoint.init_from": init_ckpt}))


@pytest.mark.parametrize(
    "layout",
    [
        {"parallel.tensor_parallel": 2},
        {"parallel.pipeline_parallel": 2},
        {"parallel.tensor_parallel": 2, "parallel.sequence_parallel": True},
        {"parallel.use_distributed_optimizer": True},  # DP 2 with the distributed optimizer
    ],
)
def test_layouts_follow_the_single_process_trajectory(toy_dataset, init_ckpt, reference, layout):
    got = train(2, overrides(toy_dataset, **{"checkpoint.init_from": init_ckpt, **layout}))
    ref = reference["losses"]
    assert len(got["losses"]) == len(ref) == 4
    assert ref[-1] < ref[0]  # it learns
    for a, b in zip(got["losses"], ref):
        assert abs(a - b) / b < 2e-5, (got["losses"], ref)


def test_resume_at_another_tensor_parallel_size(toy_dataset, init_ckpt, reference, tmp_path):
    """The run's last save is fully reshardable (checkpoint.reshardable=final); a periodic save is not,
    and resuming that one at another TP is refused in one line."""
    run = tmp_path / "run"
    first = train(
        1,
        overrides(
            toy_dataset,
            **{
                "checkpoint.save_dir": run,
                "checkpoint.save_interval": 1,
                "checkpoint.reshardable": "final",
                "train.exit_after_steps": 2,
                "parallel.use_distributed_optimizer": True,
                "checkpoint.init_from": init_ckpt,
            },
        ),
    )
    assert len(first["losses"]) == 2 and (run / "iter_0000002").is_dir()
    tp2 = {"parallel.tensor_parallel": 2, "parallel.use_distributed_optimizer": True}
    with pytest.raises(RuntimeError, match=r"CheckpointError: .*dp_reshardable .*resumes only at TP 1 PP 1 \(any DP\)"):
        train(2, overrides(toy_dataset, **{"checkpoint.resume": run / "iter_0000001", **tp2}))
    rest = train(
        2,
        overrides(
            toy_dataset,
            **{"checkpoint.save_dir": run, **tp2},
        ),
    )
    assert rest["step"] == 4
    for a, b in zip(first["losses"] + rest["losses"], reference["losses"]):
        assert abs(a - b) / b < 2e-5, (first["losses"] + rest["losses"], reference["losses"])


def test_resume_onto_another_model_is_refused_in_one_line(toy_dataset, tmp_path):
    """A shape-compatible change (RoPE base) would resume silently onto another model; a shape change
    ended in each rank's traceback. Both stop before any tensor is loaded, naming the keys."""
    run = tmp_path / "run"
    common = {"checkpoint.save_dir": run, "train.steps": 2}
    train(1, overrides(toy_dataset, **{**common, "train.exit_after_steps": 1}))
    for change, key in (
        ({"model.rope_theta": 500.0}, "model.rope_theta: 10000.0 -> 500.0"),
        ({"model.ffn_hidden_size": 96}, "model.ffn_hidden_size: 128 -> 96"),
    ):
        with pytest.raises(RuntimeError, match=f"CheckpointError: .*checkpoint of another model \\({re.escape(key)}"):
            train(1, overrides(toy_dataset, **{**common, **change}))
    done = train(1, overrides(toy_dataset, **{**common, "model.rope_theta": 500.0, "checkpoint.resume_changed_model": True}))
    assert done["step"] == 2  # an intended change, asked for explicitly


def test_resume_from_a_damaged_checkpoint_is_one_line(toy_dataset, tmp_path):
    run = tmp_path / "run"
    common = {"checkpoint.save_dir": run, "train.steps": 2}
    train(1, overrides(toy_dataset, **{**common, "train.exit_after_steps": 1}))
    for shard in (run / "iter_0000001").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"CheckpointError: .*iter_0000001: cannot be read .*resume from an earlier"):
        train(1, overrides(toy_dataset, **common))


def test_dp_reshardable_checkpoint_resumes_at_another_data_parallel_size(toy_dataset, init_ckpt, reference, tmp_path):
    """Periodic saves write each rank's optimizer shard as it is (dp_reshardable, spread over the DP
    ranks): saved at DP 2, resumed at DP 1, the run follows the uninterrupted one."""
    run = tmp_path / "run"
    common = {"checkpoint.save_dir": run, "parallel.use_distributed_optimizer": True}
    first = train(2, overrides(toy_dataset, **{**common, "train.exit_after_steps": 2, "checkpoint.init_from": init_ckpt}))
    rest = train(1, overrides(toy_dataset, **common))
    assert rest["step"] == 4
    for a, b in zip(first["losses"] + rest["losses"], reference["losses"]):
        assert abs(a - b) / b < 2e-5, (first["losses"] + rest["losses"], reference["losses"])


def test_injected_nan_is_skipped_and_counted(toy_dataset, init_ckpt, reference):
    # one of step 2's four micro-batches (forward calls 5-8) returns a NaN loss
    got = train(1, overrides(toy_dataset, **{"checkpoint.init_from": init_ckpt}), patch_nan_calls=(6,))
    assert got["skipped"] == 1
    assert np.isnan(got["losses"][1])
    assert got["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-6)
    # the skipped step changed nothing: step 3 sees the weights after step 1, a finite loss
    assert all(np.isfinite(x) for x in got["losses"][2:])


def test_wandb_offline_writes_a_run_directory(toy_dataset, tmp_path):
    pytest.importorskip("wandb")
    train(1, overrides(toy_dataset, **{"train.steps": 2, "logging.wandb_mode": "offline", "logging.wandb_dir": tmp_path}))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_init_from_single_gpu_checkpoint(toy_dataset, tmp_path):
    """Starting from a single-GPU checkpoint at TP=2: the first loss equals the standalone model's."""
    from megamdm.data.loader import TrainLoader
    from megamdm.formats.single import load_single
    from megamdm.objective import LossSpec, loss_parts, select_supervised

    from .support.checkpoints import make_tiny_checkpoint

    single = make_tiny_checkpoint(tmp_path / "single", seed=4)
    ov = overrides(
        toy_dataset,
        **{
            "checkpoint.init_from": single,
            "checkpoint.save_dir": tmp_path / "run",
            "train.steps": 1,
            "parallel.tensor_parallel": 2,
        },
    )
    got = train(2, ov)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ov)
    groups = GCEGroups.load(cfg.gce.groups_file)
    from megamdm.text import ByteTokenizer

    loader = TrainLoader(cfg, groups, ByteTokenizer())
    m = load_single(single).model
    total, n = 0.0, 0
    with torch.no_grad():
        for mb in next(loader):
            c = mb.corrupted
            hs, ts, ws, fl = select_supervised(
                m(c.text_ids, c.text_pad_mask, c.image_input), c.target, c.loss_weight, c.is_flipped
            )
            p = loss_parts(m.head(hs, ts, ws, group_sizes=[8], group_weights=[0.2]), fl, LossSpec([8], [0.2]))
            total, n = total + p.loss_sum.item(), n + int(p.num_tokens)
    assert got["losses"][0] == pytest.approx(total / n, rel=1e-5)


def _logged_losses(text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step\s+(\d+)/\d+ \| loss ([0-9.]+)", text)}


@pytest.mark.slow
def _logged_valid(text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step\s+(\d+)/\d+ valid gce ([0-9.]+)", text)}


def test_sigkill_then_resume_follows_the_uninterrupted_run(toy_dataset, tmp_path):
    """The real entry point under torchrun (DP 2, precision auto as in the demo, distributed optimizer, EMA and
    validation on): SIGKILL the job after a checkpoint, resume it; losses, held-out losses and EMA follow."""
    steps = 16
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("_base_: [" + str(ROOT / "configs/model/tiny.yaml") + "]\n")

    def launch(run_dir, **extra):
        ov = overrides(
            toy_dataset,
            **{
                "train.steps": steps,
                "checkpoint.save_interval": 2,
                "checkpoint.save_dir": run_dir,
                "data.micro_batch_size": 4,
                "train.precision": "auto",
                "parallel.use_distributed_optimizer": True,
                "train.ema_decay": 0.9,
                "train.eval_interval": 4,
                "data.valid_shards": f"[{toy_dataset}/ds.zarr]",
                "data.valid_samples": 16,
                **extra,
            },
        )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "megamdm.train",
            "--config",
            str(cfg_file),
            *ov,
        ]
        return subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    straight = launch(tmp_path / "straight")
    ref_out = straight.communicate(timeout=300)[0]
    ref, ref_valid = _logged_losses(ref_out), _logged_valid(ref_out)
    assert sorted(ref) == list(range(1, steps + 1)) and sorted(ref_valid) == [4, 8, 12, 16]
    run = tmp_path / "killed"
    p = launch(run)
    deadline = time.time() + 240
    while not (run / "latest_checkpointed_iteration.txt").exists():
        assert p.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.01)
    # SIGKILL the launcher and every rank at once, as a node failure would (torchrun's workers run in
    # process groups of their own, so the tree is collected first)
    import psutil

    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    before = _logged_losses(p.communicate()[0])
    saved = int((run / "latest_checkpointed_iteration.txt").read_text())
    assert saved < steps and max(before, default=0) < steps, "the kill came too late to test anything"
    resumed = launch(run)
    out = resumed.communicate(timeout=300)[0]
    after = _logged_losses(out)
    assert resumed.returncode == 0, out[-2000:]
    assert sorted(after) == list(range(saved + 1, steps + 1)), out[-2000:]
    for s, loss in after.items():
        assert loss == pytest.approx(ref[s], rel=1e-4), (s, loss, ref[s])
    for s, loss in _logged_valid(out).items():
        assert loss == pytest.approx(ref_valid[s], rel=1e-4), (s, loss, ref_valid[s])
    from safetensors.torch import load_file

    from megamdm.convert import to_single

    ema = [
        load_file(to_single(d, tmp_path / f"{d.name}_ema", weights="ema") / "model.safetensors")
        for d in (run, tmp_path / "straight")
    ]
    raw = load_file(to_single(run, tmp_path / "raw", weights="raw") / "model.safetensors")
    for k in ema[1]:
        assert torch.allclose(ema[0][k].float(), ema[1][k].float(), rtol=1e-3, atol=1e-5), k
    # not the last weights (an EMA export of the raw weights differs by 0); 3e-4 on an AVX2 CPU in fp32, more in bf16
    assert max((ema[1][k].float() - raw[k].float()).abs().max().item() for k in raw) > 1e-5


def _drive_train_steps(ov):
    """Drive ``Trainer.train_step`` by hand; report what a step and the window counted."""
    import torch

    from megamdm.compat.megatron_cpu import active
    from megamdm.objective import unpack_sums
    from megamdm.text import format_prompt
    from megamdm.training.flops import head_flops, train_flops
    from megamdm.training.trainer import MetricsWindow, Trainer

    cfg = load_config(ROOT / "configs/model/tiny.yaml", ov)
    with Trainer(cfg) as tr:
        inside = active()
        window = MetricsWindow()
        steps = []
        for _ in range(2):
            r = tr.train_step()
            s = unpack_sums(r.sums)
            # every toy caption is "pattern k" at 32x32: its prompt has the same real length, cut to max_len
            real = min(len(format_prompt("pattern 3", width=32, height=32, score=6.0)), cfg.text.max_len)
            flops = tr.cfg.data.global_batch_size * train_flops(cfg.model, real, *r.grid, 0.0) + (
                6.0 * s["n_tokens"] * cfg.model.hidden_size * cfg.model.image_vocab_size
            )
            window.add(r, tr.cfg.data.global_batch_size, flops)
            logged = r.body_flops + head_flops(cfg.model, s["n_tokens"])
            steps.append({"sums": s, "grid": r.grid, "finite": r.finite, "flops": flops, "logged_flops": logged})
        summary = window.summary(world=tr.world, peak=0.0)
        step = tr.step
    return {
        "inside": inside,
        "after": active(),
        "step": step,
        "steps": steps,
        "summary": summary,
        "window_tokens": window.tokens,
        "window_samples": window.samples,
        "rank": torch.distributed.get_rank(),
    }


@pytest.mark.parametrize("padded", [False, True])
def test_train_step_can_be_driven_and_the_window_counts_what_happened(toy_dataset, padded):
    """Two hand-driven steps at DP 2: every rank sees the global sums, the window's loss is the token-
    weighted mean of the steps, the FLOPs count each prompt's real tokens (``padded``: prompts of 46
    bytes padded to 64, dropped ones of their own length), and leaving the Trainer leaves megatron-on-CPU."""
    extra = {"text.max_len": 64, "text.drop_len": -1, "data.trim_text": False} if padded else {}
    res = run_distributed(_drive_train_steps, 2, overrides(toy_dataset, **extra))
    a, b = res
    assert a["steps"] == b["steps"]  # the global batch's sums, on every rank
    r = a
    assert r["inside"] and not r["after"] and r["step"] == 2
    sums = [s["sums"] for s in r["steps"]]
    assert all(s["finite"] for s in r["steps"]) and all(x["n_tokens"] > 0 for x in sums)
    expect_loss = sum(x["loss_sum"] for x in sums) / sum(x["n_tokens"] for x in sums)
    assert r["summary"]["loss"] == pytest.approx(expect_loss)
    assert r["summary"]["ce"] == pytest.approx(sum(x["ce_sum"] for x in sums) / sum(x["n_masked"] for x in sums))
    h, w = r["steps"][0]["grid"]
    assert r["window_samples"] == 16 and r["window_tokens"] == 16 * h * w  # 2 steps x global batch 8
    assert all(x["logged_flops"] == pytest.approx(x["flops"]) for x in r["steps"])  # what the log counts
    assert r["summary"]["tflops_per_gpu"] > 0
    # "pattern 3 | size 32x32 | crop 0,0 | score 6.0" is longer than text.max_len 24: all 16 are cut
    # and counted over both data-parallel ranks
    assert r["summary"]["prompts_cut"] == (None if padded else 16)


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"data.global_batch_size": 7},
            "data.global_batch_size=7 is not a multiple of data-parallel size 1 x micro_batch_size 2",
        ),
        ({"data.shards": "[/nonexistent/ds.zarr]"}, "/nonexistent/ds.zarr: not a zarr token-shard dataset (no zarr.json)"),
        ({"data.resolutions": "[64x64]"}, "data.resolutions ['64x64'] are not in the datasets (have ['32x32'])"),
        (
            {"parallel.tensor_parallel": 3},
            "parallel.tensor_parallel=3 x parallel.pipeline_parallel=1 does not divide the 1 processes launched; "
            "launch a multiple of 3",
        ),
    ],
)
def test_train_cli_prints_bad_input_as_one_line(toy_dataset, tmp_path, bad, message):
    """A config that only the data (or the launch) can refuse ends in one line, exit 2; from any folder."""
    ov = overrides(toy_dataset, **bad)
    cmd = [sys.executable, "-m", "megamdm.train", "--config", str(ROOT / "configs/model/tiny.yaml")]
    for o in ov:
        cmd += ["--set", o]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "MASTER_ADDR": "127.0.0.1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message}"]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "layout", [{}, {"parallel.pipeline_parallel": 2}, {"parallel.tensor_parallel": 2, "parallel.sequence_parallel": True}]
)
def test_trimmed_prompts_train_exactly_as_padded_ones(toy_dataset, init_ckpt, layout):
    """Prompts of ~44 bytes padded to text.max_len=64 (dropped ones 8 MASKs, then padding): cutting each
    step's prompts to its longest changes no loss, under PP (one length per step) and SP (a multiple of TP)."""
    world = 2 if layout else 1
    common = {"text.max_len": 64, "text.drop_len": 8, "checkpoint.init_from": init_ckpt, **layout}
    from megamdm.data.loader import TrainLoader
    from megamdm.text import ByteTokenizer

    cfg = load_config(
        ROOT / "configs/model/tiny.yaml", overrides(toy_dataset, **{k: v for k, v in common.items() if "parallel" not in k})
    )
    groups = GCEGroups.load(toy_dataset / "groups.safetensors")
    assert next(TrainLoader(cfg, groups, ByteTokenizer()))[0].corrupted.text_ids.shape[1] == 48  # 44 bytes -> 48
    padded = train(world, overrides(toy_dataset, **{**common, "data.trim_text": False}))
    trimmed = train(world, overrides(toy_dataset, **common))
    for a, b in zip(trimmed["losses"], padded["losses"]):
        assert a == pytest.approx(b, rel=1e-5), (trimmed["losses"], padded["losses"])


def test_trim_text_cuts_to_the_longest_prompt_of_the_step():
    from megamdm.data.loader import MicroBatch, trim_text
    from megamdm.diffusion import Corrupted

    def mb(lengths, full=64, grid=4):
        pad = torch.arange(full)[None, :] >= torch.tensor(lengths)[:, None]
        z = torch.zeros(len(lengths), grid, grid, dtype=torch.long)
        c = Corrupted(
            torch.zeros(len(lengths), full, dtype=torch.long),
            pad,
            z,
            z,
            z.float(),
            z.bool(),
            z.bool(),
            torch.zeros(len(lengths)),
        )
        return MicroBatch(c, "16x16", torch.zeros(len(lengths), 2))

    out = trim_text([mb([3, 17]), mb([9, 1])])
    assert [m.corrupted.text_ids.shape[1] for m in out] == [24, 24]  # 17 rounded up to a multiple of 8
    out = trim_text([mb([3, 17])], seq_multiple=5)  # 4 merged image positions: 24 + 4 = 28 -> 26 + 4 = 30
    assert out[0].corrupted.text_pad_mask.shape[1] == 26
    assert trim_text([mb([64, 2])])[0].corrupted.text_ids.shape[1] == 64


def test_overlapped_data_parallel_communication_follows_the_same_trajectory(toy_dataset, init_ckpt, reference, tmp_path):
    """DP 2 with the distributed optimizer: the gradient reduce-scatter overlapped with backward and the
    parameter all-gather with the next forward (what CUDA runs by default) give the single-process
    losses; a checkpoint saved mid-run holds the gathered parameters and resumes to the same end."""
    ov = {
        "parallel.use_distributed_optimizer": True,
        "parallel.overlap_grad_reduce": True,
        "parallel.overlap_param_gather": True,
        "checkpoint.init_from": init_ckpt,
    }
    run = tmp_path / "run"
    first = train(2, overrides(toy_dataset, **{**ov, "checkpoint.save_dir": run, "train.exit_after_steps": 2}))
    rest = train(2, overrides(toy_dataset, **{**ov, "checkpoint.save_dir": run}))
    for a, b in zip(first["losses"] + rest["losses"], reference["losses"]):
        assert abs(a - b) / b < 2e-5, (first["losses"] + rest["losses"], reference["losses"])


def _bench_train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "tools/bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench_train(ov):
    mod = _bench_train_module()
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ov)
    res = mod.bench(cfg, warmup=1, steps=2)
    return {"res": res, "table": mod.table(res)}


def test_bench_train_counts_tokens_and_flops_and_splits_the_step(toy_dataset):
    """tools/bench_train.py on the tiny model: real tokens are the unpadded prompts (every toy prompt
    has the same 46 bytes, padded to 64) plus the image tokens; FLOPs are training/flops.py's for
    those lengths; the five parts of the breakdown add up to the step, GCE and attention among them."""
    from megamdm.text import format_prompt
    from megamdm.training.flops import train_flops

    ov = overrides(toy_dataset, **{"text.max_len": 64, "text.drop_len": -1, "data.trim_text": False})
    out = run_distributed(_bench_train, 1, ov)[0]
    r = out["res"]
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ov)
    real = len(format_prompt("pattern 3", width=32, height=32, score=6.0))
    assert real < 64
    samples, (h, w) = r["samples"], (8, 8)
    assert r["real_tokens"] == samples * (real + h * w)
    body = samples * train_flops(cfg.model, real, h, w, 0.0)
    assert body < r["flops"] < body + 6.0 * samples * h * w * cfg.model.hidden_size * cfg.model.image_vocab_size
    assert r["tflops_per_gpu"] == pytest.approx(r["flops"] / r["step_s"] / 1e12)
    parts = [r[k] for k in ("body", "attention", "gce_head", "optimizer", "data_wait")]
    assert sum(parts) == pytest.approx(r["step_s"]) and all(p >= 0 for p in parts)
    assert r["attention"] > 0 and r["gce_head"] > 0 and r["optimizer"] > 0
    assert "GCE head" in out["table"] and "MFU" in out["table"]


def test_bench_train_variants_parse_and_compare():
    """``--variant 'NAME: KEY=VALUE ...'``: a missing name is refused in one line; the comparison
    table gives each part of the step as a share of that variant's step time."""
    mod = _bench_train_module()
    assert mod._variant("padded: data.trim_text=false train.norm=eager") == (
        "padded",
        ["data.trim_text=false", "train.norm=eager"],
    )
    assert mod._variant("after:") == ("after", [])
    for bad in ("data.trim_text=false", ": x=1"):
        with pytest.raises(SystemExit, match="give 'NAME: KEY=VALUE"):
            mod._variant(bad)
    parts = {"body": 0.5, "attention": 0.25, "gce_head": 0.125, "optimizer": 0.0625, "data_wait": 0.0625}
    row = {"variant": "v", "step_s": 2.0, "tokens_per_s": 1000.0, "tflops_per_gpu": 300.0, "mfu": 0.3, **parts}
    line = mod.comparison([row]).splitlines()[1].split()
    assert line[:5] == ["v", "2.000", "1,000", "300.00", "30.0%"]
    assert line[5:] == ["25.0%", "12.5%", "6.2%", "3.1%", "3.1%"]


def test_a_run_keeps_its_config_with_absolute_paths_and_its_metrics_and_a_finished_one_says_so(
    toy_dataset, tmp_path, capfd, monkeypatch
):
    """Relative paths in a run's saved config made to-single and resume fail from another folder; the
    loss curve lived only in wandb; resuming a finished run exited without a word."""
    monkeypatch.chdir(toy_dataset)  # the config names the data relative to here
    run = tmp_path / "run"
    ov = overrides(".", **{"train.steps": 2, "checkpoint.save_dir": run})
    first = train(1, ov)
    saved = load_config(run / "config.yaml")
    assert saved.data.shards == [str(toy_dataset / "ds.zarr")] and saved.gce.groups_file == str(
        toy_dataset / "groups.safetensors"
    )
    assert load_config(run / "iter_0000002/config.yaml").image_tokenizer.path == str(toy_dataset / "tok")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in rows] == [("train", 1), ("train", 2)]
    assert rows[-1]["loss"] == pytest.approx(first["losses"][-1], rel=1e-6)
    capfd.readouterr()
    again = train(1, ov)
    assert again["losses"] == [] and again["step"] == 2
    assert "nothing to do: the run is at step 2 and train.steps=2" in capfd.readouterr().out


def test_a_kernels_time_is_charged_once_on_the_gpu():
    """On CUDA the Triton GCE kernels (named ``_gce_...``) were charged twice: as their own device
    events and inside the op that launched them. Events as torch.profiler gives them, in microseconds."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from megamdm.training.step_profile import spent_by_category

    def event(name, device, own_us, parent=None):
        return SimpleNamespace(
            name=name, device_type=device, self_device_time_total=own_us, self_cpu_time_total=0.0, cpu_parent=parent
        )

    launch = event("TritonGCEBackward", DeviceType.CPU, 300.0)
    events = [
        launch,
        event("_gce_dz_kernel", DeviceType.CUDA, 300.0),  # the same 300 us, seen from the device
        event("aten::mm", DeviceType.CPU, 200.0, parent=event("megamdm::core_attention", DeviceType.CPU, 0.0)),
        event("aten::mm", DeviceType.CUDA, 200.0),
        event("aten::add_", DeviceType.CPU, 50.0),  # the body's: no category
    ]
    spent = spent_by_category(events, on_device=True)
    assert spent == {"attention": 200e-6, "gce_head": 300e-6, "optimizer": 0.0}


def test_bench_trains_synthetic_windows_as_long_as_the_grouping():
    """The grouped variant had 2 global batches of data, so it grouped windows of 2, not 16."""
    mod = _bench_train_module()
    cfg = load_config(None, ["data.global_batch_size=8", "data.group_by_length=16"])
    assert mod.synthetic_samples(cfg, 2, 3) == 128
    cfg = load_config(None, ["data.global_batch_size=64"])
    assert mod.synthetic_samples(cfg, 2, 3) == 5 * 64
