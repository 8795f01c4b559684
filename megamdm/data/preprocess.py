"""Preprocessing: webdataset tar shards -> DALI decode -> image tokenizer -> zarr token shards.

Each input tar becomes one part of the output dataset (``shards.write_part``); parts are
independent, so ranks (torchrun / srun / local worker processes) take disjoint slices of the
input shards, a rerun skips parts already complete, and a final step consolidates the index.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import multiprocessing as mp
import os
import queue as queue_lib
import signal
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import PreprocessConfig
from ..vq import codebook_hash, load_image_tokenizer, tokenizer_kind
from . import dali
from .shards import BucketBuffer, ShardError, consolidate, part_attrs, res_key, write_part


def _stem(tar: Path) -> str:
    return tar.name[: -len(".tar")] if tar.name.endswith(".tar") else tar.name


def part_name(tar: Path) -> str:
    """The tar's name and a hash of its absolute path: img2dataset names every folder's shards
    ``00000.tar``, ``00001.tar``..., so the name alone would merge different inputs."""
    return f"{_stem(tar)}-{hashlib.sha1(str(tar.resolve()).encode()).hexdigest()[:10]}"


def source_identity(tar: Path, opts: PreprocessConfig) -> dict:
    """What a part records about how it was made; a rerun must match it to reuse the part."""
    st = tar.stat()
    return {
        "source": str(tar.resolve()),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "options": _options(opts),
    }


def _options(opts: PreprocessConfig) -> dict:
    return {"resolution": opts.resolution, "aspect_buckets": opts.aspect_buckets, "crop": opts.crop}


def _bucket_keys(options: dict, downsample: int) -> set[str]:
    return {res_key(*b) for b in dali.buckets_for(options["resolution"], options["aspect_buckets"], 2 * downsample)}


def _of_tar(attrs: dict, tar: Path) -> bool:
    source = attrs.get("source")  # 0.1.x recorded the path as given, later versions the absolute one
    return source is not None and Path(source).resolve() == tar.resolve()


def _difference(had: dict | None, had_keys: set[str], want: dict, want_keys: set[str]) -> str | None:
    """How a part's options differ from this run's (None: the part is what this run would write)."""
    if had is None:  # a 0.1.x part records no options: compare the buckets it holds
        return None if had_keys <= want_keys else f"holds buckets {sorted(had_keys)} (now {sorted(want_keys)})"
    diff = [f"--{k.replace('_', '-')} {had.get(k)!r} (now {v!r})" for k, v in want.items() if had.get(k) != v]
    return f"was made with {', '.join(diff)}" if diff else None


def plan_parts(
    out: Path, tars: Sequence[Path], tokenizer, opts: PreprocessConfig, *, add_buckets: bool = False
) -> dict[Path, str]:
    """The part name each of ``tars`` still needs; a tar with a finished part made with these options
    is left out (a rerun resumes). Before anything is written, refuses parts of another codebook and
    a tar whose part was made from other contents or, unless ``add_buckets``, with other options;
    ``add_buckets`` writes a second part of the tar at bucket sizes the dataset does not hold yet.
    The plan is recorded in ``.tmp/planned/`` so that consolidation expects these parts."""
    existing = part_attrs(out)
    want_hash = codebook_hash(tokenizer.codebook())
    for name, attrs in existing.items():
        if attrs.get("codebook_hash") != want_hash:
            raise ShardError(
                f"{out} holds parts tokenised with codebook {attrs.get('codebook_hash')} (part {name}); "
                f"this tokenizer's is {want_hash}: use another --out"
            )
    want = _options(opts)
    want_keys = _bucket_keys(want, tokenizer.downsample)
    plan = {}
    for tar in tars:
        mine = {n: a for n, a in existing.items() if _of_tar(a, tar)}
        st = tar.stat()
        differences = []
        for attrs in mine.values():
            if attrs.get("source_size", st.st_size) != st.st_size or attrs.get("source_mtime_ns", st.st_mtime_ns) != (
                st.st_mtime_ns
            ):
                raise ShardError(f"{out}: the part of {tar} exists but its tar changed since; use another --out")
            had = attrs.get("options")
            had_keys = _bucket_keys(had, tokenizer.downsample) if had else set(attrs.get("counts", {}))
            diff = _difference(had, had_keys, want, want_keys)
            if diff is None:
                break
            differences.append((diff, had_keys))
        else:
            if differences and not add_buckets:
                raise ShardError(
                    f"{out}: the part of {tar} {differences[0][0]}; pass --add-buckets to add these buckets "
                    "beside it, or use another --out"
                )
            taken = sorted({k for _, keys in differences for k in keys} & want_keys)
            if taken:
                raise ShardError(
                    f"{out}: --add-buckets adds bucket sizes the dataset lacks, but {tar} is in its "
                    f"{', '.join(taken)} buckets already; use another --out"
                )
            plan[tar] = part_name(tar) + (f"-{_options_tag(want)}" if mine else "")
    planned = _planned_dir(out)
    planned.mkdir(parents=True, exist_ok=True)
    for name in plan.values():
        (planned / name).touch()
    return plan


def _planned_dir(out: Path) -> Path:
    """Where runs record the parts they will write (cleared with ``.tmp`` by consolidation)."""
    return out / ".tmp" / "planned"


def _options_tag(options: dict) -> str:
    tag = str(options["resolution"]) + ("-aspect" if options["aspect_buckets"] else "")
    return tag + ("" if options["crop"] == "center" else f"-{options['crop']}")


def preprocess_shard(tar: Path, name: str, out: Path, tokenizer, opts: PreprocessConfig, decoder: dali.Decoder) -> dict:
    """Tokenise one tar into ``out/parts/<name>``; returns counts (``written``, ``skipped``...)."""
    idx_dir = out / ".tmp" / "index"
    idx_dir.mkdir(parents=True, exist_ok=True)
    idx = idx_dir / f"{name}.idx"
    keys, truncated = dali.write_index(tar, idx)
    skipped: Counter = Counter()
    replaced: Counter = Counter()  # kept, with a value replaced
    if truncated:  # the sample being written at the cut is lost: count it
        skipped["truncated_tar"] += 1
        skipped["incomplete_sample"] += 1
    step = 2 * tokenizer.downsample
    buckets = dali.buckets_for(opts.resolution, opts.aspect_buckets, step)
    buffers: dict[str, BucketBuffer] = {}
    dev = "cuda" if opts.device == "cuda" else "cpu"
    for batch in dali.read_tar(tar, idx, keys, opts.batch_size, opts.num_threads):
        items, infos = [], []
        for s in batch:
            if not s.caption:
                skipped["missing_caption"] += 1
                continue
            replaced["non_utf8_caption"] += s.caption_replaced
            try:
                w, h = dali.image_header(s.image)
            except ValueError:
                skipped["corrupt_image"] += 1
                continue
            bucket = dali.choose_bucket(w, h, buckets)
            plan = dali.crop_plan(w, h, bucket, opts.crop, s.key)
            if plan is None:
                skipped["too_small"] += 1
                continue
            items.append((s.image, plan[0], plan[1], bucket))
            infos.append((s, (w, h), plan[1], bucket))
        decoded = decoder.decode(items)
        by_bucket: dict[tuple, list] = {}
        for img, info in zip(decoded, infos):
            if img is None:
                skipped["corrupt_image"] += 1
                continue
            by_bucket.setdefault(info[3], []).append((img, info))
        for bucket, rows in by_bucket.items():
            x = torch.from_numpy(np.stack([r[0] for r in rows])).to(dev).permute(0, 3, 1, 2).float() / 255.0
            ids = tokenizer.encode(x).cpu().numpy()
            buf = buffers.setdefault(res_key(*bucket), BucketBuffer())
            for tok, (_, (s, size, crop, _b)) in zip(ids, rows):
                score = s.meta.get("aesthetic_score", s.meta.get("score"))
                buf.add(tok, s.caption, s.key, size, crop, float(score) if isinstance(score, (int, float)) else None)
    written = sum(len(b) for b in buffers.values())
    write_part(
        out,
        name,
        buffers,
        {
            **source_identity(tar, opts),
            "samples_in": len(keys),
            "skipped": dict(skipped),
            "replaced": {k: v for k, v in replaced.items() if v},
            "tokenizer": tokenizer.name,
            "codebook_hash": codebook_hash(tokenizer.codebook()),
        },
    )
    idx.unlink(missing_ok=True)
    return {
        "name": name,
        "samples_in": len(keys),
        "written": written,
        "skipped": dict(skipped),
        "replaced": {k: v for k, v in replaced.items() if v},
    }


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a
    killed preprocessing run leaves no worker writing; elsewhere, exit if the parent is already gone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the call took effect
        os._exit(1)


def resolve_device(opts: PreprocessConfig) -> PreprocessConfig:
    """``device: auto`` as this machine's (cuda when available), and the GPU of this rank (LOCAL_RANK)."""
    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_id = opts.device_id
    if device == "cuda" and device_id is None:
        device_id = int(os.environ.get("LOCAL_RANK", 0))
    return dataclasses.replace(opts, device=device, device_id=device_id if device == "cuda" else None)


