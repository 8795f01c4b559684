"""ShapesWorld: a tiny text-to-image world with a pixel-exact evaluator.

Images are 64x64 RGB on white with one or two non-overlapping filled objects: a circle, a square or
an upright isosceles triangle, 16-24 px wide, in one of six colours. Captions are
``"a {color} {shape}"`` or ``"a {color} {shape} {left of|right of|above|below} a {color} {shape}"``;
the relation is between the objects' centres: the larger of the horizontal and vertical offsets
decides and it is at least 12 px. Two objects always differ in colour or shape.

The evaluator finds objects from pixels (nearest palette colour, connected components), names the
shape by how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2) and checks
count, colours, shapes and the relation. A prompt counts only if all of it is right.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.webdataset import write_shard

SIZE = 64
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
MIN_SIDE, MAX_SIDE = 16, 24
MIN_OFFSET = 12  # px between centres along the deciding axis
GAP = 2  # px between the objects' boxes, so touching same-coloured objects stay separable


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    x: int  # bounding box, top-left
    y: int
    side: int

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.side / 2, self.y + self.side / 2


def relation(a: Obj, b: Obj) -> str | None:
    """How ``a`` stands to ``b``, or None when the offset is too small to say."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    if max(abs(dx), abs(dy)) < MIN_OFFSET or abs(dx) == abs(dy):
        return None
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def caption(objs: Sequence[Obj]) -> str:
    if len(objs) == 1:
        return f"a {objs[0].color} {objs[0].shape}"
    a, b = objs
    return f"a {a.color} {a.shape} {relation(a, b)} a {b.color} {b.shape}"


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """``"a red circle left of a blue square"`` -> ([("red", "circle"), ("blue", "square")], "left of")."""
    words = text.strip().split()
    if len(words) == 3 and words[0] == "a":
        return [(words[1], words[2])], None
    for rel in RELATIONS:
        r = rel.split()
        n = len(r)
        if len(words) == 6 + n and words[0] == "a" and words[3 : 3 + n] == r and words[3 + n] == "a":
            return [(words[1], words[2]), (words[4 + n], words[5 + n])], rel
    raise ValueError(f"not a ShapesWorld caption: {text!r}")


def render(objs: Sequence[Obj]) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for o in objs:
        c = COLORS[o.color]
        x0, y0, x1, y1 = o.x, o.y, o.x + o.side - 1, o.y + o.side - 1
        if o.shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=c)
        elif o.shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=c)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=c)
    return im


def _random_obj(rng: random.Random) -> Obj:
    side = rng.randint(MIN_SIDE, MAX_SIDE)
    return Obj(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randint(0, SIZE - side), rng.randint(0, SIZE - side), side)


def _apart(a: Obj, b: Obj) -> bool:
    return a.x + a.side + GAP <= b.x or b.x + b.side + GAP <= a.x or a.y + a.side + GAP <= b.y or b.y + b.side + GAP <= a.y


def sample_scene(rng: random.Random, two_prob: float = 0.6, exclude: frozenset = frozenset()) -> list[Obj]:
    """One scene; captions in ``exclude`` are never produced (held-out prompts)."""
    two = rng.random() < two_prob
    while True:
        a = _random_obj(rng)
        if not two:
            objs = [a]
        else:
            b = _random_obj(rng)
            if (a.color, a.shape) == (b.color, b.shape) or not _apart(a, b) or relation(a, b) is None:
                continue
            objs = [a, b]
        if caption(objs) not in exclude:
            return objs


