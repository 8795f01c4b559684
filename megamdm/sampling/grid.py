"""The one image-grid helper: training samples, the demo's picture, DPG-Bench 2x2 grids, shard previews."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def image_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    cols: int | None = None,
    scale: int = 1,
    caption_chars: int = 22,
    title: str | None = None,
    pad: int = 4,
) -> Image.Image:
    """Tile images row-major, ``pad`` pixels apart; with captions, each tile gets its (wrapped)
    caption underneath. ``pad=0`` without captions or title is a plain mosaic (a DPG-Bench grid)."""
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    w, h = w * scale, h * scale
    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, caption_chars) or [""] for c in captions] if captions else [[] for _ in images]
    text_h = (max(len(x) for x in lines) * 11 + 4) if captions else 0
    top = 16 if title else 0
    grid = Image.new("RGB", (cols * (w + pad) + pad, top + rows * (h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0), font=font)
    for k, im in enumerate(images):
        x = pad + (k % cols) * (w + pad)
        y = top + pad + (k // cols) * (h + text_h + pad)
        grid.paste(im.resize((w, h), Image.NEAREST) if scale != 1 else im, (x, y))
        for j, line in enumerate(lines[k]):
            draw.text((x, y + h + 2 + 11 * j), line, fill=(0, 0, 0), font=font)
    return grid