def _worker(args):
    parts, out, tok_path, opts, queue, parent = args
    die_with_parent(parent)
    torch.set_num_threads(1)
    tok = load_image_tokenizer(tokenizer_kind(tok_path), tok_path)
    if opts.device == "cuda" and hasattr(tok, "vq"):
        tok.vq.to("cuda")
    decoder = dali.Decoder(opts.device, opts.device_id, opts.batch_size, opts.num_threads)
    for tar, name in parts:
        queue.put(preprocess_shard(Path(tar), name, Path(out), tok, opts, decoder))
    queue.put(None)


def run(
    plan: dict[Path, str], out: Path, tokenizer_path: Path, opts: PreprocessConfig, *, workers: int = 1, progress: bool = True
) -> dict:
    """Write the parts of ``plan`` (tar -> part name, from :func:`plan_parts`) with ``workers`` local
    processes; returns summed counts."""
    opts = resolve_device(opts)
    out.mkdir(parents=True, exist_ok=True)
    tars = sorted((Path(t), name) for t, name in plan.items())
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    workers = max(1, min(workers, len(tars)))
    me = os.getpid()
    procs = [
        ctx.Process(target=_worker, args=((tars[i::workers], out, tokenizer_path, opts, queue, me),)) for i in range(workers)
    ]
    for p in procs:
        p.start()
    totals: Counter = Counter()
    t0, done = time.time(), 0
    bar = tqdm(total=len(tars), desc="preprocess", unit="shard", disable=not progress)
    while done < workers:
        try:
            res = queue.get(timeout=5)
        except queue_lib.Empty:  # a worker that died never sends its end marker: stop instead of waiting
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a preprocessing worker failed with exit code {failed[0]} (its error is above)") from None
            continue
        if res is None:
            done += 1
            continue
        totals["samples_in"] += res["samples_in"]
        totals["written"] += res["written"]
        for k, v in res["skipped"].items():
            totals[f"skipped_{k}"] += v
        for k, v in res.get("replaced", {}).items():
            totals[f"replaced_{k}"] += v
        bar.update(1)
        bar.set_postfix(
            samples_per_s=f"{totals['written'] / max(time.time() - t0, 1e-9):.0f}",
            skipped=sum(v for k, v in totals.items() if k.startswith("skipped_")),
        )
    bar.close()
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a preprocessing worker failed with exit code {p.exitcode}")
    totals["seconds"] = round(time.time() - t0, 2)
    return dict(totals)


def finalize(out: Path, tokenizer_path: Path, tars: Sequence[Path] | None, *, partial: bool = False) -> dict:
    """Consolidate ``out``, expecting a part of each of ``tars`` (None: unknown, with ``partial``) and
    every part a run planned (:func:`plan_parts`)."""
    tok = load_image_tokenizer(tokenizer_kind(tokenizer_path), tokenizer_path)
    planned = _planned_dir(out)
    expected = {p.name for p in planned.iterdir()} if planned.is_dir() else set()
    done = part_attrs(out)
    for tar in map(Path, tars or []):
        expected |= {n for n, a in done.items() if _of_tar(a, tar)} or {part_name(tar)}
    return consolidate(
        out,
        tokenizer=tok.name,
        codebook_hash=codebook_hash(tok.codebook()),
        expected=sorted(expected) if tars is not None or expected else None,
        partial=partial,
    )


def rank_slice(items: Sequence, rank: int, world: int) -> list:
    return list(items)[rank::world]


def env_rank() -> tuple[int, int]:
    """(rank, world) from torchrun or srun variables; (0, 1) otherwise."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1
