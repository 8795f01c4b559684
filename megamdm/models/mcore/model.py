"""``MDMModel``: the MDM of docs/design.md §1.1 from megatron-core modules.

Same math as ``models/standalone.py`` (a parity test binds them); the layout is megatron's
``[sequence, batch, hidden]``. The sequence is stored ``[image | text | pad]`` with each position's
RoPE angle carried along (the standalone model stores ``[text | pad | image]``; bidirectional
attention with explicit positions does not depend on storage order): cuDNN fused attention, Transformer
Engine's choice on Hopper, reads a key-padding mask as "the first ``count`` positions are valid", so
padding must sit at the end of each sequence. Text and image embeddings are vocab-parallel; the 2x2 merge and
unmerge are small replicated linears; the backbone is a ``TransformerBlock``; the image head is a
vocab-parallel ``ColumnParallelLinear`` whose weight shard goes straight into the vocab-parallel
fused GCE, so no logits are ever gathered in training.

Tensor-parallel gradient flow at the head: the head input is identical on every TP rank and the
fused GCE returns this rank's partial ``dH``; ``copy_to_tensor_model_parallel_region`` (identity
forward, all-reduce backward) sums the partials. With sequence parallelism the decoder output is
first gathered with ``gather_from_sequence_parallel_region(..., tensor_parallel_output_grad=False)``,
whose backward keeps this rank's slice of the (already reduced) gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from ...config import ModelConfig, ParallelConfig, TrainConfig
from ...gce import gce_loss
from ...objective import LossSpec, loss_parts, pack_metric_sums, select_supervised
from ..layers import RMSNorm, check_grid, head_logits, merge_2x2, unmerge_2x2
from ..rope import model_rope
from .spec import layer_spec


def grad_accumulation_fusion_available() -> bool:
    """Whether apex's ``fused_weight_gradient_mlp_cuda`` imports: megatron's parallel linear layers
    (the image head among them) refuse ``gradient_accumulation_fusion`` without it, even beside TE."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(
    model: ModelConfig, train: TrainConfig, par: ParallelConfig, *, device: str, use_te: bool
) -> TransformerConfig:
    """The megatron ``TransformerConfig`` for a megamdm model and training setup."""
    model.validate()
    if train.precision == "auto":
        raise ValueError("train.precision=auto must be resolved (Trainer does) before building the model")
    dtype = torch.float32 if train.precision == "fp32" else torch.bfloat16
    fused = use_te and device == "cuda"
    recompute = train.recompute
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        sequence_parallel=par.sequence_parallel and par.tensor_parallel > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp8="hybrid" if train.precision == "fp8" else None,
        fp8_recipe=train.fp8_recipe,
        fp8_param=train.precision == "fp8" and train.fp8_param_gather,
        first_last_layers_bf16=train.precision == "fp8" and train.fp8_first_last_bf16,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        use_cpu_initialization=device == "cpu",
        gradient_accumulation_fusion=fused and grad_accumulation_fusion_available(),
        bias_activation_fusion=True,  # the fused SwiGLU of megatron (TE and local spec alike)
        bias_dropout_fusion=device == "cuda",
        masked_softmax_fusion=False,
        # TE's fused RoPE takes one angle per position for the whole batch: per-sample positions cannot use it
        apply_rope_fusion=fused and model.fixed_image_start > 0,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        calculate_per_token_loss=True,
    )


