"""A private single-node SLURM cluster (slurmctld + slurmd + munge) for testing the sbatch scripts.

Installs Debian's ``slurm-wlm`` and ``munge`` when they are missing and this process may (root
with apt); otherwise :func:`start` returns None and the tests skip."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = """ClusterName=megamdm-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
# a requeued job may restart after cred_expire s (default 120); forcing it sooner fails: credential revoked
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmdSpoolDir={d}/spool
StateSaveLocation={d}/state
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmUser=root
SlurmdUser=root
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))


def _install() -> bool:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, env=env, capture_output=True, timeout=900
        )
    except (subprocess.SubprocessError, OSError):
        return False
    return _installed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, d: Path, env: dict, procs: list):
        self.dir, self.env, self.procs = d, env, procs

    def run(self, *cmd, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, **kw)

    def job_field(self, job: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job).stdout
        for tok in out.split():
            if tok.startswith(field + "="):
                return tok.split("=", 1)[1]
        return ""

    def log_tail(self, lines: int = 20) -> str:
        """The controller's last log lines: why a job failed to (re)start is only written there."""
        log = self.dir / "slurmctld.log"
        return "\n".join(log.read_text().splitlines()[-lines:]) if log.is_file() else ""

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid = self.dir / f"{name}.pid"
            if pid.is_file():
                try:
                    os.kill(int(pid.read_text()), 15)
                except (ProcessLookupError, ValueError):
                    pass


def start(d: Path) -> Cluster | None:
    if os.geteuid() != 0:
        return None
    if not _installed() and not _install():
        return None
    for sub in ("spool", "state"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(host=host, d=d, cpus=os.cpu_count(), mem=mem, ctld_port=_free_port(), d_port=_free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    for p in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(p).mkdir(parents=True, exist_ok=True)
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        subprocess.run(["munged", "--force"], check=False, capture_output=True)
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True, capture_output=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True, capture_output=True)
    cluster = Cluster(d, env, [])
    deadline = time.time() + 60
    while time.time() < deadline:
        out = cluster.run("sinfo", "-h", "-o", "%T").stdout.strip()
        if out == "idle":
            return cluster
        time.sleep(0.5)
    cluster.stop()
    return None
