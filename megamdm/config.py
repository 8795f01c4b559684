"""Typed configuration: dataclasses validated by OmegaConf, YAML files, dotted command-line overrides.

A config file may list other files under ``_base_`` (paths relative to the file); they are merged
first, in order, so ``pretrain_1024.yaml`` can start from ``model/nld_8b.yaml``. Overrides use
OmegaConf's dotlist syntax: ``model.num_layers=4``, ``gce.group_sizes=[8,64]``.
An unknown key or a value of the wrong type is a :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import MegamdmError


class ConfigError(MegamdmError):
    """A config file or override is invalid. The message names the key and its source."""


def choice(default: str, *allowed: str) -> Any:
    """A string field that must be one of ``allowed``: checked for every section at load time."""
    return field(default=default, metadata={"choices": (default, *allowed)})


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The allowed values of a :func:`choice` field."""
    return next(f.metadata["choices"] for f in dataclasses.fields(cls) if f.name == name)


def _check_choices(section: Any, prefix: str) -> None:
    for f in dataclasses.fields(section):
        allowed = f.metadata.get("choices")
        value = getattr(section, f.name)
        if allowed and value not in allowed:
            raise ConfigError(f"{prefix}.{f.name}={value!r} is not one of {', '.join(allowed)}")


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int = 2  # key/value heads (GQA)
    head_dim: int = 64
    ffn_hidden_size: int = 768
    image_vocab_size: int = 1024  # V; the MASK id is V
    text_vocab_size: int = 384  # rows of the text embedding (>= the text tokenizer's vocabulary)
    rope_theta: float = 10000.0
    rope_2d: bool = False  # 2-D (row, column) RoPE for image positions instead of 1-D
    rope_scaling: str = "none"  # none | yarn (NL-Diffusion-Image and Ministral-3: factor 16 over 16384 positions)
    rope_factor: float = 1.0  # yarn: how much longer than original_max_positions the context may be
    rope_original_max_positions: int = 0  # yarn: the pretraining context its frequencies were fitted to
    rope_beta_fast: float = 32.0  # yarn: frequencies turning more often than this over it are kept
    rope_beta_slow: float = 1.0  # yarn: frequencies turning less often are divided by rope_factor
    # where images sit: 0 right after each prompt's real tokens (per-sample positions, so padding and
    # trimming move nothing); n > 0 every image at position n (checkpoints before 0.2: n = their text.max_len)
    fixed_image_start: int = 0
    text_after_image: int = 0  # the last n prompt tokens follow the image (NL-Diffusion-Image's template)
    norm_eps: float = 1e-5
    # RMSNorm of each image embedding before the 2x2 merge, and of the hidden states before the unmerge
    # (NL-Diffusion-Image's down-/up-sampler norms, eps 1e-6); off for megamdm-trained models
    merge_norm: bool = False
    unmerge_norm: bool = False
    merge_norm_eps: float = 1e-6
    init_std: float = 0.02
    vocab_pad_multiple: int = 128  # embedding tables are padded to this, so any TP size divides them

    @property
    def image_mask_id(self) -> int:
        return self.image_vocab_size

    @property
    def image_embed_rows(self) -> int:
        return _round_up(self.image_vocab_size + 1, self.vocab_pad_multiple)

    def validate(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.num_query_groups}"
            )
        if self.rope_scaling not in ("none", "yarn"):
            raise ConfigError(f"model.rope_scaling={self.rope_scaling!r} is not one of none, yarn")
        if self.rope_scaling == "yarn" and (self.rope_factor < 1.0 or self.rope_original_max_positions < 1):
            raise ConfigError(
                f"model.rope_scaling=yarn needs rope_factor >= 1 and rope_original_max_positions >= 1, got "
                f"{self.rope_factor} and {self.rope_original_max_positions}"
            )
        if self.fixed_image_start < 0 or self.text_after_image < 0:
            raise ConfigError(
                f"model.fixed_image_start={self.fixed_image_start} and "
                f"model.text_after_image={self.text_after_image} must be >= 0"
            )
        if self.text_after_image and (self.fixed_image_start or self.rope_2d):
            raise ConfigError(
                "model.text_after_image needs per-sample positions with 1-D RoPE (fixed_image_start=0, rope_2d=false)"
            )
        if self.head_dim % 2 or (self.rope_2d and self.head_dim % 4):
            raise ConfigError(f"model.head_dim={self.head_dim} must be even (a multiple of 4 with rope_2d)")
        if self.text_vocab_size % self.vocab_pad_multiple:
            raise ConfigError(
                f"model.text_vocab_size={self.text_vocab_size} must be a multiple of "
                f"model.vocab_pad_multiple={self.vocab_pad_multiple}"
            )


