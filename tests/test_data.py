"""Data pipeline: tars -> DALI -> token shards -> loader."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("zarr")

from megamdm.config import Config, DataConfig, DiffusionConfig, ModelConfig
from megamdm.data import dali
from megamdm.data.loader import EpochPlan, TrainLoader, _mix, feistel_permute
from megamdm.data.shards import BucketBuffer, ShardError, TokenShards, consolidate, write_part
from megamdm.data.webdataset import write_shard
from megamdm.gce import GCEGroups
from megamdm.text import ByteTokenizer
from megamdm.vq import KMeansPatchTokenizer, codebook_hash

ROOT = Path(__file__).resolve().parents[1]
V = 64


def encode(img: np.ndarray, fmt: str) -> bytes:
    b = io.BytesIO()
    Image.fromarray(img).save(b, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return b.getvalue()


def smooth(seed, h, w):
    """A smooth random image (JPEG-friendly)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 255, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "kmeans"
    KMeansPatchTokenizer(torch.rand(V, 48, generator=torch.Generator().manual_seed(0)), 4).save(d)
    return d


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    """Two img2dataset tars: the first with bad samples among good ones, the second cut short."""
    d = tmp_path_factory.mktemp("wds")
    samples, exact = [], {}
    for i in range(12):
        h, w = (64, 64) if i % 3 == 0 else (80 + 8 * i, 72)
        img = smooth(i, h, w)
        fmt, ext = ("PNG", "png") if i % 4 == 1 else ("JPEG", "jpg")
        key = f"{i:09d}"
        samples.append(
            (key, encode(img, fmt), ext, f"caption number {i}", {"width": w, "height": h, "aesthetic_score": 5.0 + i / 10})
        )
        if (h, w) == (64, 64) and fmt == "PNG":
            exact[key] = img
    good_jpeg = encode(smooth(99, 64, 64), "JPEG")
    samples.append(("000000100", b"\xff\xd8\xff\xe0 this is not a jpeg", "jpg", "corrupt", {}))
    samples.append(("000000101", good_jpeg[: len(good_jpeg) // 2], "jpg", "truncated file", {}))
    samples.append(("000000102", encode(smooth(5, 64, 64), "JPEG"), "jpg", None, {}))  # no caption
    samples.append(("000000103", encode(smooth(6, 32, 48), "JPEG"), "jpg", "too small", {}))
    write_shard(d / "00000.tar", samples)
    second = [(f"{1000 + i:09d}", encode(smooth(200 + i, 64, 64), "PNG"), "png", f"second {i}", {}) for i in range(6)]
    write_shard(d / "00001.tar", second)
    raw = (d / "00001.tar").read_bytes()
    (d / "00001.tar").write_bytes(raw[: int(len(raw) * 0.7)])  # a truncated tar
    return d


def preprocess(shards_dir, out, tokenizer_dir, *extra):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/preprocess.py"),
            "--input",
            str(shards_dir / "*.tar"),
            "--out",
            str(out),
            "--tokenizer",
            str(tokenizer_dir),
            "--resolution",
            "64",
            "--quiet",
            "--batch-size",
            "4",
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_preprocess_real_tars_through_dali(shards_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "ds.zarr"
    log = preprocess(shards_dir, out, tokenizer_dir, "--workers", "2")
    ds = TokenShards(out)
    sk = ds.attrs["skipped"]
    assert sk == {"corrupt_image": 2, "missing_caption": 1, "too_small": 1, "truncated_tar": 1, "incomplete_sample": 1}, sk
    second = ds.attrs["parts"][1]["counts"]["64x64"]
    assert 2 <= second < 6  # the complete samples before the cut survive
    assert ds.counts == {"64x64": 12 + second}
    caps = ds.captions("64x64", range(12))
    assert caps == [f"caption number {i}" for i in range(12)]
    keys = ds.keys("64x64", [0, 5])
    meta = ds.meta("64x64", [0, 5])
    assert keys == ["000000000", "000000005"]
    assert meta["orig_size"][1].tolist() == [72, 120] and meta["crop"][1].tolist() == [21, 0]  # 72x120 -> 64x107, centre
    assert abs(float(meta["score"][1]) - 5.5) < 1e-6
    # an exactly-sized PNG is decoded losslessly: its tokens equal the tokenizer's on the PIL image
    tok = KMeansPatchTokenizer.load(tokenizer_dir)
    img = smooth(9, 64, 64)  # key 9 is a 64x64 PNG
    want = tok.encode(torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    assert (ds.tokens("64x64", [9])[0] == want).all()
    assert "written" in log
    # a rerun skips both finished parts
    log2 = preprocess(shards_dir, out, tokenizer_dir)
    assert '"parts_already_done": 2' in log2


def run_preprocess(inputs, out, tokenizer_dir, *extra):
    argv = [sys.executable, str(ROOT / "tools/preprocess.py"), "--out", str(out), "--tokenizer", str(tokenizer_dir)]
    argv += ["--quiet", "--batch-size", "4", "--input", *map(str, inputs), *map(str, extra)]
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"})


@pytest.mark.parametrize("where", ["first member data", "second member data", "first member header"])
def test_a_cut_tar_keeps_every_complete_sample(tmp_path, where):
    """Cut inside sample 3 (of 0..5): samples 0, 1 and 2 are complete and all kept; 3 is dropped."""
    import tarfile

    samples = [(f"{i:09d}", encode(smooth(i, 16, 16), "PNG"), "png", f"caption {i}", {}) for i in range(6)]
    write_shard(tmp_path / "full.tar", samples)
    with tarfile.open(tmp_path / "full.tar") as t:
        members = [m for m in t.getmembers() if m.name.startswith("000000003")]
    m = members[0] if where.startswith("first") else members[1]
    cut = m.offset + 100 if where.endswith("header") else m.offset_data + 5
    raw = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[:cut])
    keys, truncated = dali.write_index(tmp_path / "cut.tar", tmp_path / "cut.idx")
    assert truncated and keys == [f"{i:09d}" for i in range(3)]


def test_killing_preprocessing_kills_its_workers_and_a_rerun_completes(shards_dir, tokenizer_dir, tmp_path):
    import signal
    import time

    import psutil

    tars = []
    for i in range(40):  # seconds of work left when the kill comes
        tars.append(tmp_path / f"{i:05d}.tar")
        tars[-1].write_bytes((shards_dir / "00000.tar").read_bytes())
    out = tmp_path / "ds.zarr"
    argv = [sys.executable, str(ROOT / "tools/preprocess.py"), "--out", str(out), "--tokenizer", str(tokenizer_dir)]
    argv += ["--quiet", "--batch-size", "4", "--resolution", "64", "--workers", "2", "--input", *map(str, tars)]
    p = subprocess.Popen(
        argv, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    parent = psutil.Process(p.pid)
    deadline = time.time() + 60
    while len(parent.children()) < 2 or not (out / "parts").is_dir():  # workers up and writing
        assert time.time() < deadline and p.poll() is None, "preprocessing ended before it could be killed"
        time.sleep(0.05)
    workers = parent.children()
    p.send_signal(signal.SIGKILL)
    p.wait()
    gone, alive = psutil.wait_procs(workers, timeout=2)
    alive = [w for w in alive if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"workers outlived their parent: {alive}"
    r = run_preprocess(tars, out, tokenizer_dir, "--resolution", 64)
    assert r.returncode == 0, r.stderr
    assert TokenShards(out).counts == {"64x64": 40 * 12}


def test_a_worker_dies_with_its_parent():
    """The mechanism alone: a worker that would sleep for a minute dies when its parent is killed."""
    import multiprocessing as mp
    import signal
    import time

    import psutil

    from megamdm.data.preprocess import die_with_parent

    def worker(parent):
        die_with_parent(parent)
        time.sleep(60)

    def parent(q):
        w = mp.get_context("fork").Process(target=worker, args=(os.getpid(),))
        w.start()
        q.put(w.pid)
        time.sleep(60)

    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=parent, args=(q,))
    p.start()
    w = psutil.Process(q.get(timeout=10))
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    deadline = time.time() + 3
    while time.time() < deadline and w.is_running() and w.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    assert not w.is_running() or w.status() == psutil.STATUS_ZOMBIE, "the worker outlived its parent"


def test_a_non_utf8_caption_is_kept_said_and_counted(tokenizer_dir, tmp_path):
    samples = [(f"{i:09d}", encode(smooth(i, 64, 64), "PNG"), "png", f"caption {i}", {}) for i in range(3)]
    samples.append(("000000009", encode(smooth(9, 64, 64), "PNG"), "png", b"caf\xe9 au lait", {}))  # Latin-1
    write_shard(tmp_path / "00000.tar", samples)
    out = tmp_path / "ds.zarr"
    r = run_preprocess([tmp_path / "00000.tar"], out, tokenizer_dir, "--resolution", 64)
    assert r.returncode == 0, r.stderr
    assert '"replaced_non_utf8_caption": 1' in r.stdout
    ds = TokenShards(out)
    assert ds.attrs["replaced"] == {"non_utf8_caption": 1} and ds.counts == {"64x64": 4}
    assert ds.captions("64x64", [3]) == ["caf\ufffd au lait"]


def test_same_named_tars_in_two_folders_are_two_parts(shards_dir, tokenizer_dir, tmp_path):
    """img2dataset names every folder's shards 00000.tar, ...: both folders' data must arrive."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "00000.tar").write_bytes((shards_dir / "00000.tar").read_bytes())
    out = tmp_path / "ds.zarr"
    r = run_preprocess([tmp_path / "a/00000.tar", tmp_path / "b/00000.tar"], out, tokenizer_dir, "--resolution", 64)
    assert r.returncode == 0, r.stderr
    assert TokenShards(out).counts == {"64x64": 2 * 12}


def test_a_rerun_that_does_not_fit_the_dataset_is_refused_before_writing(shards_dir, tokenizer_dir, tmp_path):
    tar = tmp_path / "00000.tar"
    tar.write_bytes((shards_dir / "00000.tar").read_bytes())
    out = tmp_path / "ds.zarr"
    assert run_preprocess([tar], out, tokenizer_dir, "--resolution", 64).returncode == 0
    parts = sorted(p.name for p in (out / "parts").iterdir() if p.is_dir())
    # other options for the same tar
    r = run_preprocess([tar], out, tokenizer_dir, "--resolution", 128)
    assert r.returncode == 2 and "--resolution 64 (now 128)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # the tar's contents changed
    tar.write_bytes((shards_dir / "00000.tar").read_bytes() + b"\0" * 1024)
    r = run_preprocess([tar], out, tokenizer_dir, "--resolution", 64)
    assert r.returncode == 2 and "its tar changed" in r.stderr
    # a new tar with another tokenizer: refused before its part is written
    other_tok = tmp_path / "tok2"
    KMeansPatchTokenizer(torch.rand(V, 48, generator=torch.Generator().manual_seed(9)), 4).save(other_tok)
    new = tmp_path / "00009.tar"
    new.write_bytes((shards_dir / "00000.tar").read_bytes())
    r = run_preprocess([new], out, other_tok, "--resolution", 64)
    assert r.returncode == 2 and "tokenised with codebook" in r.stderr
    assert sorted(p.name for p in (out / "parts").iterdir() if p.is_dir()) == parts


def test_add_buckets_writes_another_size_beside_the_dataset_and_reruns_resume(shards_dir, tokenizer_dir, tmp_path):
    tar = tmp_path / "00000.tar"
    tar.write_bytes((shards_dir / "00000.tar").read_bytes())
    out = tmp_path / "ds.zarr"
    assert run_preprocess([tar], out, tokenizer_dir, "--resolution", 64).returncode == 0
    r = run_preprocess([tar], out, tokenizer_dir, "--resolution", 32)
    assert r.returncode == 2 and "pass --add-buckets" in r.stderr, r.stderr
    r = run_preprocess([tar], out, tokenizer_dir, "--resolution", 32, "--add-buckets")
    assert r.returncode == 0, r.stderr
    assert TokenShards(out).counts == {"32x32": 13, "64x64": 12}  # the 32x48 image fits 32 px
    for res in (32, 64):  # either option set now resumes, with or without the flag
        r = run_preprocess([tar], out, tokenizer_dir, "--resolution", res)
        assert r.returncode == 0 and '"parts_already_done": 1' in r.stdout, r.stdout + r.stderr
    # random crops at 64 px would put the tar in the 64x64 bucket twice
    r = run_preprocess([tar], out, tokenizer_dir, "--resolution", 64, "--crop", "random", "--add-buckets")
    assert r.returncode == 2 and "64x64 buckets already" in r.stderr, r.stderr
    assert TokenShards(out).counts == {"32x32": 13, "64x64": 12}


def test_consolidate_expects_every_part_a_run_planned(shards_dir, tokenizer_dir, tmp_path):
    """A killed --add-buckets run leaves every tar with some part; its unfinished parts must still count."""
    from megamdm.config import PreprocessConfig
    from megamdm.data.preprocess import finalize, plan_parts

    tar = tmp_path / "00000.tar"
    tar.write_bytes((shards_dir / "00000.tar").read_bytes())
    out = tmp_path / "ds.zarr"
    assert run_preprocess([tar], out, tokenizer_dir, "--resolution", 64).returncode == 0
    plan = plan_parts(out, [tar], KMeansPatchTokenizer.load(tokenizer_dir), PreprocessConfig(resolution=32), add_buckets=True)
    assert len(plan) == 1  # planned, then killed before the part was written
    with pytest.raises(ShardError, match="1 of 2 parts are not finished"):
        finalize(out, tokenizer_dir, [tar])


def test_a_part_written_by_0_1_counts_as_done(shards_dir, tokenizer_dir, tmp_path):
    """0.1.x named a part after its tar alone; a rerun over such a dataset must not add the tar twice."""
    import zarr

    tar = tmp_path / "00000.tar"
    tar.write_bytes((shards_dir / "00000.tar").read_bytes())
    out = tmp_path / "ds.zarr"
    assert run_preprocess([tar], out, tokenizer_dir, "--resolution", 64).returncode == 0
    (part,) = [p for p in (out / "parts").iterdir() if p.is_dir()]
    legacy = out / "parts" / "00000"
    part.rename(legacy)
    zarr.open_group(str(legacy), mode="r+").attrs["source"] = str(tar)
    r = run_preprocess([tar], out, tokenizer_dir, "--resolution", 64)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (out / "parts").iterdir() if p.is_dir()] == ["00000"]
    assert TokenShards(out).counts == {"64x64": 12}


def test_consolidate_refuses_a_half_written_dataset_unless_marked_partial(shards_dir, tokenizer_dir, tmp_path):
    """One rank of two finished: consolidating must not make the dataset look complete."""
    out = tmp_path / "ds.zarr"
    tars = [shards_dir / "00000.tar", shards_dir / "00001.tar"]
    r = run_preprocess(tars, out, tokenizer_dir, "--resolution", 64, "--rank", 1, "--world", 2)
    assert r.returncode == 0 and "--consolidate" in r.stdout, r.stderr
    r = run_preprocess(tars, out, tokenizer_dir, "--resolution", 64, "--consolidate")
    assert r.returncode == 2 and "1 of 2 parts are not finished" in r.stderr and "--partial" in r.stderr
    r = run_preprocess([], out, tokenizer_dir, "--consolidate")
    assert r.returncode == 2 and "--consolidate needs the --input" in r.stderr
    with pytest.raises(ShardError, match="no consolidated index"):
        TokenShards(out)
    r = run_preprocess(tars, out, tokenizer_dir, "--resolution", 64, "--consolidate", "--partial")
    assert r.returncode == 0 and "PARTIAL: 1 expected parts missing" in r.stdout
    ds = TokenShards(out)
    assert ds.partial and len(ds.missing_parts) == 1
    info = subprocess.run([sys.executable, str(ROOT / "tools/inspect_shards.py"), str(out)], capture_output=True, text=True)
    assert "PARTIAL" in info.stdout, info.stdout + info.stderr


@pytest.mark.parametrize("resolution", ["36", "0", "-64"])
def test_resolution_and_tokenizer_are_checked_before_any_output(shards_dir, tokenizer_dir, tmp_path, resolution):
    out = tmp_path / "ds.zarr"
    r = run_preprocess([shards_dir / "00000.tar"], out, tokenizer_dir, "--resolution", resolution)
    assert r.returncode == 2 and "is not allowed: height and width must be positive multiples of 2*f = 8" in r.stderr
    r = run_preprocess([shards_dir / "00000.tar"], out, tmp_path / "no_tok", "--resolution", 64)
    assert r.returncode == 2 and "image tokenizer folder not found" in r.stderr
    assert not out.exists()
    out.write_text("a file")
    r = run_preprocess([shards_dir / "00000.tar"], out, tokenizer_dir, "--resolution", 64)
    assert r.returncode == 2 and "is an existing file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _bucket(n, h, w, seed):
    g = np.random.default_rng(seed)
    b = BucketBuffer()
    for i in range(n):
        b.add(
            g.integers(0, V, (h, w)),
            f"cap é {seed}-{i}",
            f"k{seed}-{i}",
            (w * 4, h * 4),
            (i, 2 * i),
            None if i % 2 else 0.5 * i,
        )
    return b


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "toy.zarr"
    for p in range(3):
        write_part(
            root,
            f"{p:05d}",
            {"8x8": _bucket(40 + p, 8, 8, p), "8x16": _bucket(20, 8, 16, 10 + p)},
            {"codebook_hash": "abc", "skipped": {"corrupt_image": p}},
        )
    consolidate(root, tokenizer="toy", codebook_hash="abc")
    return root


def test_zarr_round_trip_and_backends_agree(toy_dataset):
    a, b = TokenShards(toy_dataset, backend="tensorstore"), TokenShards(toy_dataset, backend="zarr")
    assert a.counts == {"8x8": 123, "8x16": 60} and a.attrs["skipped"] == {"corrupt_image": 3}
    idx = np.array([122, 0, 41, 40, 77, 5])
    for s in (a, b):
        t = s.tokens("8x8", idx)
        assert t.shape == (6, 8, 8) and t.dtype == np.uint32
    assert (a.tokens("8x8", idx) == b.tokens("8x8", idx)).all()
    assert a.captions("8x16", [59, 0]) == b.captions("8x16", [59, 0]) == ["cap é 12-19", "cap é 10-0"]
    ref = _bucket(41, 8, 8, 1)
    assert (a.tokens("8x8", [40 + 7])[0] == ref.tokens[7]).all()  # part 1 starts at 40
    ma, mb = a.meta("8x8", idx), b.meta("8x8", idx)
    for k in ma:
        assert np.array_equal(ma[k], mb[k], equal_nan=True)
    # one read of several fields over several parts gives each sample's own values, in idx order
    got = a.read("8x8", idx, ("tokens", "captions", "crop"))
    for n, i in enumerate(idx):
        p, j = (0, i) if i < 40 else (1, i - 40) if i < 81 else (2, i - 81)  # parts of 40, 41, 42 samples
        assert got["captions"][n] == f"cap é {p}-{j}" and tuple(got["crop"][n]) == (j, 2 * j)
        assert (got["tokens"][n] == _bucket(40 + p, 8, 8, p).tokens[j]).all()
    with pytest.raises(ValueError, match="unknown token-shard fields.*allowed: tokens"):
        a.read("8x8", idx, ("tokens", "pixels"))
    with pytest.raises(ShardError, match="codebook"):
        TokenShards(toy_dataset, codebook_hash="other")


def loader_cfg(root, dp_batch=8, mbs=2, workers=0, seed=5):
    return Config(
        model=ModelConfig(image_vocab_size=V),
        data=DataConfig(shards=[str(root)], micro_batch_size=mbs, global_batch_size=dp_batch, num_workers=workers, seed=seed),
        diffusion=DiffusionConfig(prompt_drop=0.1),
    )


def _loader(root, rank, size, **kw):
    cfg = loader_cfg(root, **kw)
    return TrainLoader(cfg, GCEGroups.identity(V, [8], [0.2]), ByteTokenizer(), dp_rank=rank, dp_size=size, codebook_hash="abc")


def test_two_ranks_see_disjoint_samples_covering_the_epoch(toy_dataset):
    loaders = [_loader(toy_dataset, r, 2) for r in range(2)]
    steps = loaders[0].plan.steps_per_epoch
    assert steps == 123 // 8 + 60 // 8
    seen = [set(), set()]
    for r, ld in enumerate(loaders):
        for _ in range(steps):
            mbs = next(ld)
            assert len(mbs) == 2 and len({m.resolution for m in mbs}) == 1  # one bucket per step
            for m in mbs:
                seen[r] |= {(m.resolution, int(i)) for i in m.sample_ids[:, 1]}
    assert not seen[0] & seen[1]
    union = seen[0] | seen[1]
    assert len(union) == steps * 8
    per_bucket = {r: sum(1 for b, _ in union if b == r) for r in ("8x8", "8x16")}
    assert per_bucket == {"8x8": 120, "8x16": 56}  # every bucket minus its remainder


def test_resume_continues_the_same_sequence(toy_dataset):
    def run(n, loader):
        return [torch.cat([m.corrupted.image_input.flatten() for m in next(loader)]) for _ in range(n)]

    straight = run(9, _loader(toy_dataset, 1, 2, workers=2))
    first = _loader(toy_dataset, 1, 2)
    part = run(4, first)
    state = first.state_dict()
    again = _loader(toy_dataset, 1, 2, workers=2)
    again.load_state_dict(state)
    rest = run(5, again)
    assert all(torch.equal(a, b) for a, b in zip(straight, part + rest))
    # a different data-parallel size sees the same global batches
    whole = _loader(toy_dataset, 0, 1, dp_batch=8, mbs=2)
    halves = [_loader(toy_dataset, r, 2) for r in range(2)]
    for _ in range(3):
        ids = torch.cat([m.sample_ids for m in next(whole)])
        split = torch.cat([m.sample_ids for h in halves for m in next(h)])
        assert torch.equal(ids, split)
    with pytest.raises(ValueError, match="does not fit"):
        _loader(toy_dataset, 0, 1, dp_batch=16).load_state_dict(state)


def test_grouping_by_length_keeps_the_epoch_and_cuts_the_padding(tmp_path):
    """``data.group_by_length``: windows of 4 global batches sorted by prompt length and cut again.
    The epoch holds the same samples; each batch's prompts span a band of lengths (none shorter than
    the longest of the batch before it in the window), so trimming cuts more; two data-parallel
    ranks still split the same global batches, and a loader resumed inside a window continues it."""
    import dataclasses

    from megamdm.config import TextConfig
    from megamdm.data.synthetic import random_tokenizer, synthetic_shards

    root = synthetic_shards(tmp_path, n=99, grid=4, tokenizer=random_tokenizer(V, 2), words=(1, 15))
    base = loader_cfg(root)
    base = dataclasses.replace(base, text=TextConfig(max_len=128, drop_len=-1))

    def loader(group, rank=0, size=1):
        cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, group_by_length=group))
        return TrainLoader(cfg, GCEGroups.identity(V, [8], [0.2]), ByteTokenizer(), dp_rank=rank, dp_size=size)

    def epoch(ld):
        return [next(ld) for _ in range(ld.plan.steps_per_epoch)]

    def lengths(step):
        return torch.cat([(~m.corrupted.text_pad_mask).sum(1) for m in step])

    plain, grouped = epoch(loader(0)), epoch(loader(4))
    assert len(grouped) == 12  # 99 samples, global batches of 8
    ids = [sorted(int(i) for s in steps for m in s for i in m.sample_ids[:, 1]) for steps in (plain, grouped)]
    assert ids[0] == ids[1] and len(set(ids[0])) == 96
    width = [sum(m.corrupted.text_ids.numel() for s in steps for m in s) for steps in (plain, grouped)]
    assert width[1] < 0.9 * width[0], width  # about 0.83 here
    ld = loader(4)
    order = [ld.plan.order(0)[k][1] for k in range(12)]  # global batch j of each step
    assert all(order[k] // 4 == order[k // 4 * 4] // 4 for k in range(12))  # a window's batches follow each other
    by_batch = {j: lengths(step) for j, step in zip(order, grouped)}
    for j in range(12):
        if j % 4:
            assert by_batch[j].min() >= by_batch[j - 1].max()
    halves = [epoch(loader(4, r, 2)) for r in range(2)]
    for k in range(12):
        whole = torch.cat([m.sample_ids for m in grouped[k]])
        assert torch.equal(whole, torch.cat([m.sample_ids for h in halves for m in h[k]]))
    with pytest.raises(ValueError, match="data.group_by_length=0, but this run was saved with 4: the rest of the epoch"):
        loader(0).load_state_dict(loader(4).state_dict())
    old = {k: v for k, v in loader(0).state_dict().items() if k != "group_by_length"}  # saved before the setting
    loader(0).load_state_dict(old)
    with pytest.raises(ValueError, match="data.group_by_length=4, but this run was saved with 0"):
        loader(4).load_state_dict(old)
    resumed = loader(4)
    resumed.load_state_dict({**resumed.state_dict(), "step": 6})
    for k in range(6, 12):
        assert torch.equal(torch.cat([m.sample_ids for m in next(resumed)]), torch.cat([m.sample_ids for m in grouped[k]]))


def test_feistel_is_a_bijection():
    for n in (1, 2, 7, 100, 1025):
        p = feistel_permute(np.arange(n), n, key=3)
        assert sorted(p.tolist()) == list(range(n))
    a, b = feistel_permute(np.arange(500), 500, 1), feistel_permute(np.arange(500), 500, 2)
    assert (a != b).mean() > 0.9
    plan = EpochPlan([{"8x8": 50}], 10, seed=1)
    assert plan.order(0) != plan.order(1)
    # the order of 0.2's batches, unchanged since (a run resumes on the same sequence)
    assert plan.order(0) == [("8x8", int(j)) for j in np.random.default_rng(_mix(1, 0)).permutation(5)]


def test_buckets_and_crops():
    assert dali.buckets_for(256, False, 32) == [(256, 256)]
    bs = dali.buckets_for(256, True, 32)
    assert (256, 256) in bs and all(h % 32 == 0 and w % 32 == 0 for h, w in bs)
    assert all(abs(h * w / 65536 - 1) < 0.25 for h, w in bs)
    assert dali.choose_bucket(1600, 900, bs)[1] > dali.choose_bucket(1600, 900, bs)[0]
    (rh, rw), (top, left) = dali.crop_plan(300, 200, (128, 128), "center", "k")
    assert (rh, rw) == (128, 192) and (top, left) == (0, 32)
    assert dali.crop_plan(100, 100, (128, 128), "center", "k") is None
    r1 = dali.crop_plan(300, 200, (128, 128), "random", "a")
    assert r1 == dali.crop_plan(300, 200, (128, 128), "random", "a")  # deterministic per key
    with pytest.raises(ValueError, match="truncated"):
        full = encode(smooth(1, 32, 32), "JPEG")
        dali.image_header(full[:-10])
    assert dali.image_header(encode(smooth(1, 32, 48), "PNG")) == (48, 32)


def test_codebook_hash_helper(tokenizer_dir):
    tok = KMeansPatchTokenizer.load(tokenizer_dir)
    assert codebook_hash(tok.codebook()) in tok.name


@pytest.mark.timeout(120)
def test_preprocess_stops_when_a_worker_dies(shards_dir, tmp_path):
    from megamdm.config import PreprocessConfig
    from megamdm.data.preprocess import part_name, run

    # the workers cannot load the tokenizer: they die before sending their end-of-work marker
    with pytest.raises(RuntimeError, match="a preprocessing worker failed with exit code 1"):
        run(
            {t: part_name(t) for t in shards_dir.glob("*.tar")},
            tmp_path / "ds.zarr",
            tmp_path / "no_tokenizer",
            PreprocessConfig(resolution=64, batch_size=4),
            workers=2,
            progress=False,
        )


def _racing_writer(root, i, barrier, results):
    buf = BucketBuffer()
    buf.add(np.full((4, 4), i), f"caption {i}", f"{i:09d}", (4, 4), (0, 0), None)
    barrier.wait()  # every writer finds the dataset missing at the same moment
    try:
        write_part(root, f"{i:05d}", {"4x4": buf}, {"codebook_hash": "abc"})
        results.put(None)
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put(repr(e))


def test_concurrent_writers_share_one_new_dataset(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for trial in range(4):  # without the race-safe group creation 9 of 10 such trials lost a writer
        root, n = tmp_path / f"ds{trial}.zarr", 6
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_racing_writer, args=(root, i, barrier, results)) for i in range(n)]
        for p in procs:
            p.start()
        errors = [e for e in (results.get(timeout=60) for _ in range(n)) if e]
        for p in procs:
            p.join()
        assert errors == []
        consolidate(root, tokenizer="toy", codebook_hash="abc")
        ds = TokenShards(root)
        assert ds.counts == {"4x4": n}
        assert ds.captions("4x4", range(n)) == [f"caption {i}" for i in range(n)]


def test_a_resolution_no_image_reaches_is_refused_and_leaves_no_index(shards_dir, tokenizer_dir, tmp_path):
    """It used to write an empty dataset and exit 0 (and megamdm-inspect-shards then crashed on it)."""
    out = tmp_path / "ds.zarr"
    r = run_preprocess([shards_dir / "00000.tar"], out, tokenizer_dir, "--resolution", 512)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no sample was kept" in r.stderr and "too_small" in r.stderr
    with pytest.raises(ShardError):
        TokenShards(out)
