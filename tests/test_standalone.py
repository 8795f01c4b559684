import json
import os
import shutil
import stat

import pytest
import torch

from megamdm.config import Config, DiffusionConfig, ModelConfig
from megamdm.diffusion import corrupt_batch
from megamdm.errors import CheckpointError
from megamdm.formats.single import load_single, save_single
from megamdm.gce import GCEGroups
from megamdm.models.standalone import MDMTransformer
from megamdm.objective import LossSpec, loss_parts, select_supervised
from megamdm.text import ByteTokenizer, tokenize_prompts
from megamdm.vq import KMeansPatchTokenizer


def inputs(cfg, b=2, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, pad, _ = tokenize_prompts(ByteTokenizer(), ["a red circle", "two blue squares"][:b], 16)
    img = torch.randint(0, cfg.image_vocab_size + 1, (b, h, w), generator=g)
    return ids, pad, img


def bundle(cfg, tmp_path):
    conf = Config(model=cfg)
    tok = KMeansPatchTokenizer(torch.rand(cfg.image_vocab_size, 48), 4)
    groups = GCEGroups.identity(cfg.image_vocab_size, [8], [0.2])
    return conf, tok, groups


def test_forward_shapes_padding_and_dtypes(tiny_model_cfg):
    m = MDMTransformer(tiny_model_cfg).eval()
    ids, pad, img = inputs(tiny_model_cfg)
    h = m(ids, pad, img)
    assert h.shape == (2, 4, 6, 64)
    assert m.logits(ids, pad, img).shape == (2, 4, 6, 64)
    # padding is really masked: changing padded token ids does not change the output
    ids2 = ids.clone()
    ids2[pad] = 7
    assert torch.allclose(m(ids2, pad, img), h, atol=1e-6)
    # bidirectional: the first image token depends on the last one
    img2 = img.clone()
    img2[:, -1, -1] = (img2[:, -1, -1] + 1) % 64
    assert not torch.allclose(m(ids, pad, img2)[:, 0, 0], h[:, 0, 0])
    hb = m.to(torch.bfloat16)(ids, pad, img)
    assert hb.dtype == torch.bfloat16 and torch.allclose(hb.float(), h, atol=0.1)
    with pytest.raises(ValueError, match="even sides"):
        m(ids, pad, img[:, :3])


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_cfg):
    torch.manual_seed(0)
    m = MDMTransformer(tiny_model_cfg).train()
    ids, pad, img = inputs(tiny_model_cfg)
    grads = []
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        m.zero_grad()
        m.logits(ids, pad, img).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    assert grads[0]["layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_save_then_load_gives_bit_identical_logits(tiny_model_cfg, tmp_path):
    m = MDMTransformer(tiny_model_cfg).eval()
    conf, tok, groups = bundle(tiny_model_cfg, tmp_path)
    save_single(tmp_path / "ckpt", m, conf, groups, tok, ByteTokenizer())
    loaded = load_single(tmp_path / "ckpt")
    ids, pad, img = inputs(tiny_model_cfg)
    with torch.no_grad():
        assert torch.equal(loaded.model.logits(ids, pad, img), m.logits(ids, pad, img))
    assert torch.equal(loaded.groups.perm, groups.perm)
    assert loaded.image_tokenizer.name == tok.name


def test_sharded_weights_round_trip(tiny_model_cfg, tmp_path):
    m = MDMTransformer(tiny_model_cfg)
    conf, tok, groups = bundle(tiny_model_cfg, tmp_path)
    save_single(tmp_path / "ckpt", m, conf, groups, tok, ByteTokenizer(), max_shard_bytes=60_000)
    index = json.loads((tmp_path / "ckpt/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = load_single(tmp_path / "ckpt")
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


def test_overwrite_replaces_only_a_checkpoints_own_files(tiny_model_cfg, tmp_path):
    """--overwrite never deletes a folder that is not a megamdm checkpoint, and in one that is it
    replaces the checkpoint's files only (a sharded one by a single-file one, here)."""
    conf, tok, groups = bundle(tiny_model_cfg, tmp_path)
    a, b = MDMTransformer(tiny_model_cfg), MDMTransformer(tiny_model_cfg)
    b.reset_parameters(seed=1)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match="is not a megamdm checkpoint .* nothing was deleted"):
        save_single(other, a, conf, groups, tok, ByteTokenizer(), overwrite=True)
    assert (other / "holiday.jpg").read_bytes() == b"not ours" and len(list(other.iterdir())) == 1
    ck = tmp_path / "ckpt"
    save_single(ck, a, conf, groups, tok, ByteTokenizer(), max_shard_bytes=60_000)
    (ck / "README.md").write_text("my notes")
    save_single(ck, b, conf, groups, tok, ByteTokenizer(), overwrite=True)
    assert (ck / "README.md").read_text() == "my notes"
    assert not list(ck.glob("model-*-of-*.safetensors")) and not (ck / "model.safetensors.index.json").exists()
    loaded = load_single(ck).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in b.state_dict().items())


def test_truncated_weights_are_one_checkpoint_error(tiny_model_cfg, tmp_path):
    conf, tok, groups = bundle(tiny_model_cfg, tmp_path)
    ck = save_single(tmp_path / "ckpt", MDMTransformer(tiny_model_cfg), conf, groups, tok, ByteTokenizer())
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a complete safetensors file"):
        load_single(ck)


def test_bad_checkpoints_fail_clearly(tiny_model_cfg, tmp_path):
    m = MDMTransformer(tiny_model_cfg)
    conf, tok, groups = bundle(tiny_model_cfg, tmp_path)
    good = save_single(tmp_path / "good", m, conf, groups, tok, ByteTokenizer())
    with pytest.raises(CheckpointError, match="not found"):
        load_single(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_single(bad)
    torch.save({"x": 1}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_single(bad)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(good, mismatch)
    c = json.loads((mismatch / "config.json").read_text())
    c["model"]["ffn_hidden_size"] = 96
    (mismatch / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="do not match config.json.*mlp"):
        load_single(mismatch)
    (mismatch / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed JSON"):
        load_single(mismatch)
    with pytest.raises(FileExistsError):
        save_single(good, m, conf, groups, tok, ByteTokenizer())


def test_tiny_model_overfits_a_few_token_grids(tiny_model_cfg):
    """A real learning test: corruption + fused GCE on 4 fixed grids; the loss must fall >10x."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg
    m = MDMTransformer(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    grids = torch.randint(0, cfg.image_vocab_size, (4, 8, 8), generator=g)
    ids, pad, _ = tokenize_prompts(ByteTokenizer(), ["grid zero", "grid one", "grid two", "grid three"], 12)
    dcfg = DiffusionConfig(prompt_drop=0.0, flip_ratio=0.2)
    spec = LossSpec([8], [0.2], impl="torch")
    losses = []
    for step in range(300):
        c = corrupt_batch(
            grids,
            ids,
            pad,
            dcfg,
            vocab_size=cfg.image_vocab_size,
            text_mask_id=257,
            flip_group_size=8,
            seeds=[step * 4 + i for i in range(4)],
        )
        hid = m(c.text_ids, c.text_pad_mask, c.image_input)
        hs, ts, ws, fl = select_supervised(hid, c.target, c.loss_weight, c.is_flipped)
        parts = loss_parts(
            m.head(hs, ts, ws, group_sizes=spec.group_sizes, group_weights=spec.group_weights, impl=spec.impl), fl, spec
        )
        loss = parts.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert losses[0] > 3.5  # about ln(64) + 0.2 (ln 64 - ln 8), lowered by the 0.2-weighted flips
    assert last < first / 10, (first, last, losses[::30])


def test_positions_follow_the_sequence_not_the_padding(tiny_model_cfg):
    """Per-sample positions (the default): an image sits right after its prompt's real tokens, so
    padding a batch wider, or trimming it, changes no logit. With ``fixed_image_start = L`` (models
    before 0.2) every image sits at L, whatever the batch's width. Weights are scaled up so that
    attention, and so any position, matters."""
    import dataclasses

    from megamdm.models.rope import sequence_positions

    cfg = dataclasses.replace(tiny_model_cfg, init_std=0.3)
    ids, pad, img = inputs(cfg)  # prompts of 12 and 16 bytes padded to 16
    wide_ids = torch.cat([ids, torch.full((2, 8), 256)], 1)
    wide_pad = torch.cat([pad, torch.ones(2, 8, dtype=torch.bool)], 1)
    torch.manual_seed(0)
    m = MDMTransformer(cfg).eval()
    with torch.no_grad():
        a, b = m.logits(ids, pad, img), m.logits(wide_ids, wide_pad, img)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        # the short prompt alone (no padding at all) gives what it gave in the batch
        alone = m.logits(ids[:1, :12], pad[:1, :12], img[:1])
        assert torch.allclose(alone, a[:1], rtol=1e-4, atol=1e-4)
        legacy = MDMTransformer(dataclasses.replace(cfg, fixed_image_start=24)).eval()
        legacy.load_state_dict(m.state_dict())
        la, lb = legacy.logits(ids, pad, img), legacy.logits(wide_ids, wide_pad, img)
        assert torch.allclose(la, lb, rtol=1e-4, atol=1e-4) and not torch.allclose(la, a, atol=1e-2)
        with pytest.raises(ValueError, match="do not fit before the image"):
            legacy.logits(torch.cat([wide_ids, wide_ids], 1), torch.cat([wide_pad, wide_pad], 1), img)
    # text after the image: the last 2 real tokens continue past the 6 merged image positions
    pos, start = sequence_positions(torch.tensor([[False] * 5 + [True] * 3]), 6, text_after_image=2)
    assert start.tolist() == [3] and pos[0, :5].tolist() == [0, 1, 2, 9, 10]


def test_a_checkpoint_from_before_per_sample_positions_keeps_its_layout(tiny_model_cfg, tmp_path):
    """format_version 1 (megamdm < 0.2) placed images after the prompt padded to text.max_len; such a
    checkpoint loads with ``fixed_image_start = max_len`` and gives the logits it gave then."""
    import dataclasses

    conf, tok, groups = bundle(tiny_model_cfg, tmp_path)
    conf.text.max_len = 16
    m = MDMTransformer(dataclasses.replace(tiny_model_cfg, fixed_image_start=16)).eval()
    save_single(tmp_path / "old", m, conf, groups, tok, ByteTokenizer())
    cfg_path = tmp_path / "old" / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["format_version"] = 1
    del raw["model"]["fixed_image_start"], raw["model"]["text_after_image"]
    cfg_path.write_text(json.dumps(raw))
    old = load_single(tmp_path / "old")
    assert old.config.model.fixed_image_start == 16
    ids, pad, img = inputs(tiny_model_cfg)
    with torch.no_grad():  # the 12-byte prompt trimmed of its padding or not: the image stays at 16
        want = m.logits(ids[:1], pad[:1], img[:1])
        assert torch.allclose(old.model.logits(ids[:1, :12], pad[:1, :12], img[:1]), want, rtol=1e-4, atol=1e-6)
        per_sample = MDMTransformer(tiny_model_cfg).eval()
        per_sample.load_state_dict(m.state_dict())
        assert not torch.allclose(per_sample.logits(ids[:1], pad[:1], img[:1]), want, rtol=1e-4, atol=1e-6)
    # a training run's saved config.yaml without the key is read the same way
    from megamdm.config import load_config_text

    assert load_config_text("model:\n  num_layers: 2\ntext:\n  max_len: 40\n").model.fixed_image_start == 40


def test_a_checkpoint_is_readable_as_the_users_umask_allows(tmp_path):
    """mkdtemp made the folder 0700: a release written on a shared cluster was unreadable to teammates."""
    cfg = Config()
    cfg.model = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=1, head_dim=16)
    cfg.model.ffn_hidden_size, cfg.model.image_vocab_size, cfg.model.text_vocab_size = 64, 16, 384
    old = os.umask(0o022)
    try:
        out = save_single(
            tmp_path / "ck",
            MDMTransformer(cfg.model),
            cfg,
            GCEGroups.identity(16, [8], [0.2]),
            KMeansPatchTokenizer(torch.rand(16, 48), 4),
            ByteTokenizer(),
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes == {0o644}
