"""megatron-core MDMModel on CPU/gloo: parallel layouts agree, and agree with the standalone model."""

import contextlib
import json

import pytest
import torch

pytest.importorskip("megatron.core")

from megamdm.config import Config, DiffusionConfig, ParallelConfig, TrainConfig
from megamdm.convert import from_single, to_single
from megamdm.diffusion import corrupt_batch
from megamdm.formats.single import load_single
from megamdm.formats.torch_dist import TorchDistReader
from megamdm.models.mcore.state_dict_adapter import (
    expected_standalone_shapes,
    mcore_to_standalone,
    qkv_interleave,
    qkv_split,
)
from megamdm.objective import LossSpec, loss_parts, select_supervised
from megamdm.text import ByteTokenizer, tokenize_prompts

from .support.checkpoints import make_tiny_checkpoint
from .support.distributed import run_distributed

SPEC = LossSpec([8], [0.2], impl="torch")


def batch(cfg, b=2, grid=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, pad, _ = tokenize_prompts(ByteTokenizer(), ["a red circle", "the blue square left of it"][:b], 24)
    img = torch.randint(0, cfg.image_vocab_size, (b, grid, grid), generator=g)
    dcfg = DiffusionConfig(prompt_drop=0.0, flip_ratio=0.3)
    return corrupt_batch(
        img,
        ids,
        pad,
        dcfg,
        vocab_size=cfg.image_vocab_size,
        text_mask_id=257,
        flip_group_size=8,
        seeds=[seed * 10 + i for i in range(b)],
    )


def standalone_reference(single_dir, c):
    m = load_single(single_dir).model.float()
    m.zero_grad()
    hid = m(c.text_ids, c.text_pad_mask, c.image_input)
    hs, ts, ws, fl = select_supervised(hid, c.target, c.loss_weight, c.is_flipped)
    parts = loss_parts(m.head(hs, ts, ws, group_sizes=[8], group_weights=[0.2]), fl, SPEC)
    parts.loss_sum.backward()
    logits = m.logits(c.text_ids, c.text_pad_mask, c.image_input)
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    return parts.loss_sum.item(), logits.detach(), grads


def _worker(ckpt, tp, pp, sp, micro_batches, cudnn=False, attention="local", ddp=False, spec=SPEC):
    """Build the model at (TP, PP, SP), load the checkpoint, run forward/backward via megatron's
    schedule; ``cudnn``: under cuDNN fused attention's reading of the padding mask; ``ddp``: wrapped
    in megatron's DDP as the trainer does (gradients then in ``main_grad``)."""
    from megamdm.compat.megatron_cpu import megatron_on_cpu

    from .support.cudnn_attention import cudnn_padding_semantics

    with megatron_on_cpu(), cudnn_padding_semantics() if cudnn else contextlib.nullcontext():
        return _run_layout(ckpt, tp, pp, sp, micro_batches, attention, ddp, spec)


def _run_layout(ckpt, tp, pp, sp, micro_batches, attention="local", ddp=False, spec=SPEC):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megamdm.models.mcore.model import build_model
    from megamdm.training import parallel
    from megamdm.training.checkpoint import load_model_weights

    parallel.init_model_parallel(tp, pp)
    parallel.seed_model_parallel(1234, "cpu")
    single = load_single(ckpt.parent / ckpt.name.replace("dist", "single"), load_tokenizers=False)
    cfg = Config(
        model=single.config.model,
        train=TrainConfig(precision="fp32", attention=attention),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp),
    )
    model = build_model(cfg, spec, device="cpu", use_te=False)
    cores = {type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__ and "Self" not in type(m).__name__}
    assert (cores == {"SDPAttention"}) == (attention == "sdpa"), cores
    load_model_weights(model, ckpt / "iter_0000000")
    module = model
    if ddp:
        from megamdm.training.optim import wrap_model

        model = wrap_model(model, model.config, cfg.parallel, "cpu")
    c = batch(cfg.model)
    seq = c.text_ids.shape[1] + c.image_input[0].numel() // 4

    def step(it, mdl):
        b = next(it)
        out = mdl(
            b.text_ids, b.text_pad_mask, b.image_input, target=b.target, loss_weight=b.loss_weight, is_flipped=b.is_flipped
        )

        def loss_func(o):
            loss_sum, n, _ = o
            return loss_sum, n.int(), {"loss": torch.stack([loss_sum.detach(), n.float()])}

        return out, loss_func

    fb = get_forward_backward_func()
    out = fb(
        forward_step_func=step,
        data_iterator=iter([c] * micro_batches),
        model=[model],
        num_microbatches=micro_batches,
        seq_length=seq,
        micro_batch_size=c.text_ids.shape[0],
        forward_only=False,
    )
    res = {"losses": [o["loss"][0].item() for o in out], "tokens": sum(o["loss"][1].item() for o in out)}
    if ps.is_pipeline_last_stage() and pp == 1 and not ddp:
        with torch.no_grad():
            hid = model(c.text_ids, c.text_pad_mask, c.image_input)
            res["logits"] = model.logits(hid)
    res["grads"] = {
        k: (p.main_grad if ddp else p.grad).clone() if p.grad is not None or ddp else None
        for k, p in module.named_parameters()
        if any(s in k for s in ("merge", "unmerge", "head", "final_layernorm", "linear_qkv.weight"))
    }
    if ddp:
        res["grad_is_none"] = all(p.grad is None for p in module.parameters())
        res["head_in_main_grad"] = getattr(module.head.weight, "grad_added_to_main_grad", None) if pp == 1 else None
    res["tp_rank"] = ps.get_tensor_model_parallel_rank()
    res["pp_rank"] = ps.get_pipeline_model_parallel_rank()
    return res


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore")
    # YaRN (NL-Diffusion-Image's RoPE), scaled so that its ramp acts on these 40 positions: every parity
    # test below then checks that both models rotate alike
    yarn = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_positions=8, rope_beta_fast=8.0, rope_beta_slow=0.5)
    # and the release's down-/up-sampler norms, with weights other than 1 so that dropping one would show
    single = make_tiny_checkpoint(root / "single", seed=3, merge_norm=True, unmerge_norm=True, **yarn)
    run_distributed(from_single, 1, single, root / "dist")  # in a child: it enables the CPU backend
    # NL-Diffusion-Image's layout: the last prompt tokens after the image, positions continuing past it
    after = make_tiny_checkpoint(root / "single_after", seed=4, merge_norm=True, text_after_image=3, **yarn)
    run_distributed(from_single, 1, after, root / "dist_after")
    return root


