"""The README's main job, shortened: every stage of the demo (megamdm/demo/run.py) runs end to end (a few training steps)."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("megatron.core")
pytest.importorskip("nvidia.dali")

from megamdm.demo.run import parse_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)  # a previous demo's run: a fresh demo must not resume it
    (out / "run/latest_checkpointed_iteration.txt").write_text("999\n")
    (out / ".megamdm-demo").touch()
    # more codes than the 1500 images have distinct patches: each patch gets its own (in whole GCE groups)
    r = subprocess.run(  # from a folder outside the repository: the shipped config is found
        [sys.executable, ROOT / "tools/demo.py", "--quick", "--vocab", "100000", "--out", out],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "starting fresh" in r.stdout
    distinct = int(r.stdout.split(" distinct patches)")[0].rsplit(" ", 1)[1])
    from megamdm.vq import KMeansPatchTokenizer

    assert KMeansPatchTokenizer.load(out / "tokenizer").vocab_size == distinct // 8 * 8 < 100000
    for k in range(1, 9):
        assert f"[{k}/8]" in r.stdout
    # data, tokenizer, groups and token shards on disk
    assert len(list((out / "data/wds").glob("*.tar"))) == 2
    assert (out / "tokenizer").is_dir() and (out / "gce_groups.safetensors").is_file()
    assert (out / "data/shapes.zarr").is_dir()
    # a distributed checkpoint, converted
    assert (out / "run/latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert (out / "release/model.safetensors").is_file()
    # samples with editing off and on, each PNG carrying its prompt, a grid, and scores
    for mode in ("off", "on"):
        files = sorted((out / "samples" / mode).glob("*.png"))
        assert len(files) == 8
        assert Image.open(files[0]).info["prompt"].startswith("a ")
    grid = Image.open(out / "grid.png")
    assert grid.width > 400 and grid.height > 100
    scores = json.loads((out / "scores.json").read_text())
    assert scores["off"]["n_single"] == 4 and scores["off"]["n_two"] == 4
    assert "single-object" in r.stdout and "two-object" in r.stdout
    from megamdm.demo.shapesworld import parse_caption

    captions = []
    for p in sorted((out / "data/wds").glob("*.tar")):
        with tarfile.open(p) as t:
            captions += [t.extractfile(m).read().decode() for m in t.getmembers() if m.name.endswith(".txt")]
    assert len(captions) == 1500  # --quick's image count, 80% of them two-object scenes (--two-prob)
    assert abs(sum(parse_caption(c)[1] is not None for c in captions) / len(captions) - 0.8) < 0.04


def test_demo_rejects_a_two_object_share_outside_0_1(tmp_path):
    r = subprocess.run(
        [sys.executable, ROOT / "tools/demo.py", "--two-prob", "1.5", "--out", tmp_path],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "--two-prob 1.5 must be in [0, 1]" in r.stderr
    assert not any(tmp_path.iterdir())


def test_demo_refuses_to_clear_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/mine.txt").write_text("keep me")
    r = subprocess.run(
        [sys.executable, ROOT / "tools/demo.py", "--quick", "--out", tmp_path], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2
    assert "not written by the demo" in r.stderr and "[1/8]" not in r.stdout
    assert (tmp_path / "data/mine.txt").read_text() == "keep me"


def test_the_quick_demo_writes_beside_a_finished_demo_not_over_it():
    """--quick used to write to demo_out, and a fresh run clears its folder: the finished demo was lost."""
    assert parse_args(["--quick"]).out == "demo_quick" and parse_args([]).out == "demo_out"
    assert parse_args(["--quick", "--out", "x"]).out == "x" and parse_args(["--quick"]).steps == 30
