"""Run logging: one line of numbers per interval on stdout, the same to Weights & Biases and to the
run's ``metrics.jsonl`` (one JSON object per line: the loss curve survives without W&B).

wandb is ``online``, ``offline`` (writes a run directory, needs no network; ``wandb sync`` later)
or ``disabled``, by config. Only one rank logs: the one that holds the loss (pretraining's last,
fine-tuning's first)."""

from __future__ import annotations

import dataclasses
import json
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


METRICS_FILE = "metrics.jsonl"


def eta(seconds: float) -> str:
    """``1h02m``, ``4m05s``, ``12s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RunLogger:
    def __init__(self, cfg, *, active: bool, run_dir: Path | None, total_steps: int):
        self.active, self.total = active, total_steps
        self.run = None
        self.t0 = time.time()
        self.metrics_file = Path(run_dir) / METRICS_FILE if active and run_dir is not None else None
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
        if metrics.get("step_time_s") and step < self.total:
            parts.append(f"eta {eta(metrics['step_time_s'] * (self.total - step))}")
        print(f"[{time.strftime('%H:%M:%S')}] " + " | ".join(parts), flush=True)
        self._append("train", step, metrics)
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in metrics.items() if v is not None}, step=step)

    def valid(self, step: int, metrics: dict) -> None:
        """The held-out loss: ``valid gce | ce | edit`` and each mask ratio's ce, and ``valid/*`` in W&B."""
        if not self.active:
            return
        shown = [f"{k} {metrics[k]:.4f}" for k in ("gce", "ce", "edit") if k in metrics]
        shown += [f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("ce@")]
        print(f"[{time.strftime('%H:%M:%S')}] step {step:>6d}/{self.total} valid " + " | ".join(shown), flush=True)
        self._append("valid", step, {k: v for k, v in metrics.items() if k != "step"})
        if self.run is not None:
            self.run.log({f"valid/{k}": v for k, v in metrics.items() if k != "step"}, step=step)

    def _append(self, split: str, step: int, metrics: dict) -> None:
        if self.metrics_file is None:
            return
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        row = {"split": split, "step": step, "time": round(time.time() - self.t0, 3), **metrics}
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

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