@dataclass
class TextConfig:
    tokenizer: str = "byte"  # "byte" (built in) or a local Hugging Face tokenizer directory
    max_len: int = 64  # L_text: prompts are padded / truncated to this many tokens
    micro_conditioning: bool = True  # append "| size WxH | crop T,L | score S" to the caption
    default_score: float = 6.5
    mask_token: str | None = None  # HF tokenizers: the token used as the text MASK
    # the dropped / unconditional prompt: this many MASK tokens, then padding; 0: max_len of them (megamdm
    # 0.2's, which keeps every step with a dropped prompt at max_len positions); -1: the prompt's own length
    drop_len: int = 0
    template: str = choice("megamdm", "nld")  # nld: NL-Diffusion-Image's ChatML conversation (needs drop_len -1)

    def validate(self) -> None:
        if self.template == "nld" and self.drop_len != -1:
            raise ConfigError(
                f"text.template=nld masks the system and user turns of a dropped prompt: it needs text.drop_len=-1, "
                f"not {self.drop_len}"
            )
        if not -1 <= self.drop_len <= self.max_len:
            raise ConfigError(
                f"text.drop_len={self.drop_len} must be in [-1, text.max_len={self.max_len}] (0: max_len, -1: own length)"
            )


@dataclass
class ImageTokenizerConfig:
    kind: str = choice("kmeans", "diffusers", "emu3")  # emu3: NL-Diffusion-Image's Emu3.5 / IBQ VQGAN
    path: str | None = None


@dataclass
class GCEConfig:
    groups_file: str | None = None  # built by tools/build_gce_groups.py; None: identity order
    group_sizes: list[int] = field(default_factory=lambda: [8])
    group_weights: list[float] = field(default_factory=lambda: [0.2])
    impl: str = choice("torch", "naive", "triton")
    z_loss_weight: float = 0.0
    grad_filter: float = 0.0  # triton: skip gradient tiles whose softmax stays below this (inexact; CCE uses 2**-12)

    def validate(self) -> None:
        if not 0.0 <= self.grad_filter < 1.0:
            raise ConfigError(f"gce.grad_filter={self.grad_filter} must be in [0, 1) (0: no filtering)")
        if self.grad_filter and self.impl != "triton":
            raise ConfigError(f"gce.grad_filter needs gce.impl=triton, not {self.impl}")
        if len(self.group_sizes) != len(self.group_weights):
            raise ConfigError(
                f"gce.group_sizes has {len(self.group_sizes)} levels but gce.group_weights has {len(self.group_weights)}"
            )


@dataclass
class DiffusionConfig:
    t_schedule: str = choice("uniform", "cosine", "logit_normal")
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    eps: float = 1e-3
    prompt_drop: float = 0.1
    flip_ratio: float = 0.2
    flip_mode: str = choice("uniform", "group")
    edit_loss_weight: float = 0.2

    def validate(self) -> None:
        for name in ("prompt_drop", "flip_ratio", "eps"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"diffusion.{name}={v} must be in [0, 1)")


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # zarr token-shard datasets
    resolutions: list[str] = field(default_factory=list)  # buckets to train on, e.g. ["256x256"]; empty: all
    micro_batch_size: int = 8
    global_batch_size: int = 64
    num_workers: int = 2  # background processes building batches (spawned: tensorstore forbids fork)
    prefetch: int = 4  # batches in flight per worker
    reader: str = choice("auto", "tensorstore", "zarr")  # auto: tensorstore when installed
    seed: int = 1234
    trim_text: bool = True  # cut each step's prompts to its longest (multiple of 8): padding costs compute
    group_by_length: int = 0  # >0: sort each window of this many global batches by prompt length (trimming then cuts more)
    valid_shards: list[str] = field(default_factory=list)  # held-out datasets for train.eval_interval
    valid_samples: int = 256  # the first this many validation samples (fixed order) are evaluated
    valid_mask_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # fixed t per pass


