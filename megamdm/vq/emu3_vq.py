"""Emu3.5-style (IBQ) VQGANs: NL-Diffusion-Image's image tokenizer (``emu3_vqvae/`` of the release).

The network is a taming-transformers VQGAN (GroupNorm 32, swish, ResNet blocks, single-head
attention at ``attn_resolutions``, asymmetric-pad stride-2 down-sampling, nearest up-sampling);
its weights map one-to-one onto a diffusers ``VQModel`` after renaming (:func:`diffusers_key`),
so the network is diffusers'. What differs from a diffusers VQ tokenizer:

* a latent's code is the **dot-product argmax** over the codebook, not the nearest by L2;
* pixels are in ``[-1, 1]``; decoding clamps, maps to ``[0, 255]`` and truncates.

:meth:`Emu3VQTokenizer.load` reads either the release's folder (a taming ``config.json`` with
``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``, ``z_channels``, ``embed_dim``, the
codebook size, flat or under ``ddconfig``; safetensors weights, one file or an index) or the
diffusers folder :meth:`save` writes (``VQModel`` + ``megamdm_vq.json`` naming this kind). No pickle
is read. Only the layout above is known from the release's config: no real weights were reachable
when this was written, and the tests check it against an independent forward of the taming math.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .diffusers_vq import DiffusersVQTokenizer

MARKER = "megamdm_vq.json"


def _taming_config(raw: dict) -> dict:
    dd = {**raw, **raw.get("ddconfig", {}), **raw.get("params", {}).get("ddconfig", {})}
    try:
        return {
            "ch": int(dd["ch"]),
            "ch_mult": [int(m) for m in dd["ch_mult"]],
            "num_res_blocks": int(dd["num_res_blocks"]),
            "attn_resolutions": [int(r) for r in dd.get("attn_resolutions", [])],
            "resolution": int(dd.get("resolution", 256)),
            "z_channels": int(dd["z_channels"]),
            "embed_dim": int(dd.get("embed_dim", raw.get("embed_dim", dd["z_channels"]))),
            "codebook_size": int(dd.get("codebook_size", dd.get("n_embed", raw.get("n_embed", 0)))),
            "in_channels": int(dd.get("in_channels", 3)),
            "out_channels": int(dd.get("out_ch", dd.get("out_channels", 3))),
        }
    except KeyError as e:
        raise ValueError(f"the VQGAN config lacks {e.args[0]!r}: not a taming / Emu3.5-style VQGAN config") from None


def vq_model_config(t: dict) -> dict:
    """A diffusers ``VQModel`` config with the taming network ``t`` (:func:`_taming_config`)."""
    n = len(t["ch_mult"])
    attn = [t["resolution"] // 2**i in t["attn_resolutions"] for i in range(n)]
    return {
        "in_channels": t["in_channels"],
        "out_channels": t["out_channels"],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if attn[n - 1 - k] else "UpDecoderBlock2D" for k in range(n)],
        "block_out_channels": [t["ch"] * m for m in t["ch_mult"]],
        "layers_per_block": t["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": t["z_channels"],
        "sample_size": t["resolution"],
        "num_vq_embeddings": t["codebook_size"],
        "norm_num_groups": 32,
        "vq_embed_dim": t["embed_dim"],
        "norm_type": "group",
        "mid_block_add_attention": True,
        "lookup_from_codebook": False,
        "force_upcast": False,
    }


_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def diffusers_key(key: str, levels: int) -> str:
    """The diffusers ``VQModel`` name of a taming VQGAN weight."""
    k = re.sub(r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0.", key)
    k = re.sub(r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    m = re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.(.*)$", k)
    if m:
        part = {"block": "resnets.", "attn": "attentions.", "upsample": "upsamplers.0."}[m.group(2)]
        k = f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.{part}{m.group(3)}"
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    parts = k.split(".")
    if "attentions" in parts and parts[-2] in _ATTN:
        parts[-2] = _ATTN[parts[-2]]
    elif "resnets" in parts and parts[-2] in _RESNET:
        parts[-2] = _RESNET[parts[-2]]
    return ".".join(parts)


def _read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        raise ValueError(
            f"{d}: no safetensors weights{' (only pickle files: ' + ', '.join(pickles) + ')' if pickles else ''}; "
            "convert them to safetensors first"
        )
    out = {}
    for f in files:
        out.update(load_file(str(d / f)))
    return out


class Emu3VQTokenizer(DiffusersVQTokenizer):
    kind = "emu3"

    def __init__(self, vq_model, directory=None):
        super().__init__(vq_model, directory)
        self.name = self.name.replace("diffusers-vq", "emu3-vq", 1)

    @classmethod
    def load(cls, directory) -> Emu3VQTokenizer:
        d = Path(directory)
        if (d / MARKER).is_file():  # written by save(): a diffusers VQModel folder
            return cls(DiffusersVQTokenizer.load(d).vq, d)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}: no config.json; not an Emu3.5 VQGAN folder")
        from diffusers import VQModel

        t = _taming_config(json.loads((d / "config.json").read_text()))
        model = VQModel(**vq_model_config(t))
        expected = model.state_dict()
        state = {}
        for k, v in _read_safetensors(d).items():
            name = diffusers_key(k, len(t["ch_mult"]))
            if name not in expected:
                if k.startswith(("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")):
                    raise ValueError(f"{d}: weight {k!r} has no place in a VQGAN of this config")
                continue  # e.g. a discriminator or loss network saved beside it
            if v.dim() == 4 and expected[name].dim() == 2:  # attention 1x1 convs -> linear
                v = v[:, :, 0, 0]
            if tuple(v.shape) != tuple(expected[name].shape):
                raise ValueError(f"{d}: {k} has shape {tuple(v.shape)}, the config needs {tuple(expected[name].shape)}")
            state[name] = v
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{d}: {len(missing)} VQGAN weights are missing, e.g. {missing[:3]}")
        model.load_state_dict(state)
        return cls(model, d)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.vq.parameters())
        h = self.vq.encode(images.to(p.device, p.dtype) * 2.0 - 1.0).latents  # quant_conv applied
        b, c, hh, ww = h.shape
        z = h.permute(0, 2, 3, 1).reshape(-1, c).float()
        idx = (z @ self.codebook().to(z.device).T).argmax(dim=1)  # dot product, not L2
        return idx.view(b, hh, ww)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        b, h, w = ids.shape
        q = self.vq.quantize.get_codebook_entry(ids.reshape(-1), (b, h, w, self.vq.quantize.vq_embed_dim))
        out = self.vq.decode(q, force_not_quantize=True).sample.float()
        return ((out.clamp(-1, 1) + 1) * 127.5).floor() / 255.0  # the release truncates to uint8

    def save(self, directory) -> None:
        super().save(directory)
        (Path(directory) / MARKER).write_text(json.dumps({"kind": self.kind}) + "\n")