def test_from_single_round_trip_is_bit_identical(checkpoints, tmp_path):
    back = to_single(checkpoints / "dist", tmp_path / "back")
    a, b = load_single(checkpoints / "single"), load_single(back)
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    assert torch.equal(a.groups.perm, b.groups.perm)


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_head_adds_its_weight_gradient_into_megatrons_main_grad(checkpoints, tp):
    """Under megatron's DDP the fused GCE adds the head's weight gradient straight into the fp32
    ``main_grad`` (no second copy of it), over two accumulated micro-batches and per TP shard: it
    must equal the standalone model's, scaled by the tokens of the step (``calculate_per_token_loss``),
    and at TP 1 every gradient must equal what the autograd path (``naive``, no sink) leaves there."""
    single = checkpoints / "single"
    c = batch(load_single(single).config.model)
    _, _, ref_grads = standalone_reference(single, c)
    fused = run_distributed(_worker, tp, checkpoints / "dist", tp, 1, False, 2, False, "local", True, SPEC)
    for r in fused:
        assert r["grad_is_none"] and r["head_in_main_grad"] is True  # megatron's hook skipped the placeholder
        scale = 2 / r["tokens"]
        head = scale * ref_grads["head.weight"].chunk(tp, 0)[r["tp_rank"]]
        assert torch.allclose(r["grads"]["head.weight"], head, rtol=1e-4, atol=1e-7)
        assert torch.allclose(r["grads"]["unmerge.weight"], scale * ref_grads["unmerge.weight"], rtol=1e-4, atol=1e-7)
    if tp == 1:  # naive has no vocab-parallel mode
        naive = LossSpec([8], [0.2], impl="naive")
        (plain,) = run_distributed(_worker, 1, checkpoints / "dist", 1, 1, False, 2, False, "local", True, naive)
        assert plain["head_in_main_grad"] is False
        for k, g in fused[0]["grads"].items():
            assert torch.allclose(g, plain["grads"][k], rtol=1e-4, atol=1e-7), k