@dataclass
class TrainConfig:
    """What is trained, on what, for how long."""

    device: str = choice("auto", "cuda", "cpu")
    transformer_impl: str = choice("auto", "transformer_engine", "local")
    # the local spec's core attention: sdpa (PyTorch's fused kernels) or megatron's unfused one; auto: sdpa on CUDA
    attention: str = choice("auto", "sdpa", "local")
    # the local spec's RMSNorm: compiled (one fused kernel each way) or eager; auto: compiled on CUDA
    norm: str = choice("auto", "compiled", "eager")
    # auto: bf16 on GPUs; on CPUs whichever of bf16 / fp32 the CPU multiplies faster (measured at start-up)
    precision: str = choice("auto", "bf16", "fp32", "fp8")
    # tensorwise (current scaling): Megatron-Bridge's H100 default; mxfp8 needs Blackwell (training.fp8)
    fp8_recipe: str = choice("tensorwise", "delayed", "blockwise", "mxfp8")
    fp8_param_gather: bool = False  # keep parameters in FP8 and all-gather them so (halves the gather)
    fp8_first_last_bf16: bool = False  # the first and last transformer layer in bf16 (not with delayed)
    recompute: str | None = None  # None | full | selective
    steps: int = 1000
    seed: int = 1234
    exit_after_steps: int = 0  # stop (with a checkpoint) after this many steps in this process; 0: off
    ema_decay: float = 0.0  # EMA of the fp32 master weights (e.g. 0.999); 0: off
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at update n
    eval_interval: int = 0  # validation loss every this many steps (and at the end); 0: off

    def validate(self) -> None:
        if self.recompute not in (None, "full", "selective"):
            raise ConfigError(f"train.recompute={self.recompute!r} is not one of null, full, selective")
        if not (self.ema_decay == 0.0 or 0.0 < self.ema_decay < 1.0):
            raise ConfigError(f"train.ema_decay={self.ema_decay} must be in (0, 1), or 0 for no EMA")
        if self.eval_interval < 0:
            raise ConfigError(f"train.eval_interval={self.eval_interval} must be >= 0 (0: no validation)")
        if self.fp8_first_last_bf16 and self.fp8_recipe == "delayed":
            raise ConfigError(
                "train.fp8_first_last_bf16 needs a current-scaling recipe: "
                "train.fp8_recipe tensorwise, blockwise or mxfp8, not delayed"
            )


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    # overlap the data-parallel gradient reduce-scatter with backward / the parameter all-gather with the
    # next forward (distributed optimizer); null: on with CUDA, off on CPU
    overlap_grad_reduce: bool | None = None
    overlap_param_gather: bool | None = None
    grad_reduce_dtype: str = choice("fp32", "bf16")  # bf16 halves the reduction's bytes (Megatron-Bridge's default)


