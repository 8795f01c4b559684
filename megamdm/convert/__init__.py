"""Checkpoint conversion, one module per source: megatron-core ``torch_dist`` training checkpoints
(both directions), Hugging Face LLMs (an MDM initialised from an LLM) and NVIDIA's released
NL-Diffusion-Image folder. Every converter writes the single-GPU format (:mod:`megamdm.formats.single`)
or reads it, streaming one tensor at a time; ``megamdm-convert`` is their command line.
"""

from .hf import from_hf, model_config_from_hf
from .megatron import from_single, to_single
from .nld import from_nld

__all__ = ["from_hf", "from_nld", "from_single", "model_config_from_hf", "to_single"]
