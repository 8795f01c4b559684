"""NVIDIA's NL-Diffusion-Image release: ``from-nld`` on a tiny folder written in the release's layout
(its key names, config fields, sharded index, ChatML tokenizer and Emu3.5 VQGAN), checked against an
independent forward of the release's architecture written here from its published facts."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from megamdm.convert import from_nld  # noqa: E402
from megamdm.errors import ConversionError  # noqa: E402
from megamdm.formats.single import load_single  # noqa: E402
from megamdm.text import format_prompt, masked_prompt, template_tail, tokenize_prompts  # noqa: E402

from .test_vq import _TamingVQGAN  # noqa: E402

D, LAYERS, HEADS, KV, HEAD_DIM, FFN, TEXT_VOCAB, CODES = 64, 2, 4, 2, 16, 96, 300, 64
YARN = {
    "rope_type": "yarn",
    "type": "yarn",
    "rope_theta": 5000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so that YaRN's ramp acts on these ~100 positions
    "beta_fast": 8.0,
    "beta_slow": 0.5,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}
WORDS = (
    "system You are a helpful language and vision assistant . able to understand the visual content that user "
    "provides , assist with variety of tasks using natural Generate an image caption : ORIGINAL WIDTH HEIGHT TOP "
    "LEFT SCORE ; Sure red corgi on beach blue square pattern 0 1 2 3 4 5 6 7 8 9 16 32 1024"
).split()
SPECIAL = {10: "<|im_start|>", 11: "<|im_end|>", 100: "<SPECIAL_100>", **{i: f"<SPECIAL_{i}>" for i in range(18, 23)}}


def release_config() -> dict:
    return {
        "architectures": ["NemotronLabsDiffusionImageForMaskedDiffusion"],
        "model_type": "nemotron_labs_diffusion_image",
        "hidden_size": D,
        "d_model_gen": D,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "head_dim": HEAD_DIM,
        "intermediate_size": FFN,
        "rms_norm_eps": 1e-5,
        "vocab_size": TEXT_VOCAB,
        "max_position_embeddings": 64,
        "rope_parameters": YARN,
        "rope_scaling": YARN,
        "rope_theta": 5000.0,
        "downsample": True,
        "mask_token_id": 100,
        "pad_token_id": 11,
        "group_ce_weight": "{8:0.2}",
        "mm_vqvae": "emu3_vqvae",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
    }


def release_tensors(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=0.08):
        return torch.randn(*shape, generator=g) * s

    t = {
        "encoder.embed_tokens.weight": rnd(TEXT_VOCAB, D, s=0.5),
        "encoder.norm.weight": 1 + rnd(D, s=0.2),
        "encoder.gen_embedding.weight": rnd(CODES + 256, D, s=0.5),
        "encoder.downsample_gen.downsample.norm.weight": 1 + rnd(D, s=0.3),
        "encoder.downsample_gen.downsample.conv.weight": rnd(D, D, 2, 2),
        "encoder.upsample_gen.upsample.norm.weight": 1 + rnd(D, s=0.3),
        "encoder.upsample_gen.upsample.conv.weight": rnd(D, D, 2, 2),
        "encoder.gen_predictor.weight": rnd(CODES, D, s=0.3),
        # not used by text-to-image: dropped
        "diffusion_head.weight": rnd(TEXT_VOCAB, D),
        "encoder.image_newline": rnd(D),
        "encoder.vision_tower.vision_tower.blocks.0.weight": rnd(8, 8),
    }
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        t |= {
            p + "input_layernorm.weight": 1 + rnd(D, s=0.2),
            p + "post_attention_layernorm.weight": 1 + rnd(D, s=0.2),
            p + "self_attn.q_proj.weight": rnd(HEADS * HEAD_DIM, D, s=0.15),
            p + "self_attn.k_proj.weight": rnd(KV * HEAD_DIM, D, s=0.15),
            p + "self_attn.v_proj.weight": rnd(KV * HEAD_DIM, D),
            p + "self_attn.o_proj.weight": rnd(D, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": rnd(FFN, D),
            p + "mlp.up_proj.weight": rnd(FFN, D),
            p + "mlp.down_proj.weight": rnd(D, FFN),
        }
    return t


def write_release(folder, tensors=None):
    """A release-shaped folder: config, two safetensors shards with their index, tokenizer, VQGAN."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(release_config()))
    tensors = tensors or release_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    vocab = {f"w{i}": i for i in range(TEXT_VOCAB)}
    vocab = {v: k for k, v in vocab.items()}
    vocab[0] = "<unk>"
    vocab.update(SPECIAL)
    for i, w in enumerate(WORDS):
        vocab[101 + i] = w
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in vocab.items()}, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.add_special_tokens(list(SPECIAL.values()))
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|im_end|>", "add_bos_token": False}))
    torch.manual_seed(0)
    vq = _TamingVQGAN(32, [1, 2], 1, [8], 16, 32, 8, CODES).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    (folder / "emu3_vqvae").mkdir()
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(folder / "emu3_vqvae" / "model.safetensors"))
    cfg = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16, z_channels=32)
    (folder / "emu3_vqvae" / "config.json").write_text(json.dumps({"embed_dim": 8, "codebook_size": CODES, "ddconfig": cfg}))
    return tensors


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("nld")
    tensors = write_release(root / "NL-Diffusion-Image")
    out = from_nld(root / "NL-Diffusion-Image", root / "release")
    return root, tensors, out


