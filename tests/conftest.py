import os

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _gpu_present() -> bool:
    return any(os.path.exists(f"/dev/nvidia{i}") for i in range(8))


# Triton kernels run through the interpreter on CPU machines (set before triton is imported).
if not _gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from megamdm.config import ModelConfig


@pytest.fixture
def tiny_model_cfg():
    """A very small model: fast enough for many forward passes on CPU."""
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16,
                       ffn_hidden_size=128, image_vocab_size=64, text_vocab_size=384)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
