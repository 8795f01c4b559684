"""Typed configuration: dataclasses validated by OmegaConf, YAML files, dotted command-line overrides.

A config file may list other files under ``_base_`` (paths relative to the file); they are merged
first, in order, so ``pretrain_1024.yaml`` can start from ``model/nld_8b.yaml``. Overrides use
OmegaConf's dotlist syntax: ``model.num_layers=4``, ``gce.group_sizes=[8,64]``.
An unknown key or a value of the wrong type is a :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import MegamdmError
from .options import as_overrides, bad_choices, choice, given, setting, show
from .sampling.settings import SampleConfig


class ConfigError(MegamdmError):
    """A config file or override is invalid. The message names the key and its source."""


def _check_choices(section: Any, prefix: str) -> None:
    for name, value, allowed in bad_choices(section):
        raise ConfigError(f"{prefix}.{name}={value!r} is not one of {', '.join(show(a) for a in allowed)}")


@dataclass
class ModelConfig:
    """The network: sizes, vocabularies, positions (docs/design.md §1.1)."""

    num_layers: int = setting(4, "transformer blocks")
    hidden_size: int = setting(256, "model width d")
    num_attention_heads: int = setting(4, "query heads")
    num_query_groups: int = setting(2, "key/value heads (GQA)")
    head_dim: int = setting(64, "width of one head")
    ffn_hidden_size: int = setting(768, "SwiGLU inner width")
    image_vocab_size: int = setting(1024, "V, the image tokenizer's codes; the MASK id is V")
    text_vocab_size: int = setting(384, "rows of the text embedding (>= the text tokenizer's vocabulary)")
    rope_theta: float = setting(10000.0, "RoPE base")
    rope_2d: bool = setting(False, "2-D (row, column) RoPE for image positions instead of 1-D")
    rope_scaling: str = choice(
        "none", "yarn", help="yarn: NL-Diffusion-Image's and Ministral-3's (factor 16 over 16384 positions)"
    )
    rope_factor: float = setting(1.0, "yarn: how much longer than rope_original_max_positions the context may be")
    rope_original_max_positions: int = setting(0, "yarn: the pretraining context its frequencies were fitted to")
    rope_beta_fast: float = setting(32.0, "yarn: frequencies turning more often than this over it are kept")
    rope_beta_slow: float = setting(1.0, "yarn: frequencies turning less often are divided by rope_factor")
    fixed_image_start: int = setting(
        0,
        "where images sit: 0 right after each prompt's real tokens (per-sample positions, so padding and trimming "
        "move nothing); n > 0 every image at position n (checkpoints before 0.2: n = their text.max_len)",
    )
    text_after_image: int = setting(0, "the last n prompt tokens follow the image (NL-Diffusion-Image's template)")
    norm_eps: float = setting(1e-5, "RMSNorm epsilon of the blocks")
    merge_norm: bool = setting(
        False, "RMSNorm of each image embedding before the 2x2 merge (NL-Diffusion-Image's downsampler norm)"
    )
    unmerge_norm: bool = setting(False, "RMSNorm of the hidden states before the unmerge (NL-Diffusion-Image's upsampler norm)")
    merge_norm_eps: float = setting(1e-6, "epsilon of the merge and unmerge norms")
    init_std: float = setting(0.02, "standard deviation of the initial weights")
    vocab_pad_multiple: int = setting(128, "embedding tables are padded to this, so any TP size divides them")

    @property
    def image_mask_id(self) -> int:
        return self.image_vocab_size

    @property
    def image_embed_rows(self) -> int:
        return _round_up(self.image_vocab_size + 1, self.vocab_pad_multiple)

    def validate(self) -> None:
        _check_choices(self, "model")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.num_query_groups}"
            )
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
    """The prompt: tokenizer, length, template (megamdm/text.py)."""

    tokenizer: str = setting("byte", '"byte" (built in) or a local Hugging Face tokenizer directory')
    max_len: int = setting(64, "L_text: prompts are padded / truncated to this many tokens")
    micro_conditioning: bool = setting(True, 'append "| size WxH | crop T,L | score S" to the caption')
    default_score: float = setting(6.5, "the aesthetic score micro-conditioning states at sampling time")
    mask_token: str | None = setting(None, "Hugging Face tokenizers: the token used as the text MASK")
    drop_len: int = setting(
        0,
        "the dropped / unconditional prompt: this many MASK tokens, then padding; 0: max_len of them (megamdm "
        "0.2's); -1: the prompt's own length",
    )
    template: str = choice("megamdm", "nld", help="nld: NL-Diffusion-Image's ChatML conversation (needs drop_len -1)")

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
    """The image tokenizer (megamdm/vq/)."""

    kind: str = choice("kmeans", "diffusers", "emu3", help="emu3: NL-Diffusion-Image's Emu3.5 / IBQ VQGAN")
    path: str | None = setting(None, "its directory")


@dataclass
class GCEConfig:
    """Grouped Cross-Entropy (docs/gce.md)."""

    groups_file: str | None = setting(None, "built by megamdm-build-gce-groups; null: identity order")
    group_sizes: list[int] = setting([8], "group size of each level")
    group_weights: list[float] = setting([0.2], "lambda of each level")
    impl: str = choice("torch", "naive", "triton", help="the operator: chunked PyTorch, materialised logits, Triton")
    z_loss_weight: float = setting(0.0, "weight of the z-loss (lse squared)")
    grad_filter: float = setting(0.0, "triton: skip gradient tiles whose softmax stays below this (inexact; CCE uses 2**-12)")

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
    """The training corruption (docs/design.md §1.2)."""

    t_schedule: str = choice("uniform", "cosine", "logit_normal", help="how the mask ratio t is drawn")
    logit_normal_mean: float = setting(0.0, "logit_normal: mean of the normal")
    logit_normal_std: float = setting(1.0, "logit_normal: standard deviation of the normal")
    eps: float = setting(1e-3, "the mask ratio is (1 - eps) t + eps")
    prompt_drop: float = setting(0.1, "probability that a sample's prompt is dropped (the unconditional branch)")
    flip_ratio: float = setting(0.2, "share of the visible tokens flipped to another token (teaches editing)")
    flip_mode: str = choice("uniform", "group", help="a flip's new token: any, or a neighbour in its level-0 GCE group")
    edit_loss_weight: float = setting(0.2, "loss weight of the flipped tokens")

    def validate(self) -> None:
        for name in ("prompt_drop", "flip_ratio", "eps"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"diffusion.{name}={v} must be in [0, 1)")


@dataclass
class DataConfig:
    """Token shards and batches (docs/data.md)."""

    shards: list[str] = setting([], "zarr token-shard datasets")
    resolutions: list[str] = setting([], 'buckets to train on, e.g. ["256x256"]; empty: all')
    micro_batch_size: int = setting(8, "samples per rank and forward pass")
    global_batch_size: int = setting(64, "samples per optimizer step, over every rank")
    num_workers: int = setting(2, "background processes building batches (spawned: tensorstore forbids fork)")
    prefetch: int = setting(4, "batches in flight per worker")
    reader: str = choice("auto", "tensorstore", "zarr", help="auto: tensorstore when installed")
    seed: int = setting(1234, "seed of the epoch order and of every sample's corruption")
    trim_text: bool = setting(True, "cut each step's prompts to its longest (multiple of 8): padding costs compute")
    group_by_length: int = setting(
        0, ">0: sort each window of this many global batches by prompt length (trimming then cuts more)"
    )
    valid_shards: list[str] = setting([], "held-out datasets for train.eval_interval")
    valid_samples: int = setting(256, "the first this many validation samples (fixed order) are evaluated")
    valid_mask_ratios: list[float] = setting([0.25, 0.5, 0.75, 1.0], "the fixed mask ratio of each validation pass")


@dataclass
class TrainConfig:
    """What is trained, on what, for how long."""

    device: str = choice("auto", "cuda", "cpu", help="auto: cuda when available")
    transformer_impl: str = choice(
        "auto", "transformer_engine", "local", help="megatron's layer spec; auto: Transformer Engine on GPUs where it imports"
    )
    attention: str = choice(
        "auto",
        "sdpa",
        "local",
        help="the local spec's core attention: PyTorch's fused kernels or megatron's; auto: sdpa on CUDA",
    )
    norm: str = choice(
        "auto", "compiled", "eager", help="the local spec's RMSNorm: one fused kernel each way or eager; auto: compiled on CUDA"
    )
    precision: str = choice(
        "auto",
        "bf16",
        "fp32",
        "fp8",
        help="auto: bf16 on GPUs; on CPUs whichever of bf16 / fp32 the CPU multiplies faster (measured at start-up)",
    )
    fp8_recipe: str = choice(
        "tensorwise",
        "delayed",
        "blockwise",
        "mxfp8",
        help="tensorwise (current scaling): Megatron-Bridge's H100 default; mxfp8 needs Blackwell (training/fp8.py)",
    )
    fp8_param_gather: bool = setting(False, "keep parameters in FP8 and all-gather them so (halves the gather)")
    fp8_first_last_bf16: bool = setting(False, "the first and last transformer layer in bf16 (not with delayed)")
    recompute: str | None = choice(None, "full", "selective", help="activation recomputation; null: none")
    steps: int = setting(1000, "optimizer steps of the run")
    seed: int = setting(1234, "seed of the weights' initialisation and the model's random streams")
    exit_after_steps: int = setting(0, "stop (with a checkpoint) after this many steps in this process; 0: off")
    ema_decay: float = setting(0.0, "EMA of the weights after each step (e.g. 0.999); 0: off")
    ema_warmup: bool = setting(True, "EMA decay min(ema_decay, (1 + n) / (10 + n)) at update n")
    eval_interval: int = setting(0, "held-out loss every this many steps (and at the end); 0: off")

    def validate(self) -> None:
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
    """How the model and the batch are split over the ranks."""

    tensor_parallel: int = setting(1, "tensor-parallel size")
    pipeline_parallel: int = setting(1, "pipeline-parallel size")
    sequence_parallel: bool = setting(False, "split the sequence over the tensor-parallel ranks outside attention")
    use_distributed_optimizer: bool = setting(True, "shard the optimizer state over the data-parallel ranks")
    overlap_grad_reduce: bool | None = setting(
        None, "overlap the data-parallel gradient reduce-scatter with backward; null: on with CUDA, off on CPU"
    )
    overlap_param_gather: bool | None = setting(
        None, "overlap the parameter all-gather with the next forward; null: on with CUDA, off on CPU"
    )
    grad_reduce_dtype: str = choice("fp32", "bf16", help="bf16 halves the reduction's bytes (Megatron-Bridge's default)")


@dataclass
class OptimConfig:
    """Adam and its learning-rate schedule."""

    lr: float = setting(3e-4, "peak learning rate")
    min_lr: float = setting(3e-5, "learning rate at the end of the decay")
    warmup_steps: int = setting(100, "linear warm-up steps")
    lr_decay_style: str = choice("cosine", "linear", "constant", "inverse-square-root", "WSD", help="the decay after warm-up")
    lr_wsd_decay_fraction: float = setting(0.2, "WSD: the last fraction of the steps anneals to min_lr")
    lr_wsd_decay_style: str = choice("linear", "cosine", "exponential", "minus_sqrt", help="WSD: the anneal")
    weight_decay: float = setting(0.05, "AdamW weight decay")
    adam_beta1: float = setting(0.9, "Adam beta1")
    adam_beta2: float = setting(0.95, "Adam beta2")
    clip_grad: float = setting(1.0, "clip the global gradient norm to this")

    def validate(self) -> None:
        if not 0.0 < self.lr_wsd_decay_fraction <= 1.0:
            raise ConfigError(f"optim.lr_wsd_decay_fraction={self.lr_wsd_decay_fraction} must be in (0, 1]")


@dataclass
class CheckpointConfig:
    """Where and how often the run is saved, and where it starts from."""

    save_dir: str | None = setting(None, "the run's folder: checkpoints (and fine-tuning's export)")
    save_interval: int = setting(1000, "save every this many steps (and at the end)")
    keep_last: int = setting(3, "keep this many checkpoints; 0: all")
    async_save: bool = setting(False, "write checkpoints in the background")
    resume: str = setting("auto", "auto: the save_dir's latest; none; or an iter_NNNNNNN / run directory")
    init_from: str | None = setting(None, "model weights to start from: a single-GPU-format dir or a torch_dist checkpoint")
    reshardable: str = choice(
        "dp",
        "final",
        "always",
        help="optimizer state loadable at any TP/PP: dp = never (resumes at any DP), final = the run's last save, always",
    )
    resume_changed_model: bool = setting(False, "resume although the model / tokenizer settings differ from the checkpoint's")


@dataclass
class LoggingConfig:
    """The log line, Weights & Biases and sample images during training."""

    log_interval: int = setting(10, "a log line every this many steps")
    sample_interval: int = setting(0, "sample images of sample_prompts every this many steps; 0: off")
    sample_prompts: list[str] = setting([], "the prompts of those images")
    peak_tflops: float = setting(0.0, "per device, for MFU; 0: detect (H100/H200 bf16 989, fp8 1979)")
    wandb_mode: str = choice("disabled", "online", "offline", help="offline: a run directory to `wandb sync` later")
    wandb_project: str = setting("megamdm", "W&B project")
    wandb_name: str | None = setting(None, "W&B run name")
    wandb_dir: str | None = setting(None, "W&B directory (default: the run's folder)")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneConfig:
    """DeepSpeed fine-tuning of a single-GPU-format checkpoint (``megamdm-finetune``); steps, learning
    rate, precision, EMA, checkpoints and logging are the ``train``, ``optim``, ``checkpoint`` and
    ``logging`` sections pretraining uses (with fine-tuning's defaults, ``megamdm.finetune.DEFAULTS``)."""

    deepspeed_config: str = setting("configs/deepspeed/zero2.json", "DeepSpeed JSON: ZeRO stage, buckets")
    offload_optimizer: bool = setting(False, "keep the optimizer state in CPU memory")
    gradient_checkpointing: bool = setting(
        False, "recompute each block's activations in backward: memory for ~30% more compute"
    )
    lora_rank: int = setting(0, "LoRA rank of the targeted projections; 0: full fine-tuning")
    lora_alpha: float = setting(16.0, "LoRA alpha: the adapters' update is scaled by alpha / rank")
    lora_targets: list[str] = setting(LORA_TARGETS, "the projections LoRA adapts")
    export: bool = setting(True, "write the result (LoRA merged) in the single-GPU format to SAVE_DIR/single")


@dataclass
class PreprocessConfig:
    """Image shards -> token shards (``megamdm-preprocess``)."""

    resolution: int = setting(256, "image side in pixels (the area of every aspect bucket)")
    aspect_buckets: bool = setting(False, "aspect-ratio buckets of about the same area instead of squares")
    crop: str = choice("center", "random", help="where a resized image is cropped to its bucket")
    batch_size: int = setting(64, "images decoded and tokenized at a time")
    device: str = choice(
        "auto", "cpu", "cuda", help="cuda: DALI mixed decoding, tokenizer on the GPU; auto: cuda when available"
    )
    device_id: int | None = setting(None, "the GPU (default: LOCAL_RANK)")
    num_threads: int = setting(2, "DALI decoding threads")

    def __post_init__(self) -> None:
        _check_choices(self, "preprocess")


# Keys that moved between sections: (old section, key) -> (new section, key). A config a user writes
# with an old key is refused with the new name; a config a checkpoint saved is migrated.
MOVED_KEYS = {
    # megamdm 0.2 split ``train:``: every field of these sections lived there
    **{
        ("train", f.name): (section, f.name)
        for section, cls in (
            ("parallel", ParallelConfig),
            ("optim", OptimConfig),
            ("checkpoint", CheckpointConfig),
            ("logging", LoggingConfig),
        )
        for f in dataclasses.fields(cls)
    },
    # megamdm 0.3: fine-tuning shares the pretraining sections instead of repeating their fields
    **{("finetune", k): ("optim", k) for k in ("lr", "min_lr", "warmup_steps", "weight_decay", "clip_grad")},
    **{("finetune", k): ("train", k) for k in ("steps", "precision", "seed", "ema_decay", "ema_warmup")},
    ("finetune", "save_interval"): ("checkpoint", "save_interval"),
    ("finetune", "log_interval"): ("logging", "log_interval"),
    ("finetune", "out"): ("checkpoint", "save_dir"),
}


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


SHIPPED_CONFIGS = Path(__file__).parent / "configs"  # configs/ at the repository root links here
# the settings that hold file paths: a saved config holds them absolute (with_absolute_paths)
PATH_SETTINGS = (
    "text.tokenizer",
    "image_tokenizer.path",
    "gce.groups_file",
    "data.shards",
    "data.valid_shards",
    "checkpoint.save_dir",
    "checkpoint.resume",
    "checkpoint.init_from",
    "logging.wandb_dir",
)
NOT_PATHS = {"byte", "auto", "none"}  # values of those settings that name no file


def find_config(path: str | os.PathLike) -> Path:
    """A config file by its path; where the working directory holds none, the file of that name that
    ships with megamdm (``configs/demo.yaml`` and ``configs/deepspeed/zero2.json`` work from any folder)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
    shipped = SHIPPED_CONFIGS.joinpath(*parts)
    return shipped if shipped.exists() else p


def with_absolute_paths(cfg: Config, base: str | os.PathLike | None = None) -> Config:
    """``cfg`` with every relative file path of :data:`PATH_SETTINGS` made absolute against ``base``
    (the working directory), so that a config saved with a checkpoint works from any folder."""
    base = Path(base or os.getcwd())

    def absolute(value):
        if value is None or value in NOT_PATHS:
            return value
        return str(base / value) if not Path(value).is_absolute() else value

    for key in PATH_SETTINGS:
        section, name = key.split(".")
        obj = getattr(cfg, section)
        value = getattr(obj, name)
        setattr(obj, name, [absolute(v) for v in value] if isinstance(value, list) else absolute(value))
    return cfg


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
    """Keys of :data:`MOVED_KEYS`: moved to their new place (``migrate``, for configs that older
    checkpoints saved) or refused with the new name (anything a user writes today)."""
    if not isinstance(layer, DictConfig):
        return layer
    moved = [
        (old, key)
        for old in sorted({old for old, _ in MOVED_KEYS})
        if isinstance(layer.get(old), DictConfig)
        for key in list(layer[old].keys())
        if (old, key) in MOVED_KEYS
    ]
    if moved and not migrate:
        old, key = moved[0]
        new = ".".join(MOVED_KEYS[old, key])
        more = [m for m in moved[1:] if m[0] == old]
        raise ConfigError(
            f"{source}: {old}.{key} is now {new}" + (f" (and {len(more)} more {old}.* keys moved likewise)" if more else "")
        )
    for old, key in moved:
        section, name = MOVED_KEYS[old, key]
        if section not in layer:
            layer[section] = {}
        layer[section][name] = layer[old].pop(key)
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


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    migrate: bool = False,
    defaults: dict[str, Any] | None = None,
) -> Config:
    """Load a :class:`Config` from a YAML file (or the defaults) plus dotted overrides. ``defaults``
    (``{"optim.lr": 1e-5, ...}``): a command's own defaults, under the file and the overrides.
    ``migrate`` accepts the layouts of configs saved by older megamdm versions (:data:`MOVED_KEYS`)."""
    cfg = OmegaConf.structured(Config)
    if defaults:
        cfg = _merge_checked(cfg, _dotted(defaults), "the command's defaults")
    if path is not None:
        layer = _moved_keys(_read_yaml(find_config(path)), str(path), migrate)
        cfg = _merge_checked(cfg, legacy_positions(layer) if migrate else layer, str(path))
    if overrides:
        try:
            layer = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as e:
            raise ConfigError(f"command line: cannot parse overrides {overrides}: {e}") from None
        cfg = _merge_checked(cfg, _moved_keys(layer, "command line", False), "command line")
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    return obj.validate()


def _dotted(values: dict[str, Any]) -> DictConfig:
    """``{"optim.lr": 1e-5}`` as a config layer."""
    layer = OmegaConf.create({})
    for key, value in values.items():
        OmegaConf.update(layer, key, value, force_add=True)
    return layer


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


def parse_config_args(
    parser, argv=None, *, defaults: dict[str, Any] | None = None, flag_sections: Sequence[tuple[type, str]] = ()
) -> tuple[Any, Config]:
    """Parse a command line with the config arguments; a bad config prints one line and exits 2.
    ``flag_sections``: ``(section class, section name)`` whose flags (:func:`megamdm.options.add_flags`)
    the user gave override the file and ``--set``; ``defaults`` are the command's own (see :func:`load_config`)."""
    args = parser.parse_args(argv)
    flags = [o for cls, section in flag_sections for o in as_overrides(given(args, cls, section=section), section)]
    try:
        overrides = list(args.overrides) + list(args.overrides_positional) + flags
        return args, load_config(args.config, overrides, defaults=defaults)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