@pytest.mark.parametrize(
    "tp,pp,sp,cudnn,attention,model",
    [
        (1, 1, False, False, "local", ""),
        (2, 1, False, False, "local", ""),
        (2, 1, True, False, "local", ""),
        (1, 2, False, False, "local", ""),
        (1, 1, False, True, "local", ""),
        (2, 1, True, True, "local", ""),
        (1, 1, False, False, "sdpa", ""),
        (2, 1, True, False, "sdpa", ""),
        (2, 1, True, True, "local", "_after"),
        (1, 2, False, False, "sdpa", "_after"),
    ],
)
def test_parallel_layouts_match_the_standalone_model(checkpoints, tp, pp, sp, cudnn, attention, model):
    """``cudnn``: attention reads the padding mask as cuDNN fused attention does (the valid keys
    are the first ``count``), so the result only matches if padding sits at the end of the sequence.
    ``sdpa``: the fused core attention of the local spec on CUDA, forward and backward against the
    same reference as megatron's unfused one (GQA, prompt padding). ``_after``: a model whose last 3
    prompt tokens follow the image (per-sample positions that differ between the batch's rows)."""
    single = checkpoints / f"single{model}"
    c = batch(load_single(single).config.model)
    assert c.text_pad_mask.any(), "the test batch must have prompt padding"
    ref_loss, ref_logits, ref_grads = standalone_reference(single, c)
    results = run_distributed(_worker, tp * pp, checkpoints / f"dist{model}", tp, pp, sp, 2, cudnn, attention)
    last = [r for r in results if r["pp_rank"] == pp - 1]
    for r in last:
        assert len(r["losses"]) == 2
        for loss in r["losses"]:  # per micro-batch loss sums
            assert abs(loss - ref_loss) / ref_loss < 1e-5, (loss, ref_loss)
        if pp == 1:
            rel = ((r["logits"] - ref_logits).norm() / ref_logits.norm()).item()
            assert rel < 1e-5, rel
        # grads accumulate over the 2 micro-batches: compare 2x the reference
        g = r["grads"]
        assert torch.allclose(g["unmerge.weight"], 2 * ref_grads["unmerge.weight"], rtol=1e-4, atol=1e-6)
        # with sequence parallelism a norm's gradient is partial per TP rank (finalize_model_grads sums it)
        norm = sum(x["grads"]["decoder.final_layernorm.weight"] for x in last) if sp else g["decoder.final_layernorm.weight"]
        assert torch.allclose(norm, 2 * ref_grads["norm.weight"], rtol=1e-4, atol=1e-6)
        head = 2 * ref_grads["head.weight"].chunk(tp, 0)[r["tp_rank"]]
        assert torch.allclose(g["head.weight"], head, rtol=1e-4, atol=1e-6)
    first = [r for r in results if r["pp_rank"] == 0]
    for r in first:
        assert torch.allclose(r["grads"]["merge.weight"], 2 * ref_grads["merge.weight"], rtol=1e-4, atol=1e-6)


