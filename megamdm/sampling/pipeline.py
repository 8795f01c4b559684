"""``MDMSampler``: prompts in, PIL images out, from a single-GPU-format checkpoint (diffusers style).

The pipeline around :func:`.loop.sample_tokens`: prompt formatting and tokenization, the guided
forward (cond and uncond in one batch, prompt padding trimmed), the head through
:func:`megamdm.models.layers.head_logits`, inpainting and outpainting start tokens, batching to the
memory there is, and decoding. Image ``j`` of prompt ``i`` is drawn from its own generator (seed
``seeds[i] + j``), so it does not depend on the batch it is generated in. Errors name the call's
own arguments (:meth:`MDMSampler.check_inputs`); commands translate them into their flags.
This module never imports megatron-core.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from ..formats.single import Pretrained, load_single
from ..memory import peak_rise_during
from ..models.layers import head_logits
from ..options import torch_dtype
from ..text import format_prompt, masked_prompt, template_tail, tokenize_prompts
from ..vq import check_image_size, pil_to_tensor, tensor_to_pil
from .draw import chunk_rows
from .loop import cfg_combine, sample_tokens
from .outputs import save_png
from .settings import SampleSettings, preset_settings


def trim_padding(ids: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts without the trailing positions that are padding in every row (they change nothing:
    padding is masked out of attention, and it is always a suffix)."""
    keep = int((~pad).sum(1).max()) if pad.numel() else 0
    return ids[:, : max(keep, 1)], pad[:, : max(keep, 1)]


def check_device(device) -> torch.device:
    """``device`` as a torch device the sampler can use here, or a ValueError naming what is allowed."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"`device` {device!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"`device` {device!r} is not one the sampler runs on; allowed: cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {device!r}: CUDA is not available on this machine; use cpu")
    return dev


def sampling_dtype(dtype, device: torch.device):
    """``auto``: bf16 on CUDA, fp32 elsewhere; any other name as it is."""
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype


def _dilate(region: torch.Tensor, border: int) -> torch.Tensor:
    """``region [h, w]`` grown by ``border`` tokens in every direction (a square neighbourhood)."""
    if border <= 0:
        return region.clone()
    k = 2 * border + 1
    grown = torch.nn.functional.max_pool2d(region.float()[None, None], k, stride=1, padding=border)
    return grown[0, 0] > 0


@dataclass
class SamplerOutput:
    images: list  # PIL images, prompt-major; image.info holds its prompt and settings
    tokens: torch.Tensor  # [B, h, w] tokenizer-order ids
    edits_per_step: list[list[int]]
    settings: dict
    seconds: float = 0.0
    prompts_cut: int = 0  # prompts (and negative prompts) longer than text.max_len, truncated

    def save(self, directory, prefix: str = "image") -> list[Path]:
        """Write the images as ``PREFIX_NNNN.png`` into ``directory`` (atomically), each with its prompt
        and settings in the PNG's text chunks, as ``megamdm-sample`` writes them."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, im in enumerate(self.images):
            info = PngImagePlugin.PngInfo()
            for key in ("prompt", "megamdm"):
                info.add_itxt(key, im.info[key])
            paths.append(out / f"{prefix}_{i:04d}.png")
            save_png(im, paths[-1], info)
        return paths


