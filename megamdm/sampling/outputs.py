"""Prompt sources and output layouts of a sampling run: plain, GenEval and DPG-Bench, written atomically.

    jobs, layout = load_prompts(geneval_metadata="evaluation_metadata.jsonl")
    writer = SampleWriter("geneval/", layout, images_per_prompt=4, checkpoint="release/")
    for key, prompt, meta in writer.pending(jobs):
        out = sampler([prompt], num_images_per_prompt=4, seed=0)
        writer.write(key, prompt, meta, out.images, out.settings)

Layouts:
  plain     OUT/NNNNN_JJ.png
  GenEval   OUT/NNNNN/metadata.jsonl (that prompt's JSON object) + OUT/NNNNN/samples/JJJJ.png
  DPG-Bench OUT/<id>.png, a 2x2 grid of 4 samples (the folder holds nothing else)

Each PNG carries the prompt and every setting in its text chunks. Files are written to a temporary
name and renamed, and a GenEval folder appears under its final name only when complete, so a killed
run never leaves a file that looks finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..errors import MegamdmError
from .grid import image_grid
from .settings import SampleSettings

# the sampler settings added after 0.2.0's first PNGs, at the values those PNGs were made with
SETTING_DEFAULTS = {  # settings newer than some PNGs: those had the default
    f: getattr(SampleSettings(), f)
    for f in (
        "filter_order",
        "confidence",
        "final_prediction",
        "schedule_counts",
        "maskgit_draw",
        "gumbel_temperature_schedule",
        "min_gumbel_temperature",
        "stratified_order",
        "cfg_interval_rule",
    )
}

# what a sampling run's inputs beyond the settings were, as PNGs record them ("inputs" below): an older
# PNG that lacks one was made without it
INPUT_DEFAULTS = {"negative_prompt": None, "init_image": None, "mask": None, "outpaint": None, "edit_border": 2, "lora": None}

LAYOUTS = ("plain", "geneval", "dpg")
MANIFEST = "manifest.jsonl"  # plain layout: one line per finished prompt (key, prompt, seed, files)
Job = tuple[str, str, dict | None]  # (key, prompt, GenEval metadata)


def load_prompts(
    *, prompts: Sequence[str] = (), prompts_file=None, geneval_metadata=None, dpg_prompts=None
) -> tuple[list[Job], str]:
    """Jobs from exactly one source, and the layout that goes with it; ValueError names bad input."""
    given = [bool(prompts), bool(prompts_file), bool(geneval_metadata), bool(dpg_prompts)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --prompt, --prompts, --geneval-metadata, --dpg-prompts")
    if prompts:
        if any(not p.strip() for p in prompts):
            raise ValueError("--prompt is empty")
        return [(f"{i:05d}", p, None) for i, p in enumerate(prompts)], "plain"
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise ValueError(f"prompt file not found: {path}")
        text = path.read_text(encoding="utf-8").splitlines()
        lines = [ln.strip() for ln in text if ln.strip() and not ln.lstrip().startswith("#")]  # '#': a comment
        if not lines:
            raise ValueError(f"prompt file is empty: {path}")
        return [(f"{i:05d}", p, None) for i, p in enumerate(lines)], "plain"
    if geneval_metadata:
        path = Path(geneval_metadata)
        if not path.is_file():
            raise ValueError(f"GenEval metadata not found: {path}")
        jobs = []
        for i, line in enumerate(ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()):
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from None
            if not isinstance(meta, dict) or "prompt" not in meta:
                raise ValueError(f'{path}: line {i + 1} has no "prompt"')
            jobs.append((f"{i:05d}", meta["prompt"], meta))
        if not jobs:
            raise ValueError(f"GenEval metadata is empty: {path}")
        return jobs, "geneval"
    d = Path(dpg_prompts)
    if not d.is_dir():
        raise ValueError(f"DPG prompts directory not found: {d}")
    files = sorted(d.glob("*.txt"))
    if not files:
        raise ValueError(f"no <id>.txt prompt files in {d}")
    return [(f.stem, f.read_text(encoding="utf-8").strip(), None) for f in files], "dpg"


def png_info(prompt: str, settings: dict, checkpoint: str, index: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("prompt", prompt)
    info.add_itxt("megamdm", json.dumps({**settings, "image_index": index, "checkpoint": checkpoint}, sort_keys=True))
    return info


def save_png(img: Image.Image, path: Path, info) -> None:
    """Write ``img`` to ``path`` atomically (a temporary name, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


class StaleOutputError(MegamdmError):
    """An output folder holds samples made from other prompts or settings than those asked for."""


class SampleWriter:
    """Writes one prompt's images in a layout; :meth:`pending` skips prompts already finished with
    the same prompt and settings, and refuses (or, with ``overwrite``, redoes) the others."""

    def __init__(self, out, layout: str, *, images_per_prompt: int, checkpoint: str):
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        if layout == "dpg" and images_per_prompt != 4:
            raise ValueError("DPG-Bench expects 2x2 grids: --num-images-per-prompt must be 4")
        if images_per_prompt < 1:
            raise ValueError("--num-images-per-prompt must be >= 1")
        if Path(out).exists() and not Path(out).is_dir():
            raise ValueError(f"--out {out} is an existing file; give a folder")
        self.out, self.layout, self.n, self.checkpoint = Path(out), layout, images_per_prompt, str(checkpoint)

    def target(self, key: str) -> Path:
        """What exists only once ``key`` is complete."""
        return {"plain": self.out / f"{key}_{self.n - 1:02d}.png", "geneval": self.out / key, "dpg": self.out / f"{key}.png"}[
            self.layout
        ]

    def first_png(self, key: str) -> Path:
        return {
            "plain": self.out / f"{key}_00.png",
            "geneval": self.out / key / "samples" / "0000.png",
            "dpg": self.out / f"{key}.png",
        }[self.layout]

    def pending(
        self, jobs: Iterable[Job], expected: Callable[[int], dict] | None = None, *, overwrite: bool = False
    ) -> list[Job]:
        """The jobs still to do. A finished one is compared with ``expected(k)`` (the settings and
        inputs its PNGs must record, beside its prompt): it is kept only where they match. The
        checkpoint is compared by ``checkpoint_id`` (its contents), or by path in PNGs older than that."""
        todo = []
        for k, job in enumerate(jobs):
            if not self.target(job[0]).exists():
                todo.append(job)
                continue
            if expected is None:
                continue
            png = self.first_png(job[0])
            try:
                info = Image.open(png).info
                stored, prompt = json.loads(info.get("megamdm", "{}")), info.get("prompt")
            except (OSError, ValueError):
                stored, prompt = {}, None
            want = json.loads(json.dumps(expected(k)))
            known = {**SETTING_DEFAULTS, **INPUT_DEFAULTS, **stored}  # a setting newer than the PNG had its default
            if "checkpoint_id" in want and "checkpoint_id" not in stored:
                known["checkpoint_id"] = want["checkpoint_id"] if stored.get("checkpoint") == self.checkpoint else None
            diff = sorted(x for x in want if known.get(x) != want[x]) + (["prompt"] if prompt != job[1] else [])
            if not diff:
                continue
            if not overwrite:
                what = ", ".join("checkpoint" if x == "checkpoint_id" else x for x in diff)
                raise StaleOutputError(
                    f"{png} was made with another {what} than asked; pass --overwrite to redo such "
                    "samples, or choose another --out"
                )
            todo.append(job)
        return todo

    def write(self, key: str, prompt: str, meta: dict | None, images: Sequence[Image.Image], settings: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.layout == "plain":
            for j, im in enumerate(images):
                save_png(im, self.out / f"{key}_{j:02d}.png", png_info(prompt, settings, self.checkpoint, j))
        elif self.layout == "geneval":
            tmp = self.out / f".{key}.tmp"
            (tmp / "samples").mkdir(parents=True, exist_ok=True)
            (tmp / "metadata.jsonl").write_text(json.dumps(meta) + "\n", encoding="utf-8")
            for j, im in enumerate(images):
                save_png(im, tmp / "samples" / f"{j:04d}.png", png_info(prompt, settings, self.checkpoint, j))
            os.replace(tmp, self.out / key)
        else:
            grid = image_grid(list(images[:4]), cols=2, pad=0)
            save_png(grid, self.out / f"{key}.png", png_info(prompt, settings, self.checkpoint, 0))

    def write_manifest(self, jobs: Iterable[Job]) -> Path | None:
        """The plain layout's ``manifest.jsonl``: each finished prompt's key, prompt, seed and files
        (the GenEval and DPG-Bench layouts hold nothing but what their scorers read)."""
        if self.layout != "plain":
            return None
        lines = []
        for key, prompt, _ in jobs:
            files = [self.out / f"{key}_{j:02d}.png" for j in range(self.n)]
            if all(f.exists() for f in files):
                seed = json.loads(Image.open(files[0]).info.get("megamdm", "{}")).get("seed")
                lines.append(json.dumps({"key": key, "prompt": prompt, "seed": seed, "files": [f.name for f in files]}))
        path = self.out / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, path)
        return path