def test_key_mapping_of_te_and_local_names(tiny_model_cfg):
    """A synthetic state dict in Transformer Engine's per-layer names (fused layer norms,
    _extra_state) maps to the same standalone weights as the local spec's names."""
    m = tiny_model_cfg
    shapes = expected_standalone_shapes(m)
    g = torch.Generator().manual_seed(0)
    ref = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    te, local = {}, {}
    for key, name in [
        ("text_embedding.weight", "text_embed.weight"),
        ("image_embedding.weight", "image_embed.weight"),
        ("merge.weight", "merge.weight"),
        ("decoder.final_layernorm.weight", "norm.weight"),
        ("unmerge.weight", "unmerge.weight"),
        ("head.weight", "head.weight"),
    ]:
        te[key] = local[key] = ref[name]
    for i in range(m.num_layers):
        p, s = f"decoder.layers.{i}.", f"layers.{i}."
        qkv = qkv_interleave(
            ref[s + "self_attn.q_proj.weight"], ref[s + "self_attn.k_proj.weight"], ref[s + "self_attn.v_proj.weight"], m
        )
        fc1 = torch.cat([ref[s + "mlp.gate_proj.weight"], ref[s + "mlp.up_proj.weight"]])
        common = {
            "self_attention.linear_qkv.weight": qkv,
            "self_attention.linear_proj.weight": ref[s + "self_attn.o_proj.weight"],
            "mlp.linear_fc1.weight": fc1,
            "mlp.linear_fc2.weight": ref[s + "mlp.down_proj.weight"],
        }
        for k, v in common.items():
            te[p + k] = local[p + k] = v
        te[p + "self_attention.linear_qkv.layer_norm_weight"] = ref[s + "input_layernorm.weight"]
        te[p + "mlp.linear_fc1.layer_norm_weight"] = ref[s + "post_attention_layernorm.weight"]
        te[p + "self_attention.linear_qkv._extra_state"] = b"fp8 meta"
        te[p + "mlp.linear_fc1._extra_state"] = b"fp8 meta"
        local[p + "input_layernorm.weight"] = ref[s + "input_layernorm.weight"]
        local[p + "pre_mlp_layernorm.weight"] = ref[s + "post_attention_layernorm.weight"]
    for sd in (te, local):
        got = dict(mcore_to_standalone(sd.keys(), sd.__getitem__, m, expected_shapes=shapes))
        assert set(got) == set(shapes)
        assert all(torch.equal(got[k], ref[k]) for k in shapes)
    q, k, v = qkv_split(
        qkv_interleave(
            ref["layers.0.self_attn.q_proj.weight"],
            ref["layers.0.self_attn.k_proj.weight"],
            ref["layers.0.self_attn.v_proj.weight"],
            m,
        ),
        m,
    )
    assert torch.equal(q, ref["layers.0.self_attn.q_proj.weight"])


def test_converters_refuse_mismatched_inputs(checkpoints, tmp_path):
    from megamdm.config import load_config
    from megamdm.errors import ConversionError

    it = checkpoints / "dist" / "iter_0000000"
    cfg = load_config(it / "config.yaml")
    cfg.model.num_layers = 3
    with pytest.raises(ConversionError, match="stacked layers"):
        to_single(checkpoints / "dist", tmp_path / "x", config=cfg)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConversionError, match="not a torch_dist"):
        TorchDistReader(tmp_path)


