"""Prompt text: the template with micro-conditioning written as text, and the text tokenizers.

Two templates (``text.template``): megamdm's ``"<caption> | size WxH | crop T,L | score S"``, and
``nld``, NL-Diffusion-Image's ChatML conversation (system turn, the caption and its
micro-conditioning in the user turn, the image inside the assistant turn, whose last
:data:`NLD_AFTER_IMAGE` text closes it after the image). Two tokenizers share one small interface
(``encode``, ``vocab_size``, ``pad_id``, ``mask_id``): a built-in byte-level tokenizer that needs no
download, and a Hugging Face ``tokenizer.json`` loaded from a local directory.
:func:`tokenize_prompts` pads or truncates to ``L_text`` and returns the padding mask. The text MASK
id replaces the prompt for prompt dropout and for the unconditional branch of classifier-free
guidance (:func:`masked_prompt`); with ``nld`` only the system and user turns are replaced.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

NLD_SYSTEM = (
    "<|im_start|>system\nYou are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language.<|im_end|>\n"
)
NLD_ASSISTANT = "<|im_start|>assistant\nSure <SPECIAL_21>"  # the image follows, then NLD_AFTER_IMAGE
NLD_AFTER_IMAGE = "<SPECIAL_22><|im_end|>\n"
TEMPLATES = ("megamdm", "nld")


def format_prompt(
    caption: str,
    *,
    width: int,
    height: int,
    crop: tuple[int, int] = (0, 0),
    score: float | None = 6.5,
    micro_conditioning: bool = True,
    template: str = "megamdm",
) -> str:
    """The prompt text of ``caption``. ``megamdm``: ``"<caption> | size WxH | crop T,L | score S"``,
    SDXL-style micro-conditioning as plain text. ``nld``: NL-Diffusion-Image's conversation, with
    ``"ORIGINAL WIDTH : W; ORIGINAL HEIGHT : H; TOP : T; LEFT : L; SCORE : S"`` after the caption; the
    text that follows the image (:data:`NLD_AFTER_IMAGE`) is at its end."""
    if template == "nld":
        if micro_conditioning:
            s = "" if score is None else f"; SCORE : {score:.1f}"
            caption = f"{caption} ORIGINAL WIDTH : {width}; ORIGINAL HEIGHT : {height}; TOP : {crop[0]}; LEFT : {crop[1]}{s}"
        user = f"<|im_start|>user\nGenerate an image with the caption:\n {caption}<|im_end|>\n"
        return NLD_SYSTEM + user + NLD_ASSISTANT + NLD_AFTER_IMAGE
    if template != "megamdm":
        raise ValueError(f"unknown prompt template {template!r}; allowed: {', '.join(TEMPLATES)}")
    caption = " ".join(caption.split())
    if not micro_conditioning:
        return caption
    parts = [caption, f"size {width}x{height}", f"crop {crop[0]},{crop[1]}"]
    if score is not None:
        parts.append(f"score {score:.1f}")
    return " | ".join(parts)


class TextTokenizer(Protocol):
    name: str
    vocab_size: int
    pad_id: int
    mask_id: int

    def encode(self, text: str) -> list[int]: ...

    def unknown_words(self, text: str) -> list[str]: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 is padding, 257 is the text MASK."""

    name = "byte"
    pad_id = 256
    mask_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def unknown_words(self, text: str) -> list[str]:
        return []  # every byte is known


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``) from a local directory; no download."""

    def __init__(self, directory: str | Path, mask_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("HF text tokenizers need the `tokenizers` package: pip install tokenizers") from e
        directory = Path(directory)
        tj = directory / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{directory}: no tokenizer.json (a Hugging Face fast tokenizer is required)")
        self.directory = directory
        self.name = str(directory)
        self._tok = Tokenizer.from_file(str(tj))
        self._tok.no_padding()
        self._tok.no_truncation()
        special = {}
        tc = directory / "tokenizer_config.json"
        if tc.is_file():
            special = json.loads(tc.read_text())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        mask_token = mask_token or _token_str(special.get("mask_token"))
        if mask_token is None:
            raise ValueError(
                f"{directory}: the tokenizer has no mask token; set text.mask_token to one of its "
                "special tokens (e.g. a reserved token)"
            )
        mid = self._tok.token_to_id(mask_token)
        if mid is None:
            raise ValueError(f"{directory}: text.mask_token {mask_token!r} is not in the vocabulary")
        self.mask_id = mid
        pad = _token_str(special.get("pad_token")) or _token_str(special.get("eos_token"))
        pid = self._tok.token_to_id(pad) if pad else None
        self.pad_id = pid if pid is not None else 0
        unk = _token_str(special.get("unk_token")) or getattr(self._tok.model, "unk_token", None)
        self.unk_id = self._tok.token_to_id(unk) if unk else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def unknown_words(self, text: str) -> list[str]:
        """The pieces of ``text`` the tokenizer reads as its unknown token (none for byte-level BPE)."""
        if self.unk_id is None:
            return []
        enc = self._tok.encode(text, add_special_tokens=False)
        return [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == self.unk_id]


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def load_text_tokenizer(spec: str, mask_token: str | None = None) -> TextTokenizer:
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec, mask_token=mask_token)


class TokenizedPrompts(NamedTuple):
    ids: torch.Tensor  # [B, max_len] long
    pad: torch.Tensor  # [B, max_len] bool, True = padding
    cut: int  # how many prompts were longer than max_len and lost their end


class TemplateTail(NamedTuple):
    """Token counts at the end of every prompt of a template: ``kept`` are never cut and never masked
    (NL-Diffusion-Image's assistant turn), the last ``after_image`` of them follow the image."""

    kept: int = 0
    after_image: int = 0


@lru_cache(maxsize=16)
def template_tail(tokenizer: TextTokenizer, template: str, text_after_image: int | None = None) -> TemplateTail:
    """:class:`TemplateTail` of ``template`` under ``tokenizer`` (megamdm's template has none), checked
    against the model's ``text_after_image`` when given."""
    if text_after_image is not None:
        tail = template_tail(tokenizer, template)
        if tail.after_image != text_after_image:
            raise ValueError(
                f"text.template={template} puts {tail.after_image} tokens after the image, but the model has "
                f"model.text_after_image={text_after_image}"
            )
        return tail
    if template != "nld":
        return TemplateTail()
    kept = tokenizer.encode(NLD_ASSISTANT + NLD_AFTER_IMAGE)
    probe = tokenizer.encode(format_prompt("a", width=8, height=8, template="nld"))
    if probe[-len(kept) :] != kept:
        raise ValueError(
            f"text tokenizer {tokenizer.name}: the nld template's assistant turn does not tokenize on its own as it "
            "does in a prompt (its ChatML and <SPECIAL_n> tokens must be special tokens, as in NL-Diffusion-Image's)"
        )
    return TemplateTail(len(kept), len(tokenizer.encode(NLD_AFTER_IMAGE)))


def tokenize_prompts(tokenizer: TextTokenizer, prompts: Sequence[str], max_len: int, keep_last: int = 0) -> TokenizedPrompts:
    """Token ids and padding mask of ``prompts``, padded to ``max_len``.

    Prompts longer than ``max_len`` lose the tokens before their last ``keep_last`` (the end of the
    caption and its micro-conditioning, so keep ``max_len`` generous): warned once per process and
    counted in ``cut``."""
    ids = torch.full((len(prompts), max_len), tokenizer.pad_id, dtype=torch.long)
    pad = torch.ones((len(prompts), max_len), dtype=torch.bool)
    cut = 0
    for i, p in enumerate(prompts):
        t = tokenizer.encode(p)
        if len(t) > max_len:  # shown once per process (Python's default warning filter)
            warnings.warn(
                f"a prompt longer than text.max_len={max_len} tokens was cut, losing its end (the "
                "micro-conditioning); raise text.max_len if prompts are this long",
                stacklevel=2,
            )
            t = t[: max_len - keep_last] + (t[len(t) - keep_last :] if keep_last else [])
            cut += 1
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        pad[i, : len(t)] = False
    return TokenizedPrompts(ids, pad, cut)


OWN_LENGTH = -1  # text.drop_len: a dropped prompt keeps its own length (NL-Diffusion-Image's rule)


def masked_prompt(
    mask_id: int, ids: torch.Tensor, pad: torch.Tensor, drop_len: int = 0, keep_last: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropped form of prompts ``ids``/``pad`` ``[B, L]``: text MASKs, then padding. ``drop_len``
    (``text.drop_len``): 0 every one of the L positions, ``n > 0`` the first n, -1 (``OWN_LENGTH``)
    each prompt's own tokens except its last ``keep_last`` (:class:`TemplateTail`'s ``kept``).
    Training's prompt dropout and sampling's unconditional branch both use exactly this; the ids
    under padding are never attended to."""
    if drop_len == OWN_LENGTH:
        real = ~pad
        if keep_last:
            tail_start = real.sum(1, keepdim=True) - keep_last
            real = real & (torch.arange(ids.shape[1], device=ids.device) < tail_start)
        return ids.masked_fill(real, mask_id), pad.clone()
    if keep_last:
        raise ValueError("a template whose end is kept (text.template=nld) needs text.drop_len=-1 (own length)")
    out_pad = torch.zeros_like(pad)
    out_pad[:, drop_len or ids.shape[1] :] = True
    return torch.full_like(ids, mask_id), out_pad
