"""The launch scripts: launch/pretrain_*.sh submitted with sbatch to a real (single-node, CPU) SLURM
cluster, and launch/local.sh."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .support.slurm import start

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start(tmp_path_factory.mktemp("slurm"))
    if c is None:
        pytest.skip("SLURM could not be installed or started here (needs root and Debian's slurm-wlm + munge)")
    yield c
    c.stop()


def _tiny_config(tmp_path, toy_dataset, run, steps: int) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""_base_: [{ROOT}/configs/model/tiny.yaml]
model: {{image_vocab_size: 64, num_layers: 2, hidden_size: 64, head_dim: 16, ffn_hidden_size: 128}}
text: {{max_len: 24}}
data: {{shards: [{toy_dataset}/ds.zarr], micro_batch_size: 2, global_batch_size: 8, num_workers: 0}}
gce: {{groups_file: {toy_dataset}/groups.safetensors}}
image_tokenizer: {{path: {toy_dataset}/tok}}
train: {{device: cpu, precision: fp32, steps: {steps}}}
checkpoint: {{save_interval: 10, save_dir: {run}}}
logging: {{log_interval: 10}}
parallel: {{use_distributed_optimizer: false}}
""")
    return cfg


def _submit(cluster, cfg, tmp_path, **env_extra) -> tuple[str, Path]:
    """sbatch launch/pretrain_256.sh: 1 node, 2 tasks of 1 CPU; the log goes to tmp_path, not the repo."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(
        CONFIG=str(cfg),
        PYTHON=sys.executable,
        GPUS_PER_NODE="2",
        SLURM_CONF=cluster.env["SLURM_CONF"],
        LOG_DIR=str(tmp_path / "logs"),
        **env_extra,
    )
    sub = cluster.run(
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        "--time=15",
        f"--output={tmp_path}/%x-%j.out",
        "launch/pretrain_256.sh",
        cwd=ROOT,
        env=env,
    )
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    return job, tmp_path / f"megamdm-256-{job}.out"


def _wait(cluster, job, deadline) -> str:
    state = ""
    while time.time() < deadline:
        state = cluster.job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(1)
    return state


@pytest.mark.slow
def test_sbatch_pretrain_script_trains_checkpoints_survives_preemption(cluster, toy_dataset, tmp_path):
    """sbatch launch/pretrain_256.sh with a tiny CPU config: srun starts 2 ranks, the job is
    preempted with SIGUSR1 after its first checkpoint, saves, requeues itself, resumes and finishes."""
    run = tmp_path / "run"
    job, log = _submit(cluster, _tiny_config(tmp_path, toy_dataset, run, 40), tmp_path)
    tracker = run / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while not tracker.exists():
        assert time.time() < deadline and cluster.job_field(job, "JobState") in ("PENDING", "RUNNING"), (
            log.read_text()[-3000:] if log.exists() else cluster.job_field(job, "Reason")
        )
        time.sleep(0.2)
    assert cluster.run("scancel", "--signal=USR1", job).returncode == 0  # what --signal=USR1@120 sends
    state = _wait(cluster, job, deadline)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:] + "\nslurmctld:\n" + cluster.log_tail()
    assert "(preemption)" in text and "requeueing job" in text and "resumed from" in text, text[-3000:]
    assert tracker.read_text().strip() == "40"
    assert (run / "iter_0000040" / "config.yaml").is_file()
    assert cluster.job_field(job, "Restarts") == "1"
    assert "(SLURM granted 1 per task)" in text, text[-3000:]  # srun mode: one rank, one task's CPUs


@pytest.mark.slow
def test_torchrun_mode_gives_the_node_task_every_cpu_of_its_ranks(cluster, toy_dataset, tmp_path):
    """LAUNCHER=torchrun: one srun task per node starts the node's ranks, so it must get the CPUs of
    all of them (2 x 1 here), not the one rank's --cpus-per-task it would inherit."""
    run = tmp_path / "run"
    job, log = _submit(cluster, _tiny_config(tmp_path, toy_dataset, run, 2), tmp_path, LAUNCHER="torchrun")
    state = _wait(cluster, job, time.time() + 300)
    text = log.read_text() if log.exists() else ""
    assert state == "COMPLETED", text[-3000:] + "\nslurmctld:\n" + cluster.log_tail()
    assert "megamdm: 2 ranks" in text and "(SLURM granted 2 per task)" in text, text[-3000:]
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_the_local_launcher_uses_the_repositorys_environment(tmp_path):
    """launch/local.sh ran `python`, which on a fresh machine has no torch ("No module named 'torch'")."""
    venv = ROOT / ".venv/bin/python"
    if not venv.exists():
        pytest.skip("no .venv here (make setup makes it)")
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").write_text("#!/bin/sh\necho 'No module named torch' >&2\nexit 1\n")  # a python without torch
    (bare / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{bare}:/usr/bin:/bin"
    r = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--config" in r.stdout
