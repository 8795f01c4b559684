"""What a training step reports and a logging interval adds up: the numbers of the log line.

Pretraining (:class:`~megamdm.training.trainer.Trainer`) and fine-tuning (:mod:`megamdm.finetune`)
reduce each step's sums (:data:`megamdm.objective.LOGGED_SUMS`) over micro-batches and ranks into a
:class:`StepResult`; a :class:`MetricsWindow` turns an interval of them into loss, metrics,
throughput, MFU and peak memory for :class:`~megamdm.training.logging.RunLogger`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..memory import peak_rss_bytes
from ..objective import BATCH_SUMS, STEP_SUMS, reduce_metrics, unpack_sums
from .flops import body_flops, head_flops


def batch_sums(micro, model: ModelConfig, grid: tuple[int, int]) -> list[float]:
    """The :data:`~megamdm.objective.BATCH_SUMS` of this rank's micro-batches (read on the CPU: no sync)."""
    lens = [n for m in micro for n in (~m.corrupted.text_pad_mask).sum(1).tolist()]
    return [sum(m.prompts_cut for m in micro), sum(lens), body_flops(model, lens, *grid)]


@dataclass
class StepResult:
    sums: torch.Tensor  # STEP_SUMS of the global batch (float64, on the CPU, every rank)
    finite: bool  # False: the step was skipped
    grad_norm: float | None
    grid: tuple[int, int]  # the token grid of this step's batch
    wait_s: float  # time spent waiting for the batch
    prompts_cut: int = 0  # captions of the global batch longer than text.max_len
    prompt_tokens: int = 0  # real (unpadded) prompt tokens of the global batch
    body_flops: float = 0.0  # model FLOPs of the global batch's real positions, the head aside

    @classmethod
    def from_sums(cls, sums: torch.Tensor, finite: bool, grad_norm: float | None, grid: tuple[int, int], wait_s: float):
        """From a step's reduced :data:`~megamdm.objective.LOGGED_SUMS` vector (on the CPU)."""
        batch = dict(zip(BATCH_SUMS, sums[len(STEP_SUMS) :].tolist()))
        return cls(
            sums[: len(STEP_SUMS)],
            finite,
            grad_norm,
            grid,
            wait_s,
            int(batch["prompts_cut"]),
            int(batch["prompt_tokens"]),
            batch["body_flops"],
        )

    def flops(self, model: ModelConfig) -> float:
        """Model FLOPs of the step: the body at the real positions, the head at the supervised ones."""
        return self.body_flops + head_flops(model, unpack_sums(self.sums)["n_tokens"])


@dataclass
class MetricsWindow:
    """What one logging interval accumulates; :meth:`summary` turns it into the logged numbers."""

    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(len(STEP_SUMS), dtype=torch.float64))
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    wait_s: float = 0.0
    prompts_cut: int = 0
    grad_norm: float | None = None
    t0: float = field(default_factory=time.perf_counter)

    def add(self, r: StepResult, samples: int, flops: float) -> None:
        if r.finite:
            self.sums += r.sums
        self.steps += 1
        self.samples += samples
        self.tokens += samples * r.grid[0] * r.grid[1]
        self.flops += flops
        self.wait_s += r.wait_s
        self.prompts_cut += r.prompts_cut
        self.grad_norm = r.grad_norm if r.grad_norm is not None else self.grad_norm

    def summary(self, *, world: int, peak: float) -> dict:
        dt = time.perf_counter() - self.t0
        s = unpack_sums(self.sums)
        tflops = self.flops / dt / world / 1e12
        return {
            "loss": s["loss_sum"] / max(s["n_tokens"], 1),
            **reduce_metrics(s),
            "grad_norm": self.grad_norm,
            "samples_per_s": self.samples / dt,
            "tokens_per_s": self.tokens / dt,
            "tflops_per_gpu": tflops,
            "mfu": tflops / peak if peak else None,
            "data_wait_ms": 1e3 * self.wait_s / max(self.steps, 1),
            "step_time_s": dt / max(self.steps, 1),
            "peak_mem_gb": peak_memory_gb(),
            "prompts_cut": self.prompts_cut or None,
        }


def peak_memory_gb() -> float:
    """This rank's peak memory so far: CUDA's allocator peak on GPUs, the process's peak RSS on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_bytes() / 2**30