# ---- an independent forward of the release's architecture, from its published facts ----------------
def rms(x, w, eps):
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w


def release_text(caption: str, n_image: int) -> str:
    """The release's conversation for one caption: system turn, user turn, assistant turn holding one
    <SPECIAL_18> per merged image position between <SPECIAL_21> and <SPECIAL_22>."""
    system = (
        "<|im_start|>system\nYou are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language.<|im_end|>\n"
    )
    micro = "ORIGINAL WIDTH : 16; ORIGINAL HEIGHT : 16; TOP : 0; LEFT : 0; SCORE : 6.5"
    user = f"<|im_start|>user\nGenerate an image with the caption:\n {caption} {micro}<|im_end|>\n"
    return system + user + "<|im_start|>assistant\nSure <SPECIAL_21>" + "<SPECIAL_18>" * n_image + "<SPECIAL_22><|im_end|>\n"


def reference_logits(tensors, ids: list[int], image: torch.Tensor) -> torch.Tensor:
    """``ids``: the tokenised release conversation (with <SPECIAL_18> placeholders); ``image [h, w]``
    release ids (its MASK is V + 1). Returns ``[h, w, V]`` logits."""
    h, w = image.shape
    cfg = transformers.MistralConfig(
        vocab_size=TEXT_VOCAB,
        hidden_size=D,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-5,
        rope_parameters={k: v for k, v in YARN.items() if k not in ("type", "llama_4_scaling_beta")},
        max_position_embeddings=64,
    )
    backbone = transformers.MistralModel(cfg).eval()
    state = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith(("encoder.layers.", "encoder.norm"))}
    state["embed_tokens.weight"] = tensors["encoder.embed_tokens.weight"]
    backbone.load_state_dict(state)
    ids_t = torch.tensor(ids)
    emb = tensors["encoder.embed_tokens.weight"][ids_t]
    gen = rms(tensors["encoder.gen_embedding.weight"][image], tensors["encoder.downsample_gen.downsample.norm.weight"], 1e-6)
    down = F.conv2d(gen.permute(2, 0, 1)[None], tensors["encoder.downsample_gen.downsample.conv.weight"], stride=2)
    slots = (ids_t == 18).nonzero().squeeze(1)
    emb[slots] = down[0].flatten(1).t()  # "b d h w -> b (h w) d"
    with torch.no_grad():
        hs = backbone(inputs_embeds=emb[None], attention_mask=torch.zeros(1, 1, len(ids), len(ids))).last_hidden_state[0]
    img = rms(hs[slots], tensors["encoder.upsample_gen.upsample.norm.weight"], 1e-6)
    up_w = tensors["encoder.upsample_gen.upsample.conv.weight"]
    up = F.conv_transpose2d(img.t().reshape(1, D, h // 2, w // 2), up_w, stride=2)
    return up[0].permute(1, 2, 0) @ tensors["encoder.gen_predictor.weight"].t()


def test_converted_release_matches_the_release_architecture(release):
    root, tensors, out = release
    pre = load_single(out)
    c = pre.config
    assert (c.text.template, c.text.drop_len, c.model.merge_norm, c.model.unmerge_norm) == ("nld", -1, True, True)
    assert c.model.rope_scaling == "yarn" and c.model.text_after_image == 2  # <SPECIAL_22> <|im_end|>
    assert pre.text_tokenizer.mask_id == 100 and c.sample.schedule_counts == "nld" and c.sample.final_prediction
    assert (pre.groups.group_sizes, pre.groups.group_weights) == ([8], [0.2])  # group_ce_weight {8: 0.2}
    assert not any("vision_tower" in k or "diffusion_head" in k for k in pre.model.state_dict())
    tok = pre.text_tokenizer
    captions = ["a red corgi on the beach", "a blue square"]  # two lengths: per-sample positions, padding
    tail = template_tail(tok, "nld", c.model.text_after_image)
    texts = [format_prompt(p, width=16, height=16, template="nld") for p in captions]
    ids, pad, _ = tokenize_prompts(tok, texts, 160, tail.kept)
    assert pad[1].any() and not pad[0, : (~pad[1]).sum()].any()
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, CODES, (2, 8, 8), generator=g)
    image[0, :3] = CODES  # some masked positions (megamdm's MASK is V)
    release_image = torch.where(image == CODES, CODES + 1, image)  # the release's is V + 1
    with torch.no_grad():
        ours = pre.model.float().logits(ids, pad, image)
    raw = tokenizers.Tokenizer.from_file(str(root / "NL-Diffusion-Image" / "tokenizer.json"))
    for i, cap in enumerate(captions):
        want_ids = raw.encode(release_text(cap, 16), add_special_tokens=False).ids
        assert [t for t in want_ids if t != 18] == ids[i][~pad[i]].tolist()  # the same conversation, image aside
        ref = reference_logits(tensors, want_ids, release_image[i])
        rel = ((ours[i] - ref).norm() / ref.norm()).item()
        assert rel < 1e-5, rel
        # the unconditional branch: every embedding through the user turn's <|im_end|> is the text MASK's
        cut = [j for j, t in enumerate(want_ids) if t == 11][1]
        want_uncond = [100 if j <= cut else t for j, t in enumerate(want_ids) if t != 18]
        u_ids, u_pad = masked_prompt(tok.mask_id, ids[i : i + 1], pad[i : i + 1], -1, tail.kept)
        assert u_ids[0][~u_pad[0]].tolist() == want_uncond
    # a cut prompt keeps the assistant turn (and so stays a well-formed conversation)
    short, spad, cut = tokenize_prompts(tok, texts[:1], 50, tail.kept)
    assert cut == 1 and short[0, -tail.kept :].tolist() == ids[0][~pad[0]][-tail.kept :].tolist()


def test_converted_release_round_trips_through_megatron_core(release, tmp_path):
    pytest.importorskip("megatron.core")
    from megamdm.convert import from_single, to_single

    from .support.distributed import run_distributed

    _, _, out = release
    run_distributed(from_single, 1, out, tmp_path / "dist")
    back = to_single(tmp_path / "dist", tmp_path / "back")
    a, b = load_single(out).model.state_dict(), load_single(back).model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert load_single(back).config.model == load_single(out).config.model


@pytest.mark.parametrize(
    "damage,message",
    [
        ("missing_shard", "shard model-00002-of-00002.safetensors named by the index is missing"),
        ("wrong_shape", "encoder.gen_predictor.weight has shape (64, 32), expected (64, 64)"),
        ("pickle", "model.safetensors.index.json not found (only pickle files (pytorch_model.bin)"),
        ("architecture", "architecture 'LlamaForCausalLM' is not NL-Diffusion-Image's"),
        ("unknown_key", "release tensor 'encoder.extra_head.weight' is not part of"),
        ("group_weight", "group_ce_weight '{8:high}' is not {groups: weight, ...}"),
    ],
)
def test_bad_release_folders_are_one_line_and_write_nothing(tmp_path, damage, message):
    from megamdm.cli.convert_checkpoint import main

    folder = tmp_path / "NL-Diffusion-Image"
    tensors = release_tensors()
    if damage == "wrong_shape":
        tensors["encoder.gen_predictor.weight"] = torch.zeros(CODES, 32)
    if damage == "unknown_key":
        tensors["encoder.extra_head.weight"] = torch.zeros(4)
    write_release(folder, tensors)
    if damage == "missing_shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    if damage == "pickle":
        (folder / "model.safetensors.index.json").unlink()
        for f in folder.glob("model-*.safetensors"):
            f.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    if damage == "architecture":
        cfg = release_config() | {"architectures": ["LlamaForCausalLM"]}
        (folder / "config.json").write_text(json.dumps(cfg))
    if damage == "group_weight":  # was silently read as plain cross-entropy
        (folder / "config.json").write_text(json.dumps(release_config() | {"group_ce_weight": "{8:high}"}))
    with pytest.raises(ConversionError, match="."):
        from_nld(folder, tmp_path / "out")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["from-nld", "--nld", str(folder), "--out", str(tmp_path / "out")]) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_converted_release_fine_tunes_and_samples(release, tmp_path):
    """ZeRO-2 steps on token shards made with the release's own image tokenizer (two: DeepSpeed's
    schedule gives the first step a learning rate of 0), then the exported model samples with the
    release's sampler settings."""
    pytest.importorskip("deepspeed")
    import numpy as np

    from megamdm.config import DataConfig
    from megamdm.data.shards import BucketBuffer, consolidate, write_part
    from megamdm.finetune import finetune_config
    from megamdm.sampling.pipeline import MDMSampler
    from megamdm.vq import codebook_hash

    from .support.distributed import run_distributed
    from .test_finetune import ROOT, _finetune

    _, _, out = release
    pre = load_single(out)
    vq = pre.image_tokenizer
    h = codebook_hash(vq.codebook())
    b = BucketBuffer()
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    codes = vq.encode(images).numpy()
    for i in range(16):
        b.add(codes[i].astype(np.int64), f"pattern {i % 4}", f"k{i}", (16, 16), (0, 0), 6.0)
    write_part(tmp_path / "mine.zarr", "00000", {"16x16": b}, {"codebook_hash": h})
    consolidate(tmp_path / "mine.zarr", tokenizer=vq.name, codebook_hash=h)
    # zarr-python: tensorstore's threads do not survive the fork of the test ranks
    data = DataConfig(shards=[str(tmp_path / "mine.zarr")], micro_batch_size=2, global_batch_size=4, num_workers=0)
    data.reader = "zarr"
    cfg = finetune_config(
        overrides=[
            f"checkpoint.save_dir={tmp_path / 'ft'}",
            "train.steps=2",
            "optim.lr=1e-3",
            "optim.warmup_steps=0",
            "train.precision=fp32",
            "checkpoint.save_interval=100",
            "logging.log_interval=1",
            f"finetune.deepspeed_config={ROOT / 'configs/deepspeed/zero2.json'}",
        ]
    )
    cfg.data = data
    res = run_distributed(_finetune, 2, out, cfg)
    export = res[0]["export"]
    assert len(res[0]["losses"]) == 2 and np.isfinite(res[0]["losses"]).all()
    tuned = load_single(export)
    assert tuned.config.text.template == "nld" and tuned.config.model == pre.config.model
    before, after = pre.model.state_dict(), tuned.model.state_dict()
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)
    sampler = MDMSampler(tuned, preset="nld")
    got = sampler(["a red corgi"], height=16, width=16, steps=3, seed=0)
    assert got.images[0].size == (16, 16) and got.tokens.shape == (1, 8, 8)
    shutil.rmtree(tmp_path / "ft", ignore_errors=True)
