"""Fine-tuning a single-GPU-format checkpoint with DeepSpeed ZeRO (no megatron-core needed):

    loop   the loop on the pretraining loop's pieces: processes, objective, metrics, log line, config sections
    lora   LoRA adapters (peft), merged at export or saved alone
    ema    the EMA of the trainable weights, sharded over the ranks

``megamdm-finetune`` is its command line; ``finetune(checkpoint, finetune_config(...))`` its Python API.
"""

from .loop import DEFAULTS, finetune, finetune_config
from .lora import apply_lora_adapter

__all__ = ["DEFAULTS", "apply_lora_adapter", "finetune", "finetune_config"]