def test_a_damaged_dist_checkpoint_is_one_conversion_error(checkpoints, tmp_path):
    import shutil

    from megamdm.errors import ConversionError

    run = tmp_path / "run"
    shutil.copytree(checkpoints / "dist", run)
    it = run / "iter_0000000"
    shard = sorted(it.glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(ConversionError, match="a shard file is cut short or damaged"):
        to_single(run, tmp_path / "a")
    shard.unlink()
    with pytest.raises(ConversionError, match="shard files are missing"):
        to_single(run, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("family", ["llama", "mistral-yarn"])
def test_from_hf_llama_backbone_matches_transformers(tmp_path, family):
    """Llama with plain RoPE, and a Mistral / Ministral-3-style model with YaRN (NL-Diffusion-Image's RoPE:
    attention factor 1 from mscale = mscale_all_dim), scaled so that the ramp acts on these positions."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from megamdm.convert import from_hf
    from megamdm.gce import GCEGroups
    from megamdm.vq import KMeansPatchTokenizer

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if family == "llama":
        hf_cfg, cls = transformers.LlamaConfig(rope_theta=5000.0, **common), transformers.LlamaForCausalLM
    else:
        yarn = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "original_max_position_embeddings": 4}
        yarn.update(mscale=1.0, mscale_all_dim=1.0, beta_fast=8.0, beta_slow=0.5)
        hf_cfg = transformers.MistralConfig(rope_parameters=yarn, max_position_embeddings=16, **common)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(0)
    llama = cls(hf_cfg).eval()
    hf_dir = tmp_path / "llama"
    llama.save_pretrained(hf_dir, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(299)}
    vocab["<mask>"] = 299
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tk.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<mask>", "pad_token": "t0"}))
    tok = KMeansPatchTokenizer(torch.rand(64, 48), 4)
    out = from_hf(hf_dir, tmp_path / "mdm", image_tokenizer=tok, groups=GCEGroups.identity(64, [8], [0.2]))
    mdm = load_single(out)
    assert mdm.config.model.text_vocab_size == 384 and mdm.text_tokenizer.mask_id == 299
    assert mdm.config.model.rope_scaling == ("yarn" if family == "mistral-yarn" else "none")
    ids = torch.randint(0, 300, (2, 11))
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 8:] = True
    with torch.no_grad():
        ours = mdm.model.hidden_states(ids, pad)
        # HF with a bidirectional 4-D additive mask (0 = attend) over the same key padding
        mask4 = torch.zeros(2, 1, 11, 11)
        mask4.masked_fill_(pad[:, None, None, :], torch.finfo(torch.float32).min)
        theirs = llama.model(input_ids=ids, attention_mask=mask4).last_hidden_state
    keep = ~pad
    rel = ((ours[keep] - theirs[keep]).norm() / theirs[keep].norm()).item()
    assert rel < 1e-5, rel
    # the image parts are fresh and the model runs end to end
    assert mdm.model.logits(ids, pad, torch.randint(0, 64, (2, 4, 4))).shape == (2, 4, 4, 64)


def _te_worker(ckpt):
    """On one GPU: the TE spec and the local spec load the same checkpoint and give the same loss;
    FP8 (hybrid, delayed scaling) stays close to it."""
    from megamdm.models.mcore.model import build_model
    from megamdm.training import parallel
    from megamdm.training.checkpoint import load_model_weights

    parallel.init_model_parallel(1, 1)
    parallel.seed_model_parallel(1234, "cuda")
    single = load_single(ckpt.parent / "single", load_tokenizers=False)
    c = batch(single.config.model).to("cuda")
    out = {}
    for name, use_te, precision in (("local", False, "bf16"), ("te", True, "bf16"), ("te_fp8", True, "fp8")):
        cfg = Config(model=single.config.model, train=TrainConfig(precision=precision))
        model = build_model(cfg, SPEC, device="cuda", use_te=use_te)
        load_model_weights(model, ckpt / "iter_0000000")
        with torch.no_grad():
            loss_sum, n, _ = model(
                c.text_ids, c.text_pad_mask, c.image_input, target=c.target, loss_weight=c.loss_weight, is_flipped=c.is_flipped
            )
        out[name] = (loss_sum / n).item()
    return out


@pytest.mark.gpu
def test_te_spec_matches_local_spec_on_gpu(checkpoints):
    pytest.importorskip("transformer_engine")
    r = run_distributed(_te_worker, 1, checkpoints / "dist")[0]
    assert abs(r["te"] - r["local"]) / r["local"] < 2e-2, r
    assert abs(r["te_fp8"] - r["local"]) / r["local"] < 5e-2, r


def _sample_worker(ckpt, tp, pp, settings):
    """The in-training sampler at (TP, PP) on the distributed checkpoint: the token grid on every rank."""
    from unittest import mock

    from megamdm.compat.megatron_cpu import megatron_on_cpu
    from megamdm.models.mcore.model import MDMModel, build_model
    from megamdm.training import parallel, samples
    from megamdm.training.checkpoint import load_model_weights

    with megatron_on_cpu():
        parallel.init_model_parallel(tp, pp)
        parallel.seed_model_parallel(1234, "cpu")
        single = load_single(ckpt.parent / "single")
        cfg = Config(
            model=single.config.model,
            text=single.config.text,
            sample=single.config.sample,
            train=TrainConfig(precision="fp32"),
            parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp),
        )
        for k, v in settings.items():
            setattr(cfg.sample, k, v)
        model = build_model(cfg, SPEC, device="cpu", use_te=False)
        load_model_weights(model, ckpt / "iter_0000000")
        prompts = ["a red circle", "the blue square left of it"]
        rows, real = [], MDMModel.logits

        def logits(self, x):
            rows.append(x.shape[0])
            return real(self, x)

        # 5 positions per chunk (at this vocabulary the default chunk would hold a whole image)
        with mock.patch.object(samples, "chunk_rows", lambda v, d: 5), mock.patch.object(MDMModel, "logits", logits):
            tokens = samples.sample_token_grid(
                model, cfg, single.text_tokenizer, prompts, device="cpu", grid=(8, 8), size=(32, 32), seed=5
            )
        return tokens, rows


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_in_training_sampler_draws_the_standalone_samplers_tokens(checkpoints, tp, pp):
    """Same prompts, settings and seeds: the distributed sampler (guidance on the head input, logits
    per chunk and TP shard, sampling on the last stage) gives the standalone sampler's tokens on every rank."""
    from megamdm.sampling.pipeline import MDMSampler

    settings = dict(steps=4, cfg=3.0, edit_threshold=0.3, temperature=1.0)
    s = MDMSampler.from_pretrained(checkpoints / "single", device="cpu", dtype="fp32")
    ref = s(["a red circle", "the blue square left of it"], height=32, width=32, seed=5, progress=False, **settings)
    ref_model_order = s.groups.to_model(ref.tokens)
    results = run_distributed(_sample_worker, tp * pp, checkpoints / "dist", tp, pp, settings)
    for tokens, _ in results:
        assert torch.equal(tokens, ref_model_order)
    last_stage = [rows for _, rows in results if rows]
    assert len(last_stage) == tp and all(max(r) <= 5 for r in last_stage)  # logits only per chunk, on the last stage
    assert not torch.equal(ref_model_order[0], ref_model_order[1])


def _compiled_norm_worker():
    from types import SimpleNamespace

    from megamdm.models.mcore.spec import MegatronRMSNorm, compiled_rms_norm

    cfg = SimpleNamespace(params_dtype=torch.float32, sequence_parallel=False)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        fused, eager = MegatronRMSNorm(cfg, 64, 1e-5, compiled=True).to(dtype), MegatronRMSNorm(cfg, 64, 1e-5).to(dtype)
        with torch.no_grad():
            fused.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
            eager.weight.copy_(fused.weight)
        for s in (7, 12, 30):
            x = torch.randn(s, 2, 64, generator=torch.Generator().manual_seed(s)).to(dtype)
            outs = []
            for norm in (fused, eager):
                xi = x.clone().requires_grad_(True)
                norm.weight.grad = None
                y = norm(xi)
                (y.float() * torch.linspace(-1, 1, 64)).sum().backward()
                outs.append((y.float(), xi.grad.float(), norm.weight.grad.float()))
            errors[(str(dtype), s)] = max(((a - b).norm() / b.norm()).item() for a, b in zip(*outs))
    return {
        "errors": errors,
        "frames": dict(torch._dynamo.utils.counters["frames"]),
        "cached": compiled_rms_norm() is compiled_rms_norm(),
    }


def test_compiled_rms_norm_equals_the_eager_one_at_every_length():
    """``train.norm: compiled`` (auto on CUDA): the local spec's RMSNorm through ``torch.compile``
    gives the eager norm's output and gradients, at three sequence lengths from one dynamic-shape
    compilation (a step's trimmed length must not recompile it). In a child process: inductor's
    compile workers, once started in pytest's process, hang the ranks later tests fork from it."""
    from megamdm.models.mcore.model import resolve_norm

    assert resolve_norm("auto", "cuda", False) and not resolve_norm("auto", "cpu", False)
    assert not resolve_norm("compiled", "cuda", True)  # Transformer Engine's norm is fused already
    (r,) = run_distributed(_compiled_norm_worker, 1)
    for (dtype, _), err in r["errors"].items():
        assert err < (1e-5 if dtype == "torch.float32" else 1e-2), r["errors"]
    assert 1 <= r["frames"]["ok"] <= 2, r["frames"]  # one compilation per dtype, not per length
    assert r["cached"]