@dataclass
class OptimConfig:
    """Adam and its LR schedule (megatron-core's OptimizerParamScheduler)."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    lr_decay_style: str = choice("cosine", "linear", "constant", "inverse-square-root", "WSD")
    lr_wsd_decay_fraction: float = 0.2  # WSD: the last fraction of the steps anneals to min_lr
    lr_wsd_decay_style: str = choice("linear", "cosine", "exponential", "minus_sqrt")  # the WSD anneal
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0

    def validate(self) -> None:
        if not 0.0 < self.lr_wsd_decay_fraction <= 1.0:
            raise ConfigError(f"optim.lr_wsd_decay_fraction={self.lr_wsd_decay_fraction} must be in (0, 1]")


@dataclass
class CheckpointConfig:
    save_dir: str | None = None
    save_interval: int = 1000
    keep_last: int = 3
    async_save: bool = False
    resume: str = "auto"  # auto | none | <path to an iter_NNNNNNN directory>
    init_from: str | None = None  # model weights to start from: a single-GPU-format dir or a torch_dist checkpoint
    # optimizer state loadable at any TP/PP: dp = never (resumes at any DP), final = the run's last save, always
    reshardable: str = choice("dp", "final", "always")
    resume_changed_model: bool = False  # resume although the model / tokenizer settings differ from the checkpoint's


@dataclass
class LoggingConfig:
    log_interval: int = 10
    sample_interval: int = 0  # 0: off
    sample_prompts: list[str] = field(default_factory=list)
    peak_tflops: float = 0.0  # per device; 0: detect (H100/H200 bf16 989, fp8 1979)
    wandb_mode: str = choice("disabled", "online", "offline")
    wandb_project: str = "megamdm"
    wandb_name: str | None = None
    wandb_dir: str | None = None


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneConfig:
    """DeepSpeed fine-tuning of a single-GPU-format checkpoint (``megamdm-finetune``)."""

    deepspeed_config: str = "configs/deepspeed/zero2.json"
    out: str = "finetune_out"  # DeepSpeed checkpoints and the exported single-GPU checkpoint
    steps: int = 1000
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    precision: str = choice("bf16", "fp32")
    save_interval: int = 500
    log_interval: int = 10
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False  # recompute each block's activations in backward
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    export: bool = True
    seed: int = 1234
    ema_decay: float = 0.0  # EMA of the trainable weights (exported instead of the last step's); 0: off
    ema_warmup: bool = True


@dataclass
class PreprocessConfig:
    """Image shards -> token shards (``megamdm-preprocess``)."""

    resolution: int = 256
    aspect_buckets: bool = False
    crop: str = choice("center", "random")
    batch_size: int = 64
    device: str = choice("cpu", "cuda")  # cuda: DALI mixed decoding, tokenizer on the GPU
    device_id: int | None = None
    num_threads: int = 2

    def __post_init__(self) -> None:
        _check_choices(self, "preprocess")


# keys that lived under ``train:`` before megamdm 0.2: every field of these sections
MOVED_FROM_TRAIN = {
    f.name: section
    for section, cls in (
        ("parallel", ParallelConfig),
        ("optim", OptimConfig),
        ("checkpoint", CheckpointConfig),
        ("logging", LoggingConfig),
    )
    for f in dataclasses.fields(cls)
}


@dataclass
class SampleSettings:
    """What one sampling call needs (docs/design.md §1.3); :class:`SampleConfig` adds canvas and seed."""

    steps: int = 20
    cfg: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    schedule: str = choice("shift", "cosine")
    shift: float = 3.0
    policy: str = choice("gumbel", "maskgit", "stratified")
    gumbel_temperature: float = 1.0
    edit_threshold: float = 0.0  # <= 0 disables token editing
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide steps with lo <= k/steps < hi
    # NL-Diffusion-Image's released sampler differs in these three (docs/sampling.md):
    filter_order: str = choice("temperature_first", "filter_first")  # filter_first: top-k/top-p, then temperature
    # raw: a token's probability under the untempered, unfiltered softmax; untempered: under the filtered one
    confidence: str = choice("sampled", "raw", "untempered")
    final_prediction: bool = False  # with editing: after the last step every position takes that step's prediction
    schedule_counts: str = choice("megamdm", "nld")  # nld: fp32, truncated, each step >= 1, excess back from the last
    maskgit_draw: str = choice("confidence", "softmax")  # softmax: maskgit draws by softmax(confidence / gumbel_temperature)
    # the Gumbel / maskgit temperature over the steps: falls from gumbel_temperature to min_gumbel_temperature times it
    gumbel_temperature_schedule: str = choice("constant", "linear", "cosine", "shift", "exp")
    min_gumbel_temperature: float = 0.01
    stratified_order: str = choice("halton", "pmj")  # pmj: the release's progressive multi-jittered order (seed 42)
    cfg_interval_rule: str = choice("megamdm", "nld")  # nld: guided at 1-based steps int(lo n) <= k <= int(hi n)

    def validate(self) -> SampleSettings:
        """ValueError naming the setting and what is allowed (sampler calls pass settings directly)."""
        for name in (f.name for f in dataclasses.fields(SampleSettings) if "choices" in f.metadata):
            allowed = choices(SampleSettings, name)
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        lo_hi = list(self.cfg_interval)
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
            raise ValueError(f"cfg_interval must be two fractions 0 <= lo <= hi <= 1 of the steps, got {lo_hi}")
        return self

    def guided(self, step: int) -> bool:
        """Whether step ``step`` (0-based) runs classifier-free guidance."""
        lo, hi = self.cfg_interval
        if self.cfg_interval_rule == "nld":
            return self.cfg > 0 and int(lo * self.steps) <= step + 1 <= int(hi * self.steps)
        return self.cfg != 0 and lo <= step / self.steps < hi

    def gumbel_temperature_at(self, step: int) -> float:
        """The Gumbel / maskgit-draw temperature of step ``step`` (0-based): ``gumbel_temperature`` times
        a factor that falls from 1 to ``min_gumbel_temperature`` over the steps (NL-Diffusion-Image's
        dynamic temperature), or 1 throughout (``constant``)."""
        kind, lo = self.gumbel_temperature_schedule, self.min_gumbel_temperature
        if kind == "constant":
            return self.gumbel_temperature
        t = step / (self.steps - 1) if self.steps > 1 else 0.0  # linspace(0, 1, steps)
        x = 1.0 - t
        if kind == "linear":
            f = x
        elif kind == "cosine":
            f = math.cos(math.pi * t / 2)
        elif kind == "shift":
            f = self.shift * x / (1 + (self.shift - 1) * x)
        else:  # exp
            f = min(max((1 - math.exp(-5 * x)) / (1 - math.exp(-5)), 1e-4), 1.0)
        return self.gumbel_temperature * (f * (1 - lo) + lo)

    @property
    def editing(self) -> bool:
        return self.edit_threshold > 0

    def settings(self) -> SampleSettings:
        """Just the sampling-call fields (a :class:`SampleConfig` without canvas and seed)."""
        return SampleSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SampleSettings)})


# Named sets of sampler settings; a preset sets every field it names, the rest keep their defaults.
SAMPLE_PRESETS = {
    # NL-Diffusion-Image's released sampler (docs/sampling.md "Presets"); editing stays off unless asked for
    "nld": dict(
        steps=20,
        cfg=5.0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        schedule="shift",
        shift=3.0,
        policy="gumbel",
        gumbel_temperature=1.0,
        edit_threshold=0.0,
        cfg_interval=[0.0, 1.0],
        filter_order="filter_first",
        final_prediction=True,
        schedule_counts="nld",
        maskgit_draw="softmax",
        confidence="untempered",
        stratified_order="pmj",
        cfg_interval_rule="nld",
        gumbel_temperature_schedule="constant",  # the release's dynamic_temperature is off by default
    ),
}


def preset_settings(name: str) -> dict:
    """The settings of a sampler preset (:data:`SAMPLE_PRESETS`)."""
    if name not in SAMPLE_PRESETS:
        raise ValueError(f"unknown sampler preset {name!r}; allowed: {', '.join(SAMPLE_PRESETS)}")
    return {k: list(v) if isinstance(v, list) else v for k, v in SAMPLE_PRESETS[name].items()}


@dataclass
class SampleConfig(SampleSettings):
    height: int = 256
    width: int = 256
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    gce: GCEConfig = field(default_factory=GCEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            _check_choices(getattr(self, f.name), f.name)
        self.model.validate()
        self.text.validate()
        self.gce.validate()
        self.diffusion.validate()
        self.train.validate()
        self.optim.validate()
        for section, name, least in (
            ("checkpoint", "save_interval", 1),
            ("checkpoint", "keep_last", 0),
            ("logging", "log_interval", 1),
            ("logging", "sample_interval", 0),
            ("data", "micro_batch_size", 1),
            ("data", "global_batch_size", 1),
            ("data", "group_by_length", 0),
        ):
            v = getattr(getattr(self, section), name)
            if v < least:
                raise ConfigError(f"{section}.{name}={v} must be >= {least}")
        if self.train.eval_interval and not self.data.valid_shards:
            raise ConfigError("train.eval_interval needs data.valid_shards: the held-out datasets to evaluate")
        d = self.data
        if d.valid_samples < 1:
            raise ConfigError(f"data.valid_samples={d.valid_samples} must be >= 1")
        if not d.valid_mask_ratios or any(not 0.0 < r <= 1.0 for r in d.valid_mask_ratios):
            raise ConfigError(f"data.valid_mask_ratios={d.valid_mask_ratios}: give one or more ratios in (0, 1]")
        try:
            self.sample.validate()
        except ValueError as e:
            raise ConfigError(f"sample: {e}") from None
        return self


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ includes itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    bases = raw.pop("_base_", []) if isinstance(raw, DictConfig) else []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    for b in bases:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / b, seen + (path,)))
    return OmegaConf.merge(merged, raw)


def _moved_keys(layer: DictConfig, source: str, migrate: bool) -> DictConfig:
    """Keys of the pre-0.2 ``train:`` section: moved to their sections (``migrate``, for configs that
    older checkpoints saved) or refused with the new name (anything a user writes today)."""
    train = layer.get("train") if isinstance(layer, DictConfig) else None
    if not isinstance(train, DictConfig):
        return layer
    moved = [k for k in list(train.keys()) if k in MOVED_FROM_TRAIN]
    if moved and not migrate:
        k = moved[0]
        raise ConfigError(
            f"{source}: train.{k} is now {MOVED_FROM_TRAIN[k]}.{k}"
            + (f" (and {len(moved) - 1} more train.* keys moved likewise)" if len(moved) > 1 else "")
        )
    for k in moved:
        section = MOVED_FROM_TRAIN[k]
        if section not in layer:
            layer[section] = {}
        layer[section][k] = train.pop(k)
    return layer


def legacy_positions(layer):
    """A saved config (a YAML layer, or a checkpoint's JSON as a dict) without
    ``model.fixed_image_start`` is of a model trained before per-sample positions: its images sat at
    position ``text.max_len``, after the padded prompt."""
    if isinstance(layer, (dict, DictConfig)) and "fixed_image_start" not in (layer.get("model") or {}):
        text = layer.get("text") or {}
        if "model" not in layer:
            layer["model"] = {}
        layer["model"]["fixed_image_start"] = int(text.get("max_len", TextConfig.max_len))
    return layer


def _merge_checked(schema: Any, layer: DictConfig, source: str) -> Any:
    try:
        return OmegaConf.merge(schema, layer)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: {key}: {msg}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, *, migrate: bool = False) -> Config:
    """Load a :class:`Config` from a YAML file (or the defaults) plus dotted overrides. ``migrate``
    accepts the layout of configs saved by megamdm < 0.2 (``train.lr`` for ``optim.lr``, ...)."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        layer = _moved_keys(_read_yaml(Path(path)), str(path), migrate)
        cfg = _merge_checked(cfg, legacy_positions(layer) if migrate else layer, str(path))
    if overrides:
        try:
            layer = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as e:
            raise ConfigError(f"command line: cannot parse overrides {overrides}: {e}") from None
        cfg = _merge_checked(cfg, _moved_keys(layer, "command line", False), "command line")
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    return obj.validate()


def load_config_text(text: str, source: str = "a checkpoint's config") -> Config:
    """A :class:`Config` from YAML text (a checkpoint's saved config; older layouts migrated)."""
    layer = legacy_positions(_moved_keys(OmegaConf.create(text), source, True))
    cfg = _merge_checked(OmegaConf.structured(Config), layer, source)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def section_from_dict(cls: type, data: dict, source: str) -> Any:
    """Build one config section (e.g. ModelConfig) from a plain dict with the same checks."""
    schema = OmegaConf.structured(cls)
    return OmegaConf.to_object(_merge_checked(schema, OmegaConf.create(data), source))


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def add_config_args(parser) -> None:
    """The standard ``--config FILE`` and ``--set key=value`` arguments of every megamdm command."""
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable: --set model.num_layers=4",
    )
    parser.add_argument(
        "overrides_positional", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides without --set"
    )


def parse_config_args(parser, argv=None) -> tuple[Any, Config]:
    """Parse a command line with the config arguments; a bad config prints one line and exits 2."""
    args = parser.parse_args(argv)
    try:
        return args, load_config(args.config, list(args.overrides) + list(args.overrides_positional))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
