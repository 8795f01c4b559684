"""Writing webdataset tar shards in the layout img2dataset produces:
``{key}.{jpg|png|webp}``, ``{key}.txt`` (caption) and ``{key}.json`` (width, height, ...), keys of 9 digits."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, samples: Iterable[tuple[str, bytes, str, str | bytes | None, dict]]) -> Path:
    """Write ``(key, image_bytes, ext, caption_or_None, meta)`` samples (a caption as text, or as the
    raw bytes of its ``.txt`` member); atomically renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as t:
        for key, data, ext, caption, meta in samples:
            add_member(t, f"{key}.{ext}", data)
            if caption is not None:
                add_member(t, f"{key}.txt", caption if isinstance(caption, bytes) else caption.encode("utf-8"))
            add_member(t, f"{key}.json", json.dumps({"key": key, "status": "success", **meta}).encode())
    os.replace(tmp, path)
    return path
