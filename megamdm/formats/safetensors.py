"""Weights in safetensors files: a streaming writer of Hugging Face's sharded layout, and readers.

The writer holds at most one shard in memory, so converters stream a model of any size through it.
A truncated or corrupt file is one ``CheckpointError``; no pickle is ever read.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30


class ShardedSafetensorsWriter:
    """Writes tensors as they come into shards of at most ``max_shard_bytes`` (HF index layout),
    holding at most one shard in memory: converters stream through it."""

    def __init__(self, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES, metadata=None):
        self.dir = Path(directory)
        self.max = max_shard_bytes
        self.meta = metadata or {}
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buf and self.buf_bytes + nbytes > self.max:
            self._flush()
        self.buf[name] = tensor.detach().contiguous().cpu()
        self.buf_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        k = len(self.files) + 1
        save_file(self.buf, str(self.dir / f"shard-{k:05d}.tmp"), metadata=self.meta)
        self.files.append(list(self.buf))
        self.buf, self.buf_bytes = {}, 0

    def close(self) -> None:
        if self.buf or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.dir / "shard-00001.tmp", self.dir / WEIGHTS_FILE)
            return
        weight_map = {}
        for k, names in enumerate(self.files, 1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{k:05d}.tmp", self.dir / fname)
            weight_map.update({nm: fname for nm in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


@contextlib.contextmanager
def open_weights(path: Path, device: str = "cpu"):
    """``safe_open`` with a truncated or corrupt file as one :class:`CheckpointError`."""
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a complete safetensors file ({str(e).splitlines()[0]}); re-download or re-convert it"
        ) from None


class LazyTensors:
    """``get(name)``: a tensor of a set of safetensors files, read when asked for (cast to ``dtype``),
    each file opened once; ``files`` maps tensor names to files."""

    def __init__(self, files: Mapping[str, Path], dtype: torch.dtype | None = None):
        self.files, self.dtype = files, dtype
        self._handles: dict[Path, object] = {}

    def __call__(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        t = self._handles[path].get_tensor(name)
        return t.to(self.dtype) if self.dtype is not None else t
