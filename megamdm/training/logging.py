"""Run logging: one line of numbers per interval on stdout, the same to Weights & Biases.

wandb is ``online``, ``offline`` (writes a run directory, needs no network; ``wandb sync`` later)
or ``disabled``, by config. Only one rank logs: the last one, which holds the loss."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

UNITS = [
    ("loss", "{:.4f}"),
    ("ce", "{:.4f}"),
    ("group", "{:.4f}"),
    ("edit", "{:.4f}"),
    ("grad_norm", "{:.3f}"),
    ("lr", "{:.3e}"),
    ("samples_per_s", "{:.1f}"),
    ("tokens_per_s", "{:,.0f}"),
    ("tflops_per_gpu", "{:.3g}"),
    ("mfu", "{:.1%}"),
    ("skipped_steps", "{:d}"),
    ("data_wait_ms", "{:.1f}"),
    ("step_time_s", "{:.3f}"),
    ("peak_mem_gb", "{:.2f}"),
    ("prompts_cut", "{:d}"),  # shown only when a caption was longer than text.max_len
]


class RunLogger:
    def __init__(self, cfg, *, active: bool, run_dir: Path | None, total_steps: int):
        self.active, self.total = active, total_steps
        self.run = None
        self.t0 = time.time()
        lg = cfg.logging
        if active and lg.wandb_mode != "disabled":
            import wandb

            wandb_dir = Path(lg.wandb_dir or (run_dir or Path(".")) / "wandb")
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=lg.wandb_project,
                name=lg.wandb_name,
                dir=str(wandb_dir),
                mode=lg.wandb_mode,
                config=dataclasses.asdict(cfg),
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        parts = [f"step {step:>6d}/{self.total}"]
        for key, fmt in UNITS:
            if key in metrics and metrics[key] is not None:
                parts.append(f"{key} {fmt.format(metrics[key])}")
        print(f"[{time.strftime('%H:%M:%S')}] " + " | ".join(parts), flush=True)
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in metrics.items() if v is not None}, step=step)

    def valid(self, step: int, metrics: dict) -> None:
        """The held-out loss: ``valid gce | ce | edit`` and each mask ratio's ce, and ``valid/*`` in W&B."""
        if not self.active:
            return
        shown = [f"{k} {metrics[k]:.4f}" for k in ("gce", "ce", "edit") if k in metrics]
        shown += [f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("ce@")]
        print(f"[{time.strftime('%H:%M:%S')}] step {step:>6d}/{self.total} valid " + " | ".join(shown), flush=True)
        if self.run is not None:
            self.run.log({f"valid/{k}": v for k, v in metrics.items() if k != "step"}, step=step)

    def info(self, message: str) -> None:
        if self.active:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def images(self, step: int, images, captions) -> None:
        if self.active and self.run is not None:
            import wandb

            self.run.log({"samples": [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