class MDMModel(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        mdm: ModelConfig,
        loss_spec: LossSpec,
        *,
        use_te: bool,
        sdpa: bool = False,
        compiled_norm: bool = False,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads under PP
        self.mdm = mdm
        self.loss_spec = loss_spec
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage
        d = config.hidden_size
        init = config.init_method
        if pre_process:
            self.text_embedding = tensor_parallel.VocabParallelEmbedding(
                mdm.text_vocab_size, d, init_method=init, config=config
            )
            self.image_embedding = tensor_parallel.VocabParallelEmbedding(
                mdm.image_embed_rows, d, init_method=init, config=config
            )
            self.merge = torch.nn.Linear(4 * d, d, bias=False, dtype=config.params_dtype)
            if mdm.merge_norm:
                self.merge_norm = RMSNorm(d, mdm.merge_norm_eps)
        spec, norm = layer_spec(use_te, sdpa, compiled_norm)
        n_layers = get_num_layers_to_build(config, vp_stage)
        self.decoder = TransformerBlock(
            config,
            TransformerBlockSubmodules([spec] * n_layers, norm),
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            self.unmerge = torch.nn.Linear(d, 4 * d, bias=False, dtype=config.params_dtype)
            if mdm.unmerge_norm:
                self.unmerge_norm = RMSNorm(d, mdm.merge_norm_eps)
            self.head = tensor_parallel.ColumnParallelLinear(
                d, mdm.image_vocab_size, config=config, init_method=init, bias=False, gather_output=False
            )
        for lin in [getattr(self, "merge", None), getattr(self, "unmerge", None)]:
            if lin is not None and config.perform_initialization:
                with torch.no_grad():
                    init(lin.weight)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def _embed(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        b, h, w = image_ids.shape
        te = self.text_embedding(text_ids)  # [b, L, d] (all-reduced over TP)
        ie = self.image_embedding(image_ids.reshape(b, h * w)).view(b, h, w, -1)
        if self.mdm.merge_norm:
            ie = self.merge_norm(ie)
        x = torch.cat([self.merge(merge_2x2(ie)), te], dim=1).transpose(0, 1).contiguous()  # [s, b, d]
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)
        return x

    def forward(
        self,
        text_ids: torch.Tensor,
        text_pad_mask: torch.Tensor,
        image_ids: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        loss_weight: torch.Tensor | None = None,
        is_flipped: torch.Tensor | None = None,
    ):
        """First/middle stages return the decoder output. The last stage returns the image
        hidden states ``[b, h, w, d]``, or with ``target``/``loss_weight``/``is_flipped`` the loss
        terms ``(loss_sum, num_tokens, metrics[5])`` of ``objective.loss_parts`` (``objective.METRIC_SUMS``)."""
        x, mask, rope = self._preprocess(text_ids, text_pad_mask, image_ids)
        hs = self.decoder(hidden_states=x, attention_mask=mask, rotary_pos_emb=rope)
        if not self.post_process:
            return hs
        hidden = self._image_hidden(hs, image_ids.shape)
        if target is None:
            return hidden
        return self._loss(hidden, target, loss_weight, is_flipped)

    def _preprocess(self, text_ids, text_pad_mask, image_ids):
        """The decoder's inputs: the embedded sequence ``[image | text]`` (first stage only; ``None``
        elsewhere), the key-padding mask over it and each position's RoPE angles."""
        b, h, w = image_ids.shape
        check_grid(h, w)
        text_len = text_ids.shape[1]
        m = h * w // 4
        s = text_len + m
        tp = self.config.tensor_model_parallel_size
        if self.config.sequence_parallel and s % tp:
            raise ValueError(
                f"sequence parallelism needs the sequence length ({text_len} text + {m} "
                f"image = {s}) to be a multiple of the tensor-parallel size {tp}"
            )
        # prompt padding is a suffix of the prompt, so of the stored sequence [image | text]
        torch._assert_async(
            (text_pad_mask[:, 1:] >= text_pad_mask[:, :-1]).all(), "prompt padding must be at the end of each prompt"
        )
        x = self._embed(text_ids, image_ids) if self.pre_process else None
        emb = model_rope(self.mdm, text_pad_mask, h // 2, w // 2)  # [B, text | image, hd]
        if self.mdm.fixed_image_start:  # the same angles for every sample: one row, as fused RoPE needs
            emb = emb[:1]
        rope = torch.cat([emb[:, text_len:], emb[:, :text_len]], dim=1).transpose(0, 1)[:, :, None, :]  # each keeps its angle
        mask = torch.zeros(b, 1, 1, s, dtype=torch.bool, device=image_ids.device)
        mask[:, 0, 0, m:] = text_pad_mask  # True = masked key
        return x, mask, rope

    def _image_hidden(self, hs: torch.Tensor, image_shape) -> torch.Tensor:
        """The decoder output's image positions, unmerged: the head inputs ``[b, h, w, d]``."""
        _, h, w = image_shape
        if self.config.sequence_parallel:
            hs = gather_from_sequence_parallel_region(hs, tensor_parallel_output_grad=False)
        img = hs[: h * w // 4].transpose(0, 1)
        if self.mdm.unmerge_norm:
            img = self.unmerge_norm(img)
        img = self.unmerge(img)  # [b, M, 4d]
        return unmerge_2x2(img, h, w)

    def _loss(self, hidden, target, loss_weight, is_flipped):
        """The vocab-parallel fused GCE at the supervised positions: ``(loss_sum, num_tokens, metrics)``."""
        hsel, tsel, wsel, fsel = select_supervised(hidden, target, loss_weight, is_flipped)
        hsel = copy_to_tensor_model_parallel_region(hsel)
        spec = self.loss_spec
        weight = self.head.weight
        tp = self.config.tensor_model_parallel_size
        stats = gce_loss(
            hsel,
            weight,
            tsel,
            spec.group_sizes,
            spec.group_weights,
            impl=spec.impl,
            reduction="none",
            token_weight=wsel,
            return_stats=True,
            tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
            weight_grad_sink=self._head_grad_sink(),
            grad_filter=spec.grad_filter,
        )
        parts = loss_parts(stats, fsel, spec)
        return parts.loss_sum, parts.num_tokens, pack_metric_sums(parts)

    def _head_grad_sink(self) -> torch.Tensor | None:
        """Under megatron's DDP the fused op adds the head's weight gradient straight into the fp32
        ``main_grad``, as megatron's gradient-accumulation fusion does for its own linear layers (not
        with ``parallel.grad_reduce_dtype`` bf16, whose ``main_grad`` is bf16)."""
        weight = self.head.weight
        main = getattr(weight, "main_grad", None)
        if (
            main is None
            or main.dtype != torch.float32
            or self.loss_spec.impl == "naive"
            or not torch.is_grad_enabled()
            or not weight.requires_grad
        ):
            return None
        weight.grad_added_to_main_grad = True
        return main.view(weight.shape)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits ``[n, V]`` of head inputs ``[n, d]`` (gathered over TP), for
        sampling (:func:`megamdm.models.layers.head_logits` on this rank's shard). The head's own forward
        would all-gather the sequence under sequence parallelism; the rows here are already complete."""
        return gather_from_tensor_model_parallel_region(head_logits(hidden, self.head.weight))


def resolve_attention(choice: str, device: str, use_te: bool) -> str:
    """``train.attention``: ``auto`` is ``sdpa`` for the local spec on CUDA and megatron's ``local``
    attention on CPU (the reference); with Transformer Engine its own fused attention is used."""
    if use_te:
        return "te"
    if choice == "auto":
        return "sdpa" if device == "cuda" else "local"
    return choice


def resolve_norm(choice: str, device: str, use_te: bool) -> bool:
    """``train.norm``: whether the local spec's RMSNorms are compiled; ``auto`` compiles them on CUDA
    (on CPU the eager ones are the reference); Transformer Engine's norm is fused already."""
    if use_te:
        return False
    return choice == "compiled" or (choice == "auto" and device == "cuda")


def build_model(cfg, loss_spec: LossSpec, *, device: str, use_te: bool, vp_stage: int | None = None) -> MDMModel:
    """The MDMModel for this rank's pipeline stage (``cfg`` is a megamdm :class:`~megamdm.config.Config`)."""
    tcfg = transformer_config(cfg.model, cfg.train, cfg.parallel, device=device, use_te=use_te)
    model = MDMModel(
        tcfg,
        cfg.model,
        loss_spec,
        use_te=use_te,
        sdpa=resolve_attention(cfg.train.attention, device, use_te) == "sdpa",
        compiled_norm=resolve_norm(cfg.train.norm, device, use_te),
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
    return model.cuda() if device == "cuda" else model


def with_precision(model: MDMModel):
    """``model`` in megatron's ``Float16Module`` when its config trains in bf16 (or FP8), else as it is."""
    from megatron.core.transformer.module import Float16Module

    return Float16Module(model.config, model) if model.config.bf16 else model
