"""Token shards (docs/design.md §3): tokenised images + captions in a zarr v3 store.

    dataset.zarr/                     root group; attrs: schema, tokenizer, codebook hash, the index
      parts/<name>/                   one group per input tar shard (written by one preprocessing rank)
        tokens/<H>x<W>                uint32 [N, h, w]; one chunk per sample inside shards of 256 (zstd)
        captions/<H>x<W>/bytes        uint8 [total] UTF-8, + captions/<H>x<W>/offsets int64 [N+1]
        keys/<H>x<W>/bytes|offsets    the source sample keys, same layout
        meta/<H>x<W>/orig_size        int32 [N, 2] (width, height) of the source image
        meta/<H>x<W>/crop             int32 [N, 2] (top, left) of the crop in the resized image
        meta/<H>x<W>/score            float32 [N] aesthetic score (NaN when unknown)

Ragged data is flat bytes + offsets so zarr-python and tensorstore both read it. A part appears
under ``parts/`` only when complete (it is written elsewhere and renamed), so a rerun skips
finished parts and redoes interrupted ones. :func:`consolidate` writes the index into the root
attrs. Tokens keep the tokenizer's own ids; the GCE permutation is applied at load time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MegamdmError

SCHEMA = "megamdm-token-shards"
SCHEMA_VERSION = 1
SHARD_SAMPLES = 256
FIELDS = ("tokens", "captions", "keys", "orig_size", "crop", "score")  # what TokenShards.read returns


class ShardError(MegamdmError):
    """A token-shard dataset is missing, incomplete, or does not fit the configured tokenizer."""


def res_key(height: int, width: int) -> str:
    return f"{height}x{width}"


def parse_res(key: str) -> tuple[int, int]:
    h, w = key.split("x")
    return int(h), int(w)


@dataclass
class BucketBuffer:
    """Samples of one resolution of one part, accumulated before writing."""

    tokens: list = field(default_factory=list)
    captions: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    orig_size: list = field(default_factory=list)
    crop: list = field(default_factory=list)
    score: list = field(default_factory=list)

    def add(self, tokens: np.ndarray, caption: str, key: str, orig_size, crop, score: float | None) -> None:
        self.tokens.append(np.asarray(tokens, dtype=np.uint32))
        self.captions.append(caption)
        self.keys.append(key)
        self.orig_size.append(tuple(orig_size))
        self.crop.append(tuple(crop))
        self.score.append(np.nan if score is None else float(score))

    def __len__(self) -> int:
        return len(self.tokens)


def _ragged(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(enc) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in enc])
    return np.frombuffer(b"".join(enc), dtype=np.uint8).copy(), offsets


def _create(group, name: str, data: np.ndarray, chunks, shards=None):
    from zarr.codecs import ZstdCodec

    arr = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards, compressors=ZstdCodec(level=3)
    )
    if data.size:
        arr[...] = data
    return arr


def _ensure_group(path: Path) -> None:
    """Create the zarr group at ``path`` unless it exists. Workers and ranks writing parts into one
    dataset race here: ``mode="a"`` checks, then creates, and fails if another created it between."""
    import zarr
    from zarr.errors import ContainsGroupError

    try:
        zarr.open_group(str(path), mode="a")
    except ContainsGroupError:
        pass


def write_part(root, name: str, buckets: dict[str, BucketBuffer], attrs: dict) -> Path:
    """Write one complete part and publish it under ``parts/<name>`` with an atomic rename."""
    import zarr

    root = Path(root)
    _ensure_group(root)
    _ensure_group(root / "parts")
    tmp = root / ".tmp" / name
    if tmp.exists():
        shutil.rmtree(tmp)
    g = zarr.open_group(str(tmp), mode="w")
    counts = {}
    for rk, buf in buckets.items():
        if not len(buf):
            continue
        h, w = buf.tokens[0].shape
        n = len(buf)
        toks = np.stack(buf.tokens)
        _create(g, f"tokens/{rk}", toks, chunks=(1, h, w), shards=(min(SHARD_SAMPLES, n), h, w))
        for kind, strings in (("captions", buf.captions), ("keys", buf.keys)):
            flat, offsets = _ragged(strings)
            _create(g, f"{kind}/{rk}/bytes", flat, chunks=(max(1, min(65536, flat.size)),))
            _create(g, f"{kind}/{rk}/offsets", offsets, chunks=(n + 1,))
        _create(g, f"meta/{rk}/orig_size", np.asarray(buf.orig_size, dtype=np.int32).reshape(n, 2), chunks=(n, 2))
        _create(g, f"meta/{rk}/crop", np.asarray(buf.crop, dtype=np.int32).reshape(n, 2), chunks=(n, 2))
        _create(g, f"meta/{rk}/score", np.asarray(buf.score, dtype=np.float32), chunks=(n,))
        counts[rk] = n
    g.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "counts": counts, **attrs})
    final = root / "parts" / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def part_done(root, name: str) -> bool:
    return (Path(root) / "parts" / name / "zarr.json").is_file()


def read_part_attrs(root, name: str) -> dict | None:
    """The attributes of part ``name``, or None while it is not complete."""
    if not part_done(root, name):
        return None
    return json.loads((Path(root) / "parts" / name / "zarr.json").read_text()).get("attributes", {})


def part_attrs(root) -> dict[str, dict]:
    """The attributes of every complete part, by part name (in name order)."""
    parts = Path(root) / "parts"
    if not parts.is_dir():
        return {}
    found = {p.name: read_part_attrs(root, p.name) for p in sorted(parts.iterdir())}
    return {k: v for k, v in found.items() if v is not None}


def consolidate(root, *, tokenizer: str, codebook_hash: str, expected: list[str] | None = None, partial=False) -> dict:
    """Write the dataset index (parts, per-resolution counts, skip counts) into the root attrs.

    ``expected``: the part names the inputs make (None: the parts there are all there should be); a
    missing one is refused unless ``partial``, which the index then records (``partial: true``,
    ``missing_parts``) for the loader and inspect_shards."""
    import zarr

    root = Path(root)
    parts_dir = root / "parts"
    if not parts_dir.is_dir():
        raise ShardError(f"{root}: no parts/ directory; nothing was preprocessed")
    done = part_attrs(root)
    missing = sorted(set(expected or []) - set(done))
    if missing and not partial:
        raise ShardError(
            f"{root}: {len(missing)} of {len(expected)} parts are not finished (first: {missing[0]}); rerun "
            "preprocessing for them, or pass --partial to index the finished ones and mark the dataset partial"
        )
    parts, totals, skipped, replaced = [], {}, {}, {}
    for name, attrs in done.items():
        if attrs.get("codebook_hash") != codebook_hash:
            raise ShardError(
                f"{parts_dir / name}: written with codebook {attrs.get('codebook_hash')}, expected {codebook_hash}"
            )
        parts.append({"name": name, "counts": attrs["counts"]})
        for rk, n in attrs["counts"].items():
            totals[rk] = totals.get(rk, 0) + n
        for k, v in attrs.get("skipped", {}).items():
            skipped[k] = skipped.get(k, 0) + v
        for k, v in attrs.get("replaced", {}).items():
            replaced[k] = replaced.get(k, 0) + v
    if parts and not sum(totals.values()):
        why = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())) or "none were read"
        raise ShardError(
            f"{root}: no sample was kept (skipped: {why}); no index written. With 'too_small', the images are "
            "smaller than --resolution: preprocess at a resolution they reach"
        )
    g = zarr.open_group(str(root), mode="a")
    index = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "tokenizer": tokenizer,
        "codebook_hash": codebook_hash,
        "parts": parts,
        "totals": totals,
        "skipped": skipped,
        "replaced": replaced,  # samples kept with a value replaced (a non-UTF-8 caption's bad bytes)
        "partial": bool(missing),
        "missing_parts": missing,
    }
    g.attrs.update(index)
    shutil.rmtree(root / ".tmp", ignore_errors=True)
    return index


# ---- reading ------------------------------------------------------------------------------------
def _have_tensorstore() -> bool:
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return False
    return True


class _Array:
    """One zarr array read by tensorstore (fast random access) or zarr-python."""

    def __init__(self, path: Path, backend: str):
        self.path, self.backend = path, backend
        if backend == "tensorstore":
            import tensorstore as ts

            self.a = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, read=True).result()
        else:
            import zarr

            self.a = zarr.open_array(str(path), mode="r")

    def take(self, idx: np.ndarray) -> Callable[[], np.ndarray]:
        """Start reading rows ``idx`` (sorted or not) along the first axis; call the result for them.
        tensorstore reads run in the background until then; zarr-python reads at once."""
        if self.backend == "tensorstore":
            fut = self.a[idx].read()
            return lambda: np.asarray(fut.result())
        order = np.argsort(idx, kind="stable")
        out = self.a.get_orthogonal_selection((idx[order],))
        res = np.empty_like(out)
        res[order] = out
        return lambda: res

    def range(self, start: int, stop: int) -> Callable[[], np.ndarray]:
        if self.backend == "tensorstore":
            fut = self.a[start:stop].read()
            return lambda: np.asarray(fut.result())
        res = self.a[start:stop]
        return lambda: res

    def all(self) -> np.ndarray:
        return self.range(0, self.a.shape[0])()


class TokenShards:
    """Random access to a consolidated token-shard dataset.

    ``backend``: ``"tensorstore"`` (default when installed; 25-60x faster random reads here) or
    ``"zarr"``. ``codebook_hash``: refuse a dataset written with another tokenizer."""

    def __init__(self, root, *, backend: str | None = None, codebook_hash: str | None = None):
        self.root = Path(root)
        zj = self.root / "zarr.json"
        if not zj.is_file():
            raise ShardError(f"{self.root}: not a zarr token-shard dataset (no zarr.json)")
        attrs = json.loads(zj.read_text()).get("attributes", {})
        if attrs.get("schema") != SCHEMA:
            raise ShardError(
                f"{self.root}: no consolidated index: its preprocessing has not finished (rerun it with the same "
                "--input; it resumes), or index what is there with --consolidate --input ... [--partial]"
            )
        if int(attrs["schema_version"]) > SCHEMA_VERSION:
            raise ShardError(f"{self.root}: schema version {attrs['schema_version']} is newer than this megamdm")
        if codebook_hash is not None and attrs["codebook_hash"] != codebook_hash:
            raise ShardError(
                f"{self.root} was tokenised with {attrs['tokenizer']} (codebook {attrs['codebook_hash']}), but the "
                f"configured image tokenizer has codebook {codebook_hash}; re-run preprocessing with this tokenizer"
            )
        self.attrs = attrs
        self.missing_parts: list[str] = list(attrs.get("missing_parts", []))
        self.partial = bool(attrs.get("partial"))
        self.backend = backend or ("tensorstore" if _have_tensorstore() else "zarr")
        if self.backend not in ("tensorstore", "zarr"):
            raise ValueError(f"unknown backend {self.backend!r}; allowed: tensorstore, zarr")
        self.counts: dict[str, int] = dict(attrs["totals"])
        # per resolution: part names and their cumulative sample counts
        self._parts: dict[str, list[str]] = {}
        self._cum: dict[str, np.ndarray] = {}
        for rk in self.counts:
            names = [p["name"] for p in attrs["parts"] if p["counts"].get(rk)]
            sizes = [p["counts"][rk] for p in attrs["parts"] if p["counts"].get(rk)]
            self._parts[rk] = names
            self._cum[rk] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._arrays: dict[tuple, _Array] = {}
        self._offsets: dict[tuple, np.ndarray] = {}

    @property
    def resolutions(self) -> list[str]:
        return sorted(self.counts, key=lambda k: parse_res(k))

    def __getstate__(self):  # open arrays lazily again in each worker process
        state = dict(self.__dict__)
        state["_arrays"], state["_offsets"] = {}, {}
        return state

    def _array(self, part: str, name: str) -> _Array:
        key = (part, name)
        if key not in self._arrays:
            self._arrays[key] = _Array(self.root / "parts" / part / name, self.backend)
        return self._arrays[key]

    def _locate(self, rk: str, idx: np.ndarray):
        cum = self._cum[rk]
        if len(idx) and (idx.min() < 0 or idx.max() >= cum[-1]):
            raise IndexError(f"sample index out of range for {rk} ({cum[-1]} samples)")
        pi = np.searchsorted(cum, idx, side="right") - 1
        return pi, idx - cum[pi]

    def read(self, rk: str, idx, fields: Sequence[str] = FIELDS) -> dict[str, list]:
        """Per-sample values of ``fields`` (of :data:`FIELDS`) for samples ``idx`` of resolution ``rk``.
        Every read is started before any is awaited: one at a time, tensorstore's ~0.3 ms per read
        added up to ~20 ms per CPU training step (a micro-batch touches ~12 parts x 5 fields)."""
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown token-shard fields {sorted(unknown)}; allowed: {', '.join(FIELDS)}")
        idx = np.asarray(idx, dtype=np.int64)
        pi, local = self._locate(rk, idx)
        pending = []
        for p in np.unique(pi):
            sel = np.nonzero(pi == p)[0]
            part = self._parts[rk][p]
            for name in fields:
                pending.append((name, sel, self._start(part, rk, name, local[sel])))
        out = {name: [None] * len(idx) for name in fields}
        for name, sel, get in pending:
            for j, v in zip(sel, get()):
                out[name][j] = v
        return out

    def _start(self, part: str, rk: str, name: str, li: np.ndarray) -> Callable[[], Sequence]:
        if name == "tokens":
            return self._array(part, f"tokens/{rk}").take(li)
        if name in ("orig_size", "crop", "score"):
            return self._array(part, f"meta/{rk}/{name}").take(li)
        key = (part, f"{name}/{rk}")
        if key not in self._offsets:
            self._offsets[key] = self._array(part, f"{name}/{rk}/offsets").all()
        off = self._offsets[key]
        arr = self._array(part, f"{name}/{rk}/bytes")
        gets = [arr.range(int(off[i]), int(off[i + 1])) for i in li]
        return lambda: [bytes(g()).decode("utf-8") for g in gets]

    def tokens(self, rk: str, idx) -> np.ndarray:
        """``[k, h, w]`` uint32 token grids (tokenizer order)."""
        return np.stack(self.read(rk, idx, ("tokens",))["tokens"])

    def captions(self, rk: str, idx) -> list[str]:
        return self.read(rk, idx, ("captions",))["captions"]

    def keys(self, rk: str, idx) -> list[str]:
        return self.read(rk, idx, ("keys",))["keys"]

    def meta(self, rk: str, idx) -> dict[str, np.ndarray]:
        got = self.read(rk, idx, ("orig_size", "crop", "score"))
        return {name: np.stack(v) for name, v in got.items()}
