"""Settings of the GPU path (Transformer Engine, FP8, device binding), checked on CPU by emulating what
the GPU stack would see."""

import sys
import types

import pytest
import torch

pytest.importorskip("megatron.core")

from megamdm.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig, load_config
from megamdm.training.fp8 import allowed_recipes, check_fp8_recipe

from .support.distributed import run_distributed


def _te_kwargs(monkeypatch, precision="bf16", **train):
    """The TransformerConfig arguments megamdm passes on a CUDA machine with TE (the constructor is
    recorded, since TE's fused RoPE does not import here)."""
    from megamdm.models.mcore import model as mcore_model

    monkeypatch.setattr(mcore_model, "TransformerConfig", lambda **kw: kw)
    return mcore_model.transformer_config(
        ModelConfig(), TrainConfig(precision=precision, **train), ParallelConfig(), device="cuda", use_te=True
    )


def test_gradient_accumulation_fusion_only_where_apex_kernel_imports(monkeypatch):
    """TE without apex: megatron's ColumnParallelLinear (the image head) raises at build time when
    gradient_accumulation_fusion is on and fused_weight_gradient_mlp_cuda does not import."""
    monkeypatch.delitem(sys.modules, "fused_weight_gradient_mlp_cuda", raising=False)
    assert _te_kwargs(monkeypatch)["gradient_accumulation_fusion"] is False
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", types.ModuleType("fused_weight_gradient_mlp_cuda"))
    assert _te_kwargs(monkeypatch)["gradient_accumulation_fusion"] is True


def test_fp8_options_reach_megatron(monkeypatch):
    kw = _te_kwargs(monkeypatch, "fp8", fp8_param_gather=True, fp8_first_last_bf16=True)
    assert kw["fp8"] == "hybrid" and kw["fp8_recipe"] == "tensorwise"  # the Hopper default
    assert kw["fp8_param"] is True and kw["first_last_layers_bf16"] is True
    kw = _te_kwargs(monkeypatch, "bf16", fp8_param_gather=True)
    assert kw["fp8"] is None and kw["fp8_param"] is False


def test_fp8_recipe_is_checked_against_the_compute_capability_and_cuda():
    """Transformer Engine's gates: mxfp8 only on 10.x/11.x (it refuses 12.x), blockwise only with CUDA
    12.9+, per-tensor scaling on Ada only with CUDA 12.1+."""
    assert allowed_recipes((9, 0), "13.0") == ["delayed", "tensorwise", "blockwise"]
    assert allowed_recipes((9, 0), "12.8") == ["delayed", "tensorwise"]
    assert allowed_recipes((10, 0), "13.0") == ["delayed", "tensorwise", "blockwise", "mxfp8"]
    assert allowed_recipes((12, 0), "13.0") == ["delayed", "tensorwise", "blockwise"]
    assert allowed_recipes((8, 9), "12.0") == [] and allowed_recipes((8, 9), "12.4") == ["delayed", "tensorwise"]
    check_fp8_recipe("tensorwise", (9, 0), "13.0")
    check_fp8_recipe("mxfp8", (10, 0), "13.0")
    with pytest.raises(
        ConfigError,
        match=r"^train.fp8_recipe=mxfp8 needs compute capability 10.x or 11.x \(data-centre Blackwell\); NVIDIA H100 "
        r"has 9.0 with CUDA 13.0, where train.fp8_recipe may be delayed, tensorwise, blockwise$",
    ):
        check_fp8_recipe("mxfp8", (9, 0), "13.0", "NVIDIA H100")
    with pytest.raises(ConfigError, match=r"mxfp8 needs compute capability 10.x or 11.x.*RTX 5090 has 12.0"):
        check_fp8_recipe("mxfp8", (12, 0), "13.0", "RTX 5090")
    with pytest.raises(ConfigError, match=r"blockwise needs compute capability 9.0 and CUDA 12.9; H100 has 9.0 with CUDA 12.8"):
        check_fp8_recipe("blockwise", (9, 0), "12.8", "H100")
    with pytest.raises(ConfigError, match=r"A100 has 8.0 with CUDA 13.0, where FP8 does not run"):
        check_fp8_recipe("tensorwise", (8, 0), "13.0", "A100")
    with pytest.raises(ConfigError, match=r"train.fp8_first_last_bf16 needs a current-scaling recipe"):
        load_config(None, ["train.fp8_recipe=delayed", "train.fp8_first_last_bf16=true"])


def _bind(local_rank, gpus):
    import os

    from megamdm.training import parallel

    seen = []
    torch.cuda.device_count = lambda: gpus  # a forked rank: these stay in this process
    torch.cuda.set_device = seen.append
    os.environ["LOCAL_RANK"] = str(local_rank)
    parallel.init_distributed("cuda")
    return seen


def test_each_rank_binds_a_gpu_it_can_see():
    """Under srun with one GPU bound per task, LOCAL_RANK 3 sees one device: it must use cuda:0."""
    assert run_distributed(_bind, 1, 3, 1)[0] == [0]
    assert run_distributed(_bind, 1, 3, 8)[0] == [3]
