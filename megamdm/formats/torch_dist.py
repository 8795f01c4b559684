"""Reading megatron-core ``torch_dist`` checkpoints one global tensor at a time, with no megatron-core
and no process group; and the keys of the EMA weights that training saves beside the model's.

``training/ema.py`` writes each rank's EMA ranges as 1-D boxes ``ema:<key>:<offset>:<shape>``
(:func:`ema_key`); :func:`load_ema_region` assembles any box of a model tensor from whatever boxes
overlap it, so the EMA loads at any layout, and conversion exports it.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..errors import ConversionError

EMA_PREFIX = "ema:"


class TorchDistReader:
    """Reads global tensors of a megatron ``torch_dist`` checkpoint one key at a time."""

    def __init__(self, directory):
        self.dir = Path(directory)
        if not (self.dir / ".metadata").is_file():
            raise ConversionError(f"{self.dir}: not a torch_dist checkpoint (no .metadata)")
        self.reader = FileSystemReader(str(self.dir))
        try:
            md = self.reader.read_metadata()
        except Exception as e:  # noqa: BLE001 - a cut or foreign .metadata: any unpickling error
            raise ConversionError(
                f"{self.dir}/.metadata cannot be read ({type(e).__name__}); the checkpoint is damaged"
            ) from None
        self.meta = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        files = {getattr(info, "relative_path", None) for info in (md.storage_data or {}).values()} - {None}
        missing = sorted(f for f in files if not (self.dir / f).is_file())
        if missing:
            raise ConversionError(
                f"{self.dir}: {len(missing)} of its {len(files)} shard files are missing ({missing[0]}, ...); the "
                "checkpoint is incomplete"
            )

    def keys(self) -> list[str]:
        return list(self.meta)

    @functools.cached_property
    def ema_boxes(self) -> dict[str, list[tuple[str, tuple, tuple]]]:
        """The saved EMA boxes of each model key: ``(checkpoint key, offset, shape)`` (:func:`ema_key`)."""
        boxes: dict[str, list] = {}
        for k in self.meta:
            if k.startswith(EMA_PREFIX):
                key, off, shp = k[len(EMA_PREFIX) :].rsplit(":", 2)
                boxes.setdefault(key, []).append((k, tuple(map(int, off.split(","))), tuple(map(int, shp.split(",")))))
        return boxes

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        md = self.meta[key]
        t = torch.empty(md.size, dtype=md.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp.load({key: t}, storage_reader=self.reader, no_dist=True)
            except (OSError, EOFError, RuntimeError, ValueError, dcp.api.CheckpointException) as e:
                raise ConversionError(
                    f"{self.dir}: cannot read {key} ({type(e).__name__}); a shard file is cut short or damaged"
                ) from None
        return t if dtype is None else t.to(dtype)


def ema_key(key: str, offset: Sequence[int], shape: Sequence[int]) -> str:
    """The checkpoint key of the EMA of box ``offset``/``shape`` of model tensor ``key`` (a 1-D tensor)."""
    return f"{EMA_PREFIX}{key}:{','.join(map(str, offset))}:{','.join(map(str, shape))}"


def has_ema(reader: TorchDistReader) -> bool:
    return bool(reader.ema_boxes)


def load_ema_region(reader: TorchDistReader, key: str, offset: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The EMA of the box ``offset``/``shape`` of model tensor ``key`` (fp32), assembled from the saved
    boxes that overlap it, whatever the layout they were saved at."""
    out = torch.empty(tuple(shape), dtype=torch.float32)
    covered = 0
    for saved, o, sh in reader.ema_boxes.get(key, []):
        lo = [max(a, b) for a, b in zip(o, offset)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(o, sh, offset, shape)]
        if any(x >= y for x, y in zip(lo, hi)):
            continue
        t = reader.load(saved).view(sh)
        out[tuple(slice(x - b, y - b) for x, y, b in zip(lo, hi, offset))] = t[
            tuple(slice(x - a, y - a) for x, y, a in zip(lo, hi, o))
        ]
        covered += math.prod(y - x for x, y in zip(lo, hi))
    if covered != math.prod(shape):
        raise ConversionError(f"{reader.dir}: the EMA weights of {key} are missing or incomplete")
    return out
