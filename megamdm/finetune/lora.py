"""LoRA for fine-tuning (``finetune.lora_rank``): adapters on the attention and MLP projections (peft),
merged back into plain single-GPU-format weights at export, and saved alone as a few-MB file.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import LORA_TARGETS, FinetuneConfig
from ..formats.single import Pretrained
from ..models.standalone import MDMTransformer


def add_lora(model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS):
    """Wrap the targeted projections with LoRA adapters (peft); only adapters train."""
    from peft import LoraConfig  # the train extra: only LoRA runs need peft
    from peft.tuners.lora import LoraModel

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    return LoraModel(model, cfg, "default")


def merged_state_dict(state: dict, pretrained: Pretrained, options: FinetuneConfig) -> dict:
    """Plain model weights from a full (possibly LoRA-wrapped) state dict, LoRA merged in."""
    if not options.lora_rank:
        return {k[len("model.") :] if k.startswith("model.") else k: v for k, v in state.items()}
    base = MDMTransformer(pretrained.config.model)
    lora = add_lora(base, options.lora_rank, options.lora_alpha, options.lora_targets)
    prefix = "model."
    lora.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return {k: v.detach() for k, v in lora.merge_and_unload().state_dict().items()}


def save_lora_adapter(state: dict, options: FinetuneConfig, path: Path) -> Path:
    """The LoRA weights alone (safetensors, with rank/alpha/targets in the metadata): a few MB to
    share instead of the merged model; :func:`apply_lora_adapter` merges them into a base model."""
    lora = {k[len("model.") :]: v.contiguous() for k, v in state.items() if "lora_" in k}
    meta = {"rank": str(options.lora_rank), "alpha": str(options.lora_alpha), "targets": ",".join(options.lora_targets)}
    save_file(lora, str(path), metadata=meta)
    return path


def apply_lora_adapter(model: nn.Module, path) -> nn.Module:
    """``model`` (standalone, base weights) with a saved adapter merged in."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    wrapped = add_lora(model, int(meta["rank"]), float(meta["alpha"]), tuple(meta["targets"].split(",")))
    missing = set(weights) - set(wrapped.state_dict())
    if missing:
        raise ValueError(f"{path}: adapter tensors {sorted(missing)[:3]} do not match this model")
    wrapped.load_state_dict(weights, strict=False)
    return wrapped.merge_and_unload()
