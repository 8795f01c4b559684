"""The single-GPU format (docs/design.md §3): one directory that samples and fine-tunes without Megatron.

    config.json                   format version, model / text / image-tokenizer / GCE settings
    model.safetensors             weights (above 5 GiB: model-0000K-of-0000N.safetensors + index json)
    gce_groups.safetensors        the GCE permutation and group sizes
    image_tokenizer/              the image tokenizer (k-means codebook or a diffusers VQModel)
    text_tokenizer/               a Hugging Face tokenizer, when the model does not use bytes

No pickle anywhere. Writers build the directory under a temporary name and rename it at the
end, so a crash never leaves a half-written checkpoint under the final name. Loading checks
every file, name and shape before any weight is read, so a bad directory fails with one clear
error and nothing half-loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, GCEConfig, ModelConfig, TextConfig, legacy_positions, section_from_dict
from ..errors import CheckpointError
from ..gce import GCEGroups
from ..models.standalone import MDMTransformer
from ..sampling.settings import SampleConfig
from ..text import load_text_tokenizer
from ..vq import load_image_tokenizer
from .run_layout import TRACKER
from .safetensors import INDEX_FILE, MAX_SHARD_BYTES, WEIGHTS_FILE, ShardedSafetensorsWriter, open_weights

FORMAT = "megamdm-single"
FORMAT_VERSION = 2  # 2: per-sample positions (model.fixed_image_start, text_after_image)
CONFIG_FILE = "config.json"
GROUPS_FILE = "gce_groups.safetensors"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
TEXT_TOKENIZER_DIR = "text_tokenizer"
TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class Pretrained:
    model: MDMTransformer
    config: Config
    groups: GCEGroups
    image_tokenizer: Any
    text_tokenizer: Any
    path: Path


def _config_json(cfg: Config, groups: GCEGroups, text_tok_rel: str, image_kind: str, weights: str | None) -> dict:
    text = dataclasses.asdict(cfg.text)
    text["tokenizer"] = text_tok_rel
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **({"weights": weights} if weights else {}),  # "ema" or "raw" when converted from a training checkpoint
        "model": dataclasses.asdict(cfg.model),
        "text": text,
        "image_tokenizer": {"kind": image_kind, "path": IMAGE_TOKENIZER_DIR},
        "gce": {
            "groups_file": GROUPS_FILE,
            "group_sizes": list(groups.group_sizes),
            "group_weights": list(groups.group_weights),
        },
        "sample": dataclasses.asdict(cfg.sample),
    }


def write_single(
    directory,
    tensors: Iterable[tuple[str, torch.Tensor]],
    cfg: Config,
    groups: GCEGroups,
    image_tokenizer,
    text_tokenizer,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    weights: str | None = None,
) -> Path:
    """Write a single-GPU-format directory from a stream of ``(name, tensor)`` pairs.

    ``overwrite`` replaces an existing megamdm checkpoint, and only its own files (anything else in
    the folder stays); a folder that is not one is refused, never deleted."""
    out = Path(directory)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if out.exists():
        _check_replaceable(out)
    if groups.vocab_size != cfg.model.image_vocab_size:
        raise CheckpointError(
            f"GCE groups cover {groups.vocab_size} ids but the model's image vocabulary is {cfg.model.image_vocab_size}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes, metadata={"format": "pt"})
        for name, t in tensors:
            writer.add(name, t)
        writer.close()
        groups.save(tmp / GROUPS_FILE)
        image_tokenizer.save(tmp / IMAGE_TOKENIZER_DIR)
        image_kind = getattr(image_tokenizer, "kind", None) or (
            "kmeans" if type(image_tokenizer).__name__ == "KMeansPatchTokenizer" else "diffusers"
        )
        text_rel = "byte"
        if getattr(text_tokenizer, "name", "byte") != "byte":
            (tmp / TEXT_TOKENIZER_DIR).mkdir()
            for f in TEXT_TOKENIZER_FILES:  # the tokenizer's files only: its folder may hold a whole LLM
                if (Path(text_tokenizer.directory) / f).is_file():
                    shutil.copy2(Path(text_tokenizer.directory) / f, tmp / TEXT_TOKENIZER_DIR / f)
            text_rel = TEXT_TOKENIZER_DIR
        cfg_json = _config_json(cfg, groups, text_rel, image_kind, weights)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg_json, indent=2) + "\n")
        share_as_umask_allows(tmp)
        if out.exists():
            _replace_own_files(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def share_as_umask_allows(tree: Path) -> None:
    """Give ``tree`` the permissions the user's umask gives new files (``mkdtemp`` makes its folder
    0700): a checkpoint written on a shared cluster is readable by whoever the user lets read files."""
    mask = os.umask(0)
    os.umask(mask)
    tree.chmod(0o777 & ~mask)
    for path in tree.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def fingerprint(directory) -> str:
    """What identifies a checkpoint's contents, whatever its path: a hash of its ``config.json`` and, of
    each weight file, its size, its safetensors header and 32 blocks of 4 KiB spread over it (new
    weights change them: training rewrites every tensor), read in milliseconds at any size."""
    d = Path(directory)
    h = hashlib.sha256((d / CONFIG_FILE).read_bytes())
    for path in sorted(set(weight_files(d).values())):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header, 1 << 24)))
            for k in range(32):
                f.seek(size * k // 32)
                h.update(f.read(4096))
    return h.hexdigest()[:16]


def _own_files(directory: Path) -> list[Path]:
    """The files and folders a megamdm checkpoint consists of."""
    names = {CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, GROUPS_FILE, IMAGE_TOKENIZER_DIR, TEXT_TOKENIZER_DIR}
    return sorted(
        p for p in directory.iterdir() if p.name in names or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", p.name)
    )


def _check_replaceable(out: Path) -> None:
    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder; refusing to replace it")
    if not any(out.iterdir()):
        return
    try:
        marker = json.loads((out / CONFIG_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        marker = None
    if marker != FORMAT:
        raise CheckpointError(
            f"{out} is not a megamdm checkpoint (no {CONFIG_FILE} of format {FORMAT!r}); --overwrite replaces "
            "only a checkpoint's own files, so nothing was deleted: choose another output folder"
        )


def _replace_own_files(new: Path, out: Path) -> None:
    """Move the checkpoint in ``new`` over the one in ``out``. ``config.json`` goes first and comes
    back last, so an interrupted replacement leaves a folder that does not load as a checkpoint."""
    (out / CONFIG_FILE).unlink(missing_ok=True)
    for old in _own_files(out):
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    for item in _own_files(new):
        if item.name != CONFIG_FILE:
            os.replace(item, out / item.name)
    os.replace(new / CONFIG_FILE, out / CONFIG_FILE)
    shutil.rmtree(new, ignore_errors=True)


def save_single(
    directory, model: MDMTransformer, cfg: Config, groups: GCEGroups, image_tokenizer, text_tokenizer, **kw
) -> Path:
    return write_single(directory, model.state_dict().items(), cfg, groups, image_tokenizer, text_tokenizer, **kw)


# ---- reading --------------------------------------------------------------------------------------
def read_config(directory) -> tuple[Config, dict]:
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    cpath = d / CONFIG_FILE
    if not cpath.is_file():
        if (d / TRACKER).is_file() or (d / ".metadata").is_file():
            raise CheckpointError(
                f"{d} is a training checkpoint (torch_dist), not the single-GPU format: convert it first with "
                f"megamdm-convert to-single --checkpoint {d} --out RELEASE_DIR"
            )
        raise CheckpointError(f"{d}: missing {CONFIG_FILE}; not a megamdm single-GPU checkpoint")
    try:
        raw = json.loads(cpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cpath}: malformed JSON ({e})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{cpath}: format is {raw.get('format')!r}, expected {FORMAT!r}")
    if int(raw.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{cpath}: format_version {raw['format_version']} is newer than this megamdm ({FORMAT_VERSION}); upgrade megamdm"
        )
    if int(raw.get("format_version", -1)) < 2 and "model" in raw:  # images after padded prompts
        legacy_positions(raw)
    try:
        cfg = Config(
            model=section_from_dict(ModelConfig, raw["model"], f"{cpath} [model]"),
            text=section_from_dict(TextConfig, raw["text"], f"{cpath} [text]"),
            gce=section_from_dict(GCEConfig, {k: raw["gce"][k] for k in ("group_sizes", "group_weights")}, f"{cpath} [gce]"),
            sample=section_from_dict(SampleConfig, raw.get("sample", {}), f"{cpath} [sample]"),
        )
    except KeyError as e:
        raise CheckpointError(f"{cpath}: missing section {e.args[0]!r}") from None
    home = d.absolute()  # the paths a loaded config holds work from any working directory
    cfg.image_tokenizer.kind = raw["image_tokenizer"]["kind"]
    cfg.image_tokenizer.path = str(home / raw["image_tokenizer"]["path"])
    cfg.gce.groups_file = str(home / raw["gce"]["groups_file"])
    if cfg.text.tokenizer != "byte":
        cfg.text.tokenizer = str(home / cfg.text.tokenizer)
    return cfg.validate(), raw


def weight_files(directory) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it; refuses pickle-only directories."""
    d = Path(directory)
    index, single = d / INDEX_FILE, d / WEIGHTS_FILE
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = {name: d / f for name, f in wm.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{d}: index lists shard files that are missing: {', '.join(missing)}")
        return files
    if single.is_file():
        with open_weights(single) as f:
            return {k: single for k in f.keys()}
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{d}: holds pickle files ({', '.join(pickles)}) but no {WEIGHTS_FILE}; megamdm never unpickles "
            "weights. Convert them to safetensors first."
        )
    raise CheckpointError(f"{d}: missing {WEIGHTS_FILE} (or {INDEX_FILE})")


