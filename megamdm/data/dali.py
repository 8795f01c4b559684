"""NVIDIA DALI pipelines for preprocessing img2dataset webdataset shards.

Reading: ``fn.readers.webdataset`` over each tar with an index we write ourselves (DALI's
``wds2idx`` format). Building the index with ``tarfile`` lets a truncated tar keep every complete
sample and report the cut, where DALI would fail on the whole shard.

Checking, in Python, before anything is decoded: a missing caption, an unreadable image header,
a structurally cut file (no JPEG EOI / PNG IEND / short WebP RIFF), and an image smaller than its
bucket are skipped and counted.

Decoding: ``fn.decoders.image`` (``mixed`` = nvJPEG on GPU machines with ``device_id``; ``cpu``
with ``device_id=None`` elsewhere), then ``fn.resize`` and ``fn.crop`` with per-sample sizes and
positions computed here, so the crop written into the micro-conditioning is exactly the one
applied. DALI fails a whole batch on a corrupt image and the pipeline must be rebuilt; the batch
is then redone one sample at a time to find and count the bad ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    key: str
    image: bytes
    caption: str | None
    meta: dict
    caption_replaced: bool = False  # the caption was not UTF-8: undecodable bytes became U+FFFD


def split_name(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``), as webdataset groups components."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def write_index(tar_path: Path, idx_path: Path) -> tuple[list[str], bool]:
    """Write a DALI webdataset index for the complete samples of ``tar_path``.

    Returns the sample keys in order and whether the tar was cut short (then the one sample being
    written at the cut is incomplete and dropped). A sample is complete when a later member starts a
    new sample, or when it has every component the tar's first sample had (img2dataset writes the
    same ones for each): a cut inside the next sample's first member keeps the one before it."""
    size = tar_path.stat().st_size
    samples: dict[str, list[str]] = {}
    exts: dict[str, set[str]] = {}
    order: list[str] = []
    truncated, cut_base, end = False, None, 0
    try:
        with tarfile.open(tar_path, "r:") as t:
            for m in t:
                end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not m.isreg():
                    continue
                base, ext = split_name(m.name)
                if m.offset_data + m.size > size:
                    truncated, cut_base = True, base
                    break
                if not base or base.endswith("/") or not ext:
                    continue
                if base not in samples:
                    samples[base] = []
                    exts[base] = set()
                    order.append(base)
                samples[base].append(f"{ext} {m.offset_data} {m.size} {m.name}")
                exts[base].add(ext)
    except (tarfile.ReadError, EOFError, OSError):
        truncated = True
    # tarfile ends quietly at a cut header: a complete tar ends with two zero blocks after its last member
    truncated = truncated or size < end + 2 * tarfile.BLOCKSIZE
    if truncated and order:
        last = order[-1]
        layout = exts[order[0]] if len(order) > 1 else set()
        if cut_base == last or not (layout and exts[last] >= layout):
            order.pop()  # the cut fell inside it, or it lacks components the others have
    idx_path.write_text(f"v1.2 {len(order)}\n" + "".join(" ".join(samples[k]) + "\n" for k in order))
    return order, truncated