class MDMSampler:
    """Prompts in, PIL images out, in the style of a diffusers pipeline.

    sampler = MDMSampler.from_pretrained("ckpt/", device="cuda", dtype="bf16")
    out = sampler(["a red circle"], steps=20, cfg=5.0, edit_threshold=0.9, seed=0)
    out.images[0].save("x.png")

    ``preset`` (:data:`megamdm.sampling.settings.SAMPLE_PRESETS`, e.g. ``"nld"``) replaces the
    checkpoint's own sampler settings as the defaults of every call.
    """

    def __init__(self, pretrained: Pretrained, device="cpu", dtype="auto", compile: bool = False, preset: str | None = None):
        self.pretrained = pretrained
        self.cfg = pretrained.config
        if preset is not None:  # on a copy: the caller's Pretrained keeps its own settings
            self.cfg = dataclasses.replace(self.cfg, sample=dataclasses.replace(self.cfg.sample, **preset_settings(preset)))
        self.device = check_device(device)
        self.dtype = torch_dtype(sampling_dtype(dtype, self.device))
        self.model = pretrained.model.to(self.device, self.dtype).eval()
        self.groups = pretrained.groups
        self.image_tokenizer = pretrained.image_tokenizer
        self.text_tokenizer = pretrained.text_tokenizer
        if hasattr(self.image_tokenizer, "vq"):
            self.image_tokenizer.vq.to(self.device)
        self._hidden = torch.compile(self.model.forward, dynamic=False) if compile else self.model.forward

    @classmethod
    def from_pretrained(
        cls, path, device: str | None = None, dtype="auto", compile: bool = False, preset: str | None = None
    ) -> MDMSampler:
        """Load a single-GPU-format checkpoint. ``device`` None: cuda where available; ``dtype`` auto:
        bf16 on CUDA, fp32 on CPU (bf16 is fast only on some CPUs, and the command line does the same)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_single(path), device=device, dtype=dtype, compile=compile, preset=preset)

    def default_settings(self, **overrides) -> SampleSettings:
        """The checkpoint's (or the preset's) settings with ``overrides`` (None: keep); an unknown
        name is a ValueError naming the closest setting."""
        base = self.cfg.sample.settings()
        names = [f.name for f in dataclasses.fields(SampleSettings)]
        for k, v in overrides.items():
            if k not in names:
                close = difflib.get_close_matches(k, names, n=1)
                hint = f"did you mean `{close[0]}`? " if close else ""
                raise ValueError(f"unknown sampler setting `{k}`: {hint}settings: {', '.join(names)}")
            if v is not None:
                setattr(base, k, v)
        return base.validate()

    def record(self, settings: SampleSettings, height: int, width: int) -> dict:
        """What an image was made with, as outputs record it (PNG metadata, a rerun's comparison)."""
        return {**settings.recorded(), "height": height, "width": width, "dtype": str(self.dtype).replace("torch.", "")}

    def encode_prompts(self, prompts: Sequence[str], height: int, width: int):
        t = self.cfg.text
        texts = [
            format_prompt(
                p,
                width=width,
                height=height,
                score=t.default_score,
                micro_conditioning=t.micro_conditioning,
                template=t.template,
            )
            for p in prompts
        ]
        return tokenize_prompts(self.text_tokenizer, texts, t.max_len, self.template_tail.kept)

    @property
    def template_tail(self):
        return template_tail(self.text_tokenizer, self.cfg.text.template, self.cfg.model.text_after_image)

    def guided_hidden_fn(self, text_ids, text_pad, settings: SampleSettings, negative=None):
        """``(x, step) ->`` the head input for prompts ``text_ids``: at guided steps
        (``settings.guided``) ``(1 + s) h_cond - s h_uncond`` from one forward of both branches,
        elsewhere the conditional branch alone. The unconditional branch is the masked prompt, or
        ``negative = (ids, pad)``, tokenized negative prompts. Prompt positions that are padding in
        every row of a forward are left out of it."""
        b = text_ids.shape[0]
        dev = self.device
        if negative is None:
            u_ids, u_pad = masked_prompt(
                self.text_tokenizer.mask_id, text_ids, text_pad, self.cfg.text.drop_len, self.template_tail.kept
            )
        else:
            u_ids, u_pad = negative
        cond = trim_padding(text_ids, text_pad)
        both = trim_padding(torch.cat([text_ids, u_ids]), torch.cat([text_pad, u_pad]))
        cond = tuple(t.to(dev) for t in cond)
        both = tuple(t.to(dev) for t in both)

        def fn(x, step):
            if not settings.guided(step):
                return self._hidden(*cond, x)
            hs = self._hidden(*both, torch.cat([x, x])).float()
            return cfg_combine(hs[:b], hs[b:], settings.cfg)

        return fn

    def head_fn(self, rows: torch.Tensor) -> torch.Tensor:
        return head_logits(rows, self.model.head.weight)

    def auto_batch_size(self, height: int, width: int, settings: SampleSettings, jobs: int) -> int:
        """The largest batch (at most ``jobs``) whose sampling fits 80% of the free memory, from one
        measured guided forward and the logits chunk: CUDA's free memory, or the host's available
        memory on CPU."""
        if jobs <= 1:
            return 1
        gh, gw = self.grid_for(height, width)
        ids, pad, _ = self.encode_prompts(["x"], height, width)
        fn = self.guided_hidden_fn(ids, pad, settings)
        x = torch.full((1, gh, gw), self.cfg.model.image_mask_id, dtype=torch.long, device=self.device)
        v = self.cfg.model.image_vocab_size
        fixed = 24 * chunk_rows(v, self.device) * v  # a chunk's fp32 logits and its temporaries, ~24 B per entry
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(x, 0)
            per_image = torch.cuda.max_memory_allocated() - base
            free = torch.cuda.mem_get_info()[0]
        else:
            per_image = peak_rise_during(lambda: fn(x, 0))
            free = psutil.virtual_memory().available
        return int(max(1, min(jobs, (0.8 * free - fixed) // max(per_image, 1))))

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        f = self.image_tokenizer.downsample
        check_image_size(height, width, f)
        return height // f, width // f

    # ---- inputs ----------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompts: Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        init_image=None,
        mask=None,
        outpaint: Sequence[int] | None = None,
    ) -> tuple[int, int]:
        """Every argument of :meth:`__call__` checked before any work: a ValueError naming the
        argument (in backticks) and what is allowed. Returns the canvas ``(height, width)``."""
        if not prompts:
            raise ValueError("no prompts given: `prompts` is empty")
        unknown = sorted({w for p in prompts for w in self.text_tokenizer.unknown_words(p)})
        if unknown:  # here, on the caller's prompts (encode_prompts also serves the memory probe's)
            warnings.warn(
                f"the text tokenizer does not know {', '.join(map(repr, unknown[:8]))}"
                f"{f' and {len(unknown) - 8} more' if len(unknown) > 8 else ''}: read as its unknown token, "
                "so the images will not follow them",
                stacklevel=3,
            )
        if not isinstance(negative_prompt, (str, type(None))) and len(negative_prompt) != len(prompts):
            raise ValueError(
                f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts; "
                "give one `negative_prompt`, or one per prompt"
            )
        if num_images_per_prompt < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(
                f"`num_images_per_prompt` {num_images_per_prompt} and `batch_size` {batch_size}: give 1 or more "
                "(`batch_size` None: as many as fit in memory)"
            )
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} `seeds` for {len(prompts)} prompts; give one per prompt")
        if init_image is None:
            if outpaint is not None or mask is not None:
                raise ValueError("`outpaint` and `mask` need `init_image`")
            height, width = height or self.cfg.sample.height, width or self.cfg.sample.width
        elif height is not None or width is not None:
            raise ValueError(
                "`height` and `width` come from `init_image` (and `outpaint`): leave them out when editing an image"
            )
        elif outpaint is not None:
            if mask is not None:
                raise ValueError("give `mask` (inpainting) or `outpaint` (extend the canvas), not both")
            height, width = self._outpaint_canvas(init_image, outpaint)[0]
        else:
            self._check_mask(init_image, mask)
            width, height = init_image.size
        self.grid_for(height, width)
        return height, width

    def _check_mask(self, init_image, mask) -> None:
        if mask is None:
            raise ValueError("`init_image` needs `mask` (white = regenerate) or `outpaint`")
        if init_image.size != mask.size:
            raise ValueError(
                f"`mask` size {mask.size[0]}x{mask.size[1]} does not match the image size "
                f"{init_image.size[0]}x{init_image.size[1]}"
            )

    def _outpaint_canvas(self, init_image, outpaint: Sequence[int]) -> tuple[tuple[int, int], tuple[int, ...]]:
        """The canvas ``(height, width)`` in pixels that ``outpaint`` pixels around ``init_image`` make,
        and the margins ``(left, top, right, bottom)`` in tokens."""
        f = self.image_tokenizer.downsample
        if len(outpaint) != 4 or any(int(p) < 0 for p in outpaint) or not any(outpaint):
            raise ValueError(f"`outpaint` takes four pixel margins left,top,right,bottom >= 0, not all 0; got {list(outpaint)}")
        if any(int(p) % f for p in outpaint):
            raise ValueError(f"`outpaint` margins {list(outpaint)} must be multiples of the tokenizer's {f} px patches")
        left, top, right, bottom = (int(p) // f for p in outpaint)
        w, h = init_image.size
        self.grid_for(h, w)
        return (h + (top + bottom) * f, w + (left + right) * f), (left, top, right, bottom)

    def prepare_inpainting(self, init_image, mask, height, width, edit_border: int = 2):
        """Model-order start tokens with MASK where the mask is white (any masked pixel masks its
        token), and where token editing may act: the masked tokens and ``edit_border`` tokens around them."""
        self._check_mask(init_image, mask)
        if (init_image.size[1], init_image.size[0]) != (height, width):
            raise ValueError(
                f"`init_image` is {init_image.size[0]}x{init_image.size[1]}, but the requested size is {width}x{height}"
            )
        f = self.image_tokenizer.downsample
        start = self._encode(init_image)
        m = torch.from_numpy(np.asarray(mask.convert("L")) > 127)
        tm = m.view(height // f, f, width // f, f).any(3).any(1)
        start[tm] = self.cfg.model.image_mask_id
        return start, _dilate(tm, edit_border)

    def prepare_outpainting(self, init_image, outpaint: Sequence[int], edit_border: int = 2):
        """The canvas extended by ``outpaint = (left, top, right, bottom)`` pixels around
        ``init_image``: start tokens (the image's, MASK in the new region), where token editing
        may act (the new region and ``edit_border`` tokens into the image), and the canvas (h, w) in pixels."""
        f = self.image_tokenizer.downsample
        (height, width), (left, top, _, _) = self._outpaint_canvas(init_image, outpaint)
        w, h = init_image.size
        gh, gw = self.grid_for(height, width)
        start = torch.full((gh, gw), self.cfg.model.image_mask_id, dtype=torch.long)
        start[top : top + h // f, left : left + w // f] = self._encode(init_image)
        new = start == self.cfg.model.image_mask_id
        return start, _dilate(new, edit_border), (height, width)

    @staticmethod
    def load_images(init_image=None, mask=None):
        """``init_image`` (RGB) and ``mask`` as PIL images: paths are opened, images passed through."""
        if isinstance(init_image, (str, os.PathLike)):
            init_image = Image.open(init_image).convert("RGB")
        if isinstance(mask, (str, os.PathLike)):
            mask = Image.open(mask)
        return init_image, mask

    def decode(self, tokens: torch.Tensor) -> list:
        """PIL images of tokenizer-order token grids ``[B, h, w]`` (masked positions decode as some code)."""
        pix = self.image_tokenizer.decode(tokens.clamp(max=self.image_tokenizer.vocab_size - 1).to(self.device))
        return tensor_to_pil(pix.float().cpu())

    def _encode(self, image) -> torch.Tensor:
        ids = self.image_tokenizer.encode(pil_to_tensor([image]).to(self.device))
        return self.groups.to_model(ids[0].cpu())

    # ---- generation ------------------------------------------------------------------------------
    def __call__(
        self,
        prompts,
        *,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        init_image=None,
        mask=None,
        outpaint: Sequence[int] | None = None,
        edit_border: int = 2,
        progress: bool = True,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
        **settings,
    ) -> SamplerOutput:
        """Generate ``num_images_per_prompt`` images per prompt. Image ``j`` of prompt ``i`` is drawn
        with seed ``seeds[i] + j`` (default ``seeds[i] = seed + i * num_images_per_prompt``), so it
        does not depend on batching. Keyword settings (:class:`SampleSettings` fields) override the
        checkpoint's sampling defaults.

        ``negative_prompt`` (one, or one per prompt) is the unconditional branch of guidance
        instead of the masked prompt. ``init_image`` with ``mask`` regenerates the masked region;
        with ``outpaint = (left, top, right, bottom)`` pixels it extends the canvas around the
        image. Token editing then acts only within ``edit_border`` tokens of the new region; both may
        be paths. ``batch_size=None``: as many images per forward as fit in memory (:meth:`auto_batch_size`).
        ``on_step(step, tokens)`` is called after every step with the batch's tokenizer-order tokens
        ``[b, h, w]`` (the vocabulary size where still masked; :meth:`decode` makes them images). Every image carries
        its prompt and settings in ``image.info`` (:meth:`SamplerOutput.save` writes them into PNGs)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        init_image, mask = self.load_images(init_image, mask)
        height, width = self.check_inputs(
            prompts,
            height=height,
            width=width,
            num_images_per_prompt=num_images_per_prompt,
            seeds=seeds,
            batch_size=batch_size,
            negative_prompt=negative_prompt,
            init_image=init_image,
            mask=mask,
            outpaint=outpaint,
        )
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        st = self.default_settings(**settings)
        start = editable = None
        if init_image is not None and outpaint is not None:
            start, editable, _ = self.prepare_outpainting(init_image, outpaint, edit_border)
        elif init_image is not None:
            start, editable = self.prepare_inpainting(init_image, mask, height, width, edit_border)
        gh, gw = self.grid_for(height, width)
        n = num_images_per_prompt
        if seeds is None:
            base = self.cfg.sample.seed if seed is None else seed
            seeds = [base + i * n for i in range(len(prompts))]
        negs = negative_prompt or [None] * len(prompts)
        jobs = [(p, sd + j, neg) for p, sd, neg in zip(prompts, seeds, negs) for j in range(n)]
        bs = batch_size or self.auto_batch_size(height, width, st, len(jobs))
        mask_id = self.cfg.model.image_mask_id

        def step_fn(k: int, x: torch.Tensor) -> None:  # tokenizer order, the MASK id (= the vocabulary size) kept
            x = x.cpu()
            on_step(k, self.groups.to_tokenizer(x.clamp(max=mask_id - 1)).where(x != mask_id, mask_id))

        images, tokens, edits, cut_jobs = [], [], [], 0
        t0 = time.time()
        bar = tqdm(total=math.ceil(len(jobs) / bs) * st.steps, desc="sampling", unit="step", disable=not progress, leave=False)
        for s in range(0, len(jobs), bs):
            chunk = jobs[s : s + bs]
            ids, pad, cut = self.encode_prompts([p for p, _, _ in chunk], height, width)
            negative = None
            if negative_prompt:
                *negative, neg_cut = self.encode_prompts([q for _, _, q in chunk], height, width)
                cut += neg_cut
            cut_jobs += cut
            init = torch.full((len(chunk), gh, gw), mask_id, dtype=torch.long)
            if start is not None:
                init[:] = start
            gens = [torch.Generator(self.device).manual_seed(sd) for _, sd, _ in chunk]
            res = sample_tokens(
                self.guided_hidden_fn(ids, pad, st, negative),
                self.head_fn,
                init.to(self.device),
                mask_id,
                st,
                gens,
                chunk=chunk_rows(self.cfg.model.image_vocab_size, self.device),
                editable=editable.expand(len(chunk), gh, gw).to(self.device) if editable is not None else None,
                progress=bar,
                on_step=step_fn if on_step is not None else None,
            )
            tok = self.groups.to_tokenizer(res.tokens.cpu())
            images += self.decode(tok)
            tokens.append(tok)
            edits += res.edits_per_step
        bar.close()
        settings_out = {**self.record(st, height, width), "seeds": [sd for _, sd, _ in jobs], "batch_size": bs}
        if negative_prompt is not None:
            settings_out["negative_prompts"] = [q for _, _, q in jobs]
        if outpaint is not None:
            settings_out["outpaint"] = [int(p) for p in outpaint]
        one = {k: v for k, v in settings_out.items() if k not in ("seeds", "negative_prompts")}
        one["checkpoint"] = str(self.pretrained.path)
        for i, (im, (prompt, sd, neg)) in enumerate(zip(images, jobs)):  # image_index: within its prompt, as PNGs
            record = {**one, "seed": sd, "negative_prompt": neg, "image_index": i % n}
            im.info.update(prompt=prompt, megamdm=json.dumps(record, sort_keys=True))
        # every prompt (and negative prompt) is in exactly n jobs
        return SamplerOutput(images, torch.cat(tokens), edits, settings_out, time.time() - t0, prompts_cut=cut_jobs // n)
