"""The machine adapters are explicit and reversible: a library call leaves the process as it found it."""

import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from megamdm.compat.cpu_precision import CpuMatmulProbe, resolve_cpu_precision

from .support.checkpoints import make_tiny_checkpoint


def _process_state() -> dict:
    """Everything the CPU adapters touch, by identity."""
    import torch.autograd.graph as graph
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as mrandom

    state = {f"torch.cuda.{n}": getattr(torch.cuda, n) for n in ("current_device", "synchronize", "empty_cache", "set_device")}
    state.update(
        {
            "graph._engine_run_backward": graph._engine_run_backward,
            "autograd._engine_run_backward": torch.autograd._engine_run_backward,
            "torch function modes": torch._C._len_torch_function_stack(),
            "warning filters": list(warnings.filters),
            "writer queue": fa._results_queue,
            "DistributedOptimizer.load_state_dict": DistributedOptimizer.load_state_dict,
            "DistributedOptimizer._set_main_param_and_optimizer_states": (
                DistributedOptimizer._set_main_param_and_optimizer_states
            ),
            "rng tracker": mrandom._CUDA_RNG_STATE_TRACKER,
            "rng get": mrandom._get_cuda_rng_state,
            "SIGTERM": signal.getsignal(signal.SIGTERM),
        }
    )
    return state


def test_from_single_in_process_leaves_the_process_as_it_found_it(tmp_path):
    """convert.from_single enters megatron-on-CPU, a process group and a writer queue for the call only."""
    pytest.importorskip("megatron.core")
    from megamdm.convert import from_single
    from megamdm.formats.run_layout import latest_iteration

    single = make_tiny_checkpoint(tmp_path / "single")
    before = _process_state()
    from_single(single, tmp_path / "dist")
    after = _process_state()
    assert latest_iteration(tmp_path / "dist") == 0
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, changed
    assert not torch.distributed.is_initialized()
    assert torch.zeros(1).type() == "torch.FloatTensor"  # no CUDA type names outside the context


def test_megatron_on_cpu_redirects_inside_and_restores_after():
    pytest.importorskip("megatron.core")
    from megamdm.compat.megatron_cpu import active, megatron_on_cpu

    before = _process_state()
    with megatron_on_cpu():
        assert active()
        assert torch.cuda.current_device() == torch.device("cpu")
        x = torch.zeros(2, device="cuda")  # megatron's hard-coded literals land on the CPU
        assert x.device.type == "cpu" and x.cuda() is x and x.type() == "torch.cuda.FloatTensor"
        y = torch.ones(3, requires_grad=True)
        (y.to("cuda") * 2).sum().backward()  # the mode is re-entered inside autograd's engine
        assert torch.equal(y.grad, torch.full((3,), 2.0))
    assert not active()
    assert _process_state() == before
    assert torch.zeros(2).type() == "torch.FloatTensor"


def test_deepspeed_shm_comm_is_disabled_only_inside():
    deepspeed = pytest.importorskip("deepspeed")
    from megamdm.compat.deepspeed_cpu import no_shm_comm

    table = deepspeed.ops.__compatible_ops__
    before = dict(table)
    with no_shm_comm():
        assert table["deepspeed_shm_comm"] is False
    assert dict(table) == before


def test_probe_prefers_the_faster_dtype():
    assert CpuMatmulProbe("AVX512", 170.0, 80.0).fast_dtype == "bf16"
    assert CpuMatmulProbe("AVX2", 1.9, 60.0).fast_dtype == "fp32"
    assert resolve_cpu_precision("fp32") == ("fp32", None)
    chosen, probe = resolve_cpu_precision("auto")
    assert chosen == probe.fast_dtype and probe.bf16_gflops > 0 and probe.fp32_gflops > 0


def test_probe_chooses_fp32_on_an_avx2_only_cpu():
    """With torch, oneDNN and MKL held to AVX2 (what an AVX2-only x86 CPU runs), bf16 matmuls take the
    scalar fallback, and ``precision: auto`` must pick fp32."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("not an x86 CPU")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    code = (
        "from megamdm.compat.cpu_precision import probe; p = probe(); "
        "print(p.capability, p.fast_dtype, round(p.bf16_gflops / p.fp32_gflops, 3))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    capability, dtype, ratio = out.split()
    assert capability == "AVX2" and dtype == "fp32", out
    assert float(ratio) < 0.5, out


def test_from_single_writes_absolute_paths_and_replaces_only_a_run(tmp_path, monkeypatch):
    """The run it wrote named the tokenizers relative to the working directory; a second conversion
    into the same folder ended in a traceback, and --overwrite must never delete a folder that is not a run."""
    pytest.importorskip("megatron.core")
    from megamdm.config import load_config
    from megamdm.convert import from_single
    from megamdm.errors import ConversionError

    make_tiny_checkpoint(tmp_path / "single")
    monkeypatch.chdir(tmp_path)
    from_single("single", "dist")
    saved = load_config(tmp_path / "dist/iter_0000000/config.yaml")
    assert saved.image_tokenizer.path == str(tmp_path / "single/image_tokenizer")
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        from_single("single", "dist")
    from_single("single", "dist", overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep")
    with pytest.raises(ConversionError, match="is not a training run"):
        from_single("single", "mine", overwrite=True)
    assert (tmp_path / "mine/notes.txt").read_text() == "keep"