def read_tar(
    tar_path: Path, idx_path: Path, keys: list[str], batch_size: int = 64, num_threads: int = 2
) -> Iterator[list[RawSample]]:
    """Raw samples of one tar through DALI's webdataset reader, in index order."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    if not keys:
        return

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, prefetch_queue_depth=2)
    def reader():
        img, txt, meta = fn.readers.webdataset(
            paths=[str(tar_path)],
            index_paths=[str(idx_path)],
            ext=[";".join(IMAGE_EXTS), "txt", "json"],
            missing_component_behavior="empty",
            dtypes=[types.UINT8] * 3,
            random_shuffle=False,
            pad_last_batch=True,
            name="reader",
        )
        return img, txt, meta

    pipe = reader()
    pipe.build()
    n = len(keys)
    for start in range(0, n, batch_size):
        img, txt, meta = pipe.run()
        batch = []
        for j in range(min(batch_size, n - start)):
            raw_cap = bytes(np.asarray(txt[j]))
            try:
                cap, replaced = raw_cap.decode("utf-8").strip(), False
            except UnicodeDecodeError:
                cap, replaced = raw_cap.decode("utf-8", errors="replace").strip(), True
            raw_meta = bytes(np.asarray(meta[j]))
            try:
                m = json.loads(raw_meta) if raw_meta else {}
            except json.JSONDecodeError:
                m = {}
            meta_d = m if isinstance(m, dict) else {}
            batch.append(RawSample(keys[start + j], bytes(np.asarray(img[j])), cap or None, meta_d, replaced))
        yield batch


def image_header(data: bytes) -> tuple[int, int]:
    """(width, height) from the header; raises ValueError for unreadable or cut-off files."""
    from PIL import Image

    if not data:
        raise ValueError("no image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, size = im.format, im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ValueError(f"unreadable image header ({type(e).__name__})") from None
    tail = data.rstrip(b"\x00")
    if fmt == "JPEG" and not tail.endswith(b"\xff\xd9"):
        raise ValueError("JPEG without end-of-image marker (truncated)")
    if fmt == "PNG" and b"IEND" not in data[-16:]:
        raise ValueError("PNG without IEND chunk (truncated)")
    if fmt == "WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        raise ValueError("WebP shorter than its RIFF size (truncated)")
    return size


def buckets_for(resolution: int, aspect: bool, step: int) -> list[tuple[int, int]]:
    """(height, width) buckets: the square, or with ``aspect`` sizes of about the same area with
    aspect ratios from 1:2 to 2:1, every side a multiple of ``step`` (2 f)."""
    if not aspect:
        return [(resolution, resolution)]
    area = resolution * resolution
    out = set()
    h = step
    while h <= 2 * resolution:
        w = max(step, round(area / h / step) * step)
        if 0.5 <= w / h <= 2.0:
            out.add((h, w))
        h += step
    return sorted(out)


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ar = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ar))


def crop_plan(width: int, height: int, bucket: tuple[int, int], mode: str, key: str):
    """Resize size (rh, rw) covering the bucket and the crop (top, left); None if the image is
    smaller than the bucket. ``random`` crops are deterministic per sample key."""
    bh, bw = bucket
    if width < bw or height < bh:
        return None
    scale = max(bh / height, bw / width)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    if mode == "center":
        top, left = (rh - bh) // 2, (rw - bw) // 2
    elif mode == "random":
        r = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        top, left = int(r.integers(0, rh - bh + 1)), int(r.integers(0, rw - bw + 1))
    else:
        raise ValueError(f"unknown crop mode {mode!r}; allowed: center, random")
    return (rh, rw), (top, left)


class Decoder:
    """DALI decode -> resize -> crop of encoded images, with per-sample sizes and crops."""

    def __init__(self, device: str = "cpu", device_id: int | None = None, batch_size: int = 64, num_threads: int = 2):
        self.device, self.device_id = device, device_id
        self.batch_size, self.num_threads = batch_size, num_threads
        self.pipe = None

    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        gpu = self.device == "cuda"

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id if gpu else None,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8)
            size = fn.external_source(name="size", dtype=types.FLOAT)  # (rh, rw)
            crop = fn.external_source(name="crop", dtype=types.FLOAT)  # (bh, bw)
            pos = fn.external_source(name="pos", dtype=types.FLOAT)  # relative (y, x)
            im = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
            im = fn.resize(im, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.crop(im, crop=crop, crop_pos_y=pos[0], crop_pos_x=pos[1])

        self.pipe = pipe()
        self.pipe.build()

    def _run(self, items):
        if self.pipe is None:
            self._build()
        enc, size, crop, pos = [], [], [], []
        for data, (rh, rw), (top, left), (bh, bw) in items:
            enc.append(np.frombuffer(data, dtype=np.uint8))
            size.append(np.array([rh, rw], dtype=np.float32))
            crop.append(np.array([bh, bw], dtype=np.float32))
            pos.append(np.array([top / max(rh - bh, 1), left / max(rw - bw, 1)], dtype=np.float32))
        for name, val in (("enc", enc), ("size", size), ("crop", crop), ("pos", pos)):
            self.pipe.feed_input(name, val)
        (out,) = self.pipe.run()
        if self.device == "cuda":
            out = out.as_cpu()
        return [np.array(out[i]) for i in range(len(items))]

    def decode(self, items) -> list[np.ndarray | None]:
        """``items``: (bytes, resize (rh, rw), crop (top, left), bucket (bh, bw)). HWC uint8 per
        item, or None for an image DALI cannot decode."""
        out: list[np.ndarray | None] = []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s : s + self.batch_size]
            try:
                out += self._run(chunk)
            except RuntimeError:
                self.pipe = None  # a failed DALI pipeline cannot run again
                for it in chunk:
                    try:
                        out += self._run([it])
                    except RuntimeError:
                        self.pipe = None
                        out.append(None)
        return out
