"""Every command-line tool starts: imports resolve and the argument parser builds (``--help``).

bench_loader once imported a helper that had been folded into another (ImportError on start);
the tools the demo does not run are otherwise only exercised by hand."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted((ROOT / "tools").glob("*.py"))


def test_every_tool_prints_its_help():
    assert len(TOOLS) >= 10
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        t.name: subprocess.Popen(
            [sys.executable, str(t), "--help"], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for t in TOOLS
    }
    failed = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        if p.returncode != 0 or "usage:" not in out:
            failed[name] = (p.returncode, err.strip().splitlines()[-3:])
    assert not failed, failed


def test_gpu_check_runs_end_to_end_at_toy_sizes_on_cpu(tmp_path):
    """tools/gpu_check.py is run by hand on a lent GPU: its --smoke mode keeps it from rotting."""
    import json

    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/gpu_check.py"),
            "--smoke",
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--sample-steps",
            "3",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["train"]["samples_per_s"] > 0 and report["train"]["peak_mem_gb"] > 0
    assert report["sample"]["images"] == 4 and report["sample"]["steps"] == 3
    assert (tmp_path / "sample0.png").is_file() and "sampler 4 x 32 px" in r.stdout
