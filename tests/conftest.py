import os

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _gpu_present() -> bool:
    return any(os.path.exists(f"/dev/nvidia{i}") for i in range(8))


# Triton kernels run through the interpreter on CPU machines (set before triton is imported).
if not _gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

from megamdm.data.shards import BucketBuffer, consolidate, write_part
from megamdm.gce import GCEGroups
from megamdm.vq import KMeansPatchTokenizer, codebook_hash

from .support.checkpoints import tiny_config


@pytest.fixture
def tiny_model_cfg():
    """A very small model: fast enough for many forward passes on CPU."""
    return tiny_config().model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    """Token shards of 96 8x8 grids (8 noisy patterns), a random k-means tokenizer, identity groups."""
    root = tmp_path_factory.mktemp("train")
    tok = KMeansPatchTokenizer(torch.rand(64, 48, generator=torch.Generator().manual_seed(0)), 4)
    tok.save(root / "tok")
    GCEGroups.identity(64, [8], [0.2]).save(root / "groups.safetensors")
    g = np.random.default_rng(0)
    b = BucketBuffer()
    for i in range(96):  # 8 "classes" of 12 noisy copies: learnable
        base = np.random.default_rng(i % 8).integers(0, 64, (8, 8))
        noisy = np.where(g.random((8, 8)) < 0.1, g.integers(0, 64, (8, 8)), base)
        b.add(noisy, f"pattern {i % 8}", f"k{i}", (32, 32), (0, 0), 6.0)
    h = codebook_hash(tok.codebook())
    write_part(root / "ds.zarr", "00000", {"32x32": b}, {"codebook_hash": h})
    consolidate(root / "ds.zarr", tokenizer=tok.name, codebook_hash=h)
    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
