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
    sample = report["sample"]  # the sampler's own memory is its peak over what training leaves resident
    assert 0 <= sample["sampler_extra_gb"] < sample["peak_mem_gb"] and sample["resident_gb"] > 0
    assert (tmp_path / "sample0.png").is_file() and "sampler 4 x 32 px" in r.stdout


def test_prompt_padding_counts_each_layout_against_the_real_tokens(tmp_path):
    """tools/bench_prompt_padding.py at the 256 px stage: the padded layout processes
    ``text.max_len`` prompt positions per sample, the packed floor exactly the samples' own lengths
    (uniform in 10..80, so about 45 on average) plus the image positions; trimming lies between,
    and grouping by length trims more."""
    import importlib.util
    import json

    from megamdm.config import load_config

    spec = importlib.util.spec_from_file_location("bench_prompt_padding", ROOT / "tools/bench_prompt_padding.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--configs", "configs/pretrain_256.yaml", "--steps", "8", "--json", str(tmp_path / "r.json")]) == 0
    (r,) = json.loads((tmp_path / "r.json").read_text())
    cfg = load_config(ROOT / "configs/pretrain_256.yaml")
    rows, m, b = r["rows"], r["image_positions"], r["samples_per_rank_step"]
    assert m == 64 and rows["padded"]["positions_per_step"] == b * (cfg.text.max_len + m)
    packed = rows[mod.PACKED]["positions_per_step"] / b - m  # mean prompt length
    assert 35 < packed < 55
    layouts = ("padded", "trimmed, drop_len 0", "trimmed, own length", "trimmed, own length, grouped by 16")
    ratios = [rows[k]["positions_ratio"] for k in layouts]
    assert ratios == sorted(ratios, reverse=True) and ratios[3] < 0.9 * ratios[2]
    assert rows[mod.PACKED]["positions_ratio"] < ratios[2]
