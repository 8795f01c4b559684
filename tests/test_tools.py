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