def scenes(seed: int, n: int, two_prob: float = 0.6, exclude: frozenset = frozenset()) -> Iterator[list[Obj]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield sample_scene(rng, two_prob, exclude)


def heldout_prompts(seed: int, n_single: int, n_double: int) -> tuple[list[str], list[str]]:
    """Evaluation prompts: single-object captions, and two-object captions to keep out of training."""
    rng = random.Random(seed)
    singles = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    rng.shuffle(singles)
    doubles: set[str] = set()
    while len(doubles) < n_double:
        objs = sample_scene(rng, two_prob=1.0)
        doubles.add(caption(objs))
    return singles[:n_single], sorted(doubles)


def png_bytes(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def write_shards(
    out_dir, seed: int, n: int, per_shard: int = 1000, two_prob: float = 0.6, exclude: frozenset = frozenset(), progress=None
) -> list:
    """ShapesWorld as img2dataset-layout webdataset shards (PNG + caption + json)."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    it = scenes(seed, n, two_prob, exclude)
    paths = []
    for s in range((n + per_shard - 1) // per_shard):
        k = min(per_shard, n - s * per_shard)
        samples = []
        for i in range(k):
            objs = next(it)
            key = f"{s:05d}{i:04d}"
            meta = {
                "width": SIZE,
                "height": SIZE,
                "original_width": SIZE,
                "original_height": SIZE,
                "objects": [o.__dict__ for o in objs],
            }
            samples.append((key, png_bytes(render(objs)), "png", caption(objs), meta))
            if progress is not None:
                progress.update(1)
        paths.append(write_shard(out_dir / f"{s:05d}.tar", samples))
    return paths


# ---- GCE groups over the demo tokenizer's codebook ---------------------------------------------
def grouping_features(codebook, ink_weight: float = 8.0):
    """Features for building GCE groups over a k-means patch codebook ``[V, 3*f*f]`` in [0, 1].

    Raw patch pixels put the same edge in different colours next to each other (mostly white), so
    groups built on them would reward the wrong colour. Appending each code's mean ink colour
    (its non-white pixels; white for background codes), scaled by ``ink_weight``, keeps groups
    colour-pure."""
    cb = codebook.detach().float()
    pix = cb.reshape(cb.shape[0], 3, -1)  # [V, 3, f*f]
    ink = (pix.sum(1) < 2.9).float().unsqueeze(1)  # [V, 1, f*f]: pixels visibly off white
    n = ink.sum(-1)
    mean = torch.where(n > 0, (pix * ink).sum(-1) / n.clamp(min=1), torch.ones_like(n))
    return torch.cat([cb, ink_weight * mean], dim=1)


# ---- evaluation ---------------------------------------------------------------------------------
PALETTE = np.array([(255, 255, 255), *COLORS.values()], dtype=np.float32)
NAMES = ["white", *COLORS]
MIN_AREA = 64  # px, half the smallest triangle; smaller blobs are decoding noise


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask)
    comps = []
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys, xs):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.array(pts))
    return comps


@dataclass
class Detection:
    color: str
    shape: str
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
    fill: float


def classify_shape(pts: np.ndarray) -> tuple[str, float, tuple]:
    y0, x0 = pts.min(0)
    y1, x1 = pts.max(0)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    fill = len(pts) / float(w * h)
    if fill > 0.9:
        shape = "square"
    elif fill > 0.64:
        shape = "circle"
    else:
        shape = "triangle"
    return shape, fill, (int(x0), int(y0), int(x1), int(y1))


def detect(image) -> list[Detection]:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    d = ((arr[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    label = d.argmin(-1)
    label[np.sqrt(d.min(-1)) > 60] = 0  # pixels far from every palette colour: background
    out = []
    for ci, name in enumerate(NAMES[1:], start=1):
        for pts in _components(label == ci):
            if len(pts) < MIN_AREA:
                continue
            shape, fill, bbox = classify_shape(pts)
            out.append(Detection(name, shape, ((bbox[0] + bbox[2] + 1) / 2, (bbox[1] + bbox[3] + 1) / 2), bbox, fill))
    return out


def _rel(a: Detection, b: Detection) -> str | None:
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if max(abs(dx), abs(dy)) < MIN_OFFSET / 2 or abs(dx) == abs(dy):
        return None
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def score(image, text: str) -> dict:
    """Whether ``image`` shows exactly what ``text`` says: counts, colours, shapes and the relation.
    The relation is judged like the generator's, with half its minimum offset (6 px) of tolerance.
    A prompt that is not a ShapesWorld caption is marked ``unscorable`` (and not correct)."""
    try:
        want, rel = parse_caption(text)
    except ValueError:
        return {"prompt": text, "detected": [], "correct": False, "unscorable": True}
    dets = detect(image)
    res = {"prompt": text, "detected": [(x.color, x.shape) for x in dets], "correct": False}
    if sorted((x.color, x.shape) for x in dets) != sorted(want):
        return res
    if rel is None:
        res["correct"] = True
        return res
    a = next(x for x in dets if (x.color, x.shape) == want[0])
    b = next(x for x in dets if (x.color, x.shape) == want[1] and x is not a)
    res["relation"] = _rel(a, b)
    res["correct"] = res["relation"] == rel
    return res


def summarize(results: Sequence[dict]) -> dict:
    """Accuracy over single-object prompts, two-object prompts and all (prompts that are not
    ShapesWorld captions are counted apart, in ``n_unscorable``)."""
    scored = [r for r in results if not r.get("unscorable")]
    singles = [r["correct"] for r in scored if parse_caption(r["prompt"])[1] is None]
    doubles = [r["correct"] for r in scored if parse_caption(r["prompt"])[1] is not None]
    out = {
        "single": float(np.mean(singles)) if singles else None,
        "two": float(np.mean(doubles)) if doubles else None,
        "overall": float(np.mean(singles + doubles)) if scored else None,
        "n_single": len(singles),
        "n_two": len(doubles),
    }
    if len(scored) < len(results):
        out["n_unscorable"] = len(results) - len(scored)
    return out


WORDS = ["a", "left", "right", "of", "above", "below", *COLORS, *SHAPES]


def write_text_tokenizer(directory) -> None:
    """A word-level Hugging Face tokenizer for ShapesWorld captions, built locally (no download):
    captions become at most 9 tokens instead of 42 bytes, which the CPU demo's budget needs. Case and
    punctuation are normalised away ("A Red Circle." reads as the caption "a red circle")."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers  # the hf extra: the demo's alone

    vocab = {w: i for i, w in enumerate(["<pad>", "<mask>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": "<pad>", "mask_token": "<mask>", "unk_token": "<unk>"}) + "\n"
    )