def _check_weights(files: dict[str, Path], model: MDMTransformer, where) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    by_file: dict[Path, list[str]] = {}
    for name, p in files.items():
        by_file.setdefault(p, []).append(name)
    found = {}
    for p, names in by_file.items():
        with open_weights(p) as f:
            for name in names:
                found[name] = tuple(f.get_slice(name).get_shape())
    for k in sorted(set(expected) - set(found)):
        problems.append(f"missing {k}")
    for k in sorted(set(found) - set(expected)):
        problems.append(f"unexpected {k}")
    for k in sorted(set(found) & set(expected)):
        if found[k] != expected[k]:
            problems.append(f"{k}: shape {found[k]} in the weights, {expected[k]} in config.json")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
        raise CheckpointError(f"{where}: weights do not match config.json: {shown}")


def load_single(
    directory, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, load_tokenizers: bool = True
) -> Pretrained:
    """Load a single-GPU-format directory; everything is checked before weights are read."""
    d = Path(directory)
    cfg, _ = read_config(d)
    files = weight_files(d)
    with torch.device("meta"):
        model = MDMTransformer(cfg.model)
    _check_weights(files, model, d)
    groups_path = Path(cfg.gce.groups_file)
    if not groups_path.is_file():
        raise CheckpointError(f"{d}: missing {GROUPS_FILE}")
    groups = GCEGroups.load(groups_path).with_weights(cfg.gce.group_weights)
    if groups.vocab_size != cfg.model.image_vocab_size:
        raise CheckpointError(
            f"{groups_path}: {groups.vocab_size} ids, but model.image_vocab_size is {cfg.model.image_vocab_size}"
        )
    image_tok = text_tok = None
    if load_tokenizers:
        image_tok = load_image_tokenizer(cfg.image_tokenizer.kind, cfg.image_tokenizer.path)
        if image_tok.vocab_size != cfg.model.image_vocab_size:
            raise CheckpointError(
                f"{d}: image tokenizer has {image_tok.vocab_size} codes, model expects {cfg.model.image_vocab_size}"
            )
        if groups.codebook_hash and groups.codebook_hash not in image_tok.name:
            raise CheckpointError(
                f"{d}: {GROUPS_FILE} was built for codebook {groups.codebook_hash}, not for "
                f"the image tokenizer {image_tok.name}"
            )
        text_tok = load_text_tokenizer(cfg.text.tokenizer, cfg.text.mask_token)
        if text_tok.vocab_size > cfg.model.text_vocab_size:
            raise CheckpointError(
                f"{d}: text tokenizer has {text_tok.vocab_size} ids, model.text_vocab_size is {cfg.model.text_vocab_size}"
            )
    state = {}
    by_file: dict[Path, list[str]] = {}
    for name, p in files.items():
        by_file.setdefault(p, []).append(name)
    for p, names in by_file.items():
        with open_weights(p, device=str(device)) as f:
            for name in names:
                t = f.get_tensor(name)
                state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    model.load_state_dict(state, strict=True, assign=True)
    return Pretrained(model.eval(), cfg, groups, image_tok, text_tok, d)
