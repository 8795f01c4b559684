import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megamdm.sampling import MDMSampler, SampleSettings, cfg_combine, filter_logits, sample_tokens, stratified_order

from .support.checkpoints import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
V, MASK = 8, 8


class Stub:
    """A model whose step-k prediction at position p is token table[k][p] with probability conf[k][p].
    Its "hidden state" at position p is the one-hot vector of p, and the head reads the step's table."""

    def __init__(self, tables, confs):
        self.tables, self.confs, self.calls, self.rows_seen = tables, confs, 0, []

    def hidden(self, x):
        b, h, w = x.shape
        self.k = min(self.calls, len(self.tables) - 1)
        self.calls += 1
        return torch.eye(h * w).view(1, h, w, h * w).expand(b, h, w, h * w)

    def head(self, rows):
        t, c = self.tables[self.k], self.confs[self.k]
        n = t.numel()
        probs = ((1 - c) / (V - 1))[:, None].expand(n, V).clone()
        probs.scatter_(-1, t[:, None], c[:, None])
        self.rows_seen.append(rows.shape[0])
        return rows @ torch.log(probs)


def run_two_steps(threshold, policy="stratified", chunk=256):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, V, (16,), generator=g)
    b = torch.randint(0, V, (16,), generator=g)
    b[:4] = a[:4]  # some predictions do not change
    cb = 0.2 + 0.8 * torch.rand(16, generator=g)  # >= 1/V, so the predicted token is the argmax
    stub = Stub([a, b], [torch.full((16,), 0.99), cb])
    st = SampleSettings(steps=2, cfg=0, temperature=0.0, policy=policy, edit_threshold=threshold)
    init = torch.full((1, 4, 4), MASK)
    res = sample_tokens(stub.hidden, stub.head, init, MASK, st, [torch.Generator().manual_seed(0)], chunk=chunk)
    return res, a, b, cb


def test_editing_overwrites_exactly_the_confident_changed_earlier_tokens():
    thr = 0.5
    res, a, b, cb = run_two_steps(thr)
    c1, c2 = res.committed_per_step[0]
    rank = stratified_order(4, 4)
    s1 = rank < c1  # committed in step 1 (stratified order), the rest in step 2
    expected = torch.where(s1, torch.where((b != a) & (cb > thr), b, a), b)
    assert torch.equal(res.tokens.view(16), expected)
    assert res.edits_per_step[0] == [0, int((s1 & (b != a) & (cb > thr)).sum())]
    assert res.edits_per_step[0][1] > 0
    # positions committed in step 2 are never counted as edits, even where b differs from a
    assert res.edits_per_step[0][1] < int(((b != a) & (cb > thr)).sum())


def test_editing_disabled_changes_nothing_committed():
    for thr in (0.0, -1.0):
        res, a, b, cb = run_two_steps(thr)
        s1 = stratified_order(4, 4) < res.committed_per_step[0][0]
        assert torch.equal(res.tokens.view(16), torch.where(s1, a, b))
        assert res.edits_per_step[0] == [0, 0]


@pytest.mark.parametrize("policy", ["gumbel", "maskgit", "stratified"])
def test_exact_unmask_counts_per_step(policy):
    stub = Stub([torch.zeros(64, dtype=torch.long)], [torch.full((64,), 0.5)])
    st = SampleSettings(steps=5, cfg=0, temperature=1.0, policy=policy)
    seen = []
    sample_tokens(
        stub.hidden,
        stub.head,
        torch.full((2, 8, 8), MASK),
        MASK,
        st,
        [torch.Generator().manual_seed(i) for i in range(2)],
        on_step=lambda k, x: seen.append(int((x[0] == MASK).sum())),
    )
    from megamdm.diffusion import unmask_counts

    counts = unmask_counts(64, 5, "shift", 3.0)
    assert seen == [64 - sum(counts[: k + 1]) for k in range(5)]


def test_filters_and_cfg_formula():
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.isinf(filter_logits(z, 1.0, 2, 1.0)[0, 2:]).all()
    kept = filter_logits(z, 1.0, 0, 0.6)  # p = [.61, .22, .14, .03]: the top token alone reaches 0.6
    assert torch.isfinite(kept[0, 0]) and torch.isinf(kept[0, 1:]).all()
    c, u = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(cfg_combine(c, u, 4.0), 5 * c - 4 * u)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny")


def test_cond_and_uncond_run_in_one_forward_and_guidance_acts_on_the_head_input(ckpt):
    s = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32")
    calls = []
    inner = s._hidden
    s._hidden = lambda *a: (calls.append(a[0].shape[0]), inner(*a))[1]
    out = s(["a red circle", "a blue square"], steps=3, cfg=3.0, seed=1, progress=False)
    assert calls == [4, 4, 4]  # one forward per step, batch 2 cond + 2 uncond
    ids, pad = s.encode_prompts(["a red circle"], 32, 32)
    x = torch.full((1, 8, 8), s.cfg.model.image_mask_id)
    guided = s.guided_hidden_fn(ids, pad, 3.0)(x)
    from megamdm.text import masked_prompt

    uid, upad = masked_prompt(s.text_tokenizer, 1, ids.shape[1])
    # the head is linear: guidance on its input is guidance on the logits
    cfg_on_logits = 4 * s.model.logits(ids, pad, x) - 3 * s.model.logits(uid, upad, x)
    assert torch.allclose(s.head_fn(guided.reshape(64, -1)), cfg_on_logits.reshape(64, -1), atol=1e-4)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_logits_come_in_chunks_and_chunking_changes_no_token(threshold):
    """The head never sees more than ``chunk`` positions at once, and with temperature (random
    draws) the tokens do not depend on the chunk size."""
    g = torch.Generator().manual_seed(1)
    tables = [torch.randint(0, V, (64,), generator=g) for _ in range(4)]
    confs = [0.3 + 0.6 * torch.rand(64, generator=g) for _ in range(4)]
    st = SampleSettings(steps=4, cfg=0, temperature=1.0, top_k=5, policy="gumbel", edit_threshold=threshold)
    runs = []
    for chunk in (64, 5):
        stub = Stub(tables, confs)
        gens = [torch.Generator().manual_seed(3 + i) for i in range(2)]
        runs.append(sample_tokens(stub.hidden, stub.head, torch.full((2, 8, 8), MASK), MASK, st, gens, chunk=chunk))
        assert max(stub.rows_seen) <= chunk
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].edits_per_step == runs[1].edits_per_step


def test_same_seed_same_tokens_regardless_of_batching(ckpt):
    s = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32")
    kw = dict(steps=4, cfg=2.0, edit_threshold=0.3, progress=False)
    a = s(["p one", "p two"], num_images_per_prompt=2, seed=7, batch_size=4, **kw)
    b = s(["p one", "p two"], num_images_per_prompt=2, seed=7, batch_size=1, **kw)
    c = s(["p two"], num_images_per_prompt=2, seeds=[9], batch_size=3, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens[2:], c.tokens)  # prompt 1's images use seeds 9 and 10 either way
    assert not torch.equal(a.tokens[0], a.tokens[1])


def test_inpainting_keeps_unmasked_tokens_when_editing_is_off(ckpt, tmp_path):
    s = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32")
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    mask = np.zeros((32, 32), dtype="uint8")
    mask[8:20, 4:16] = 255
    out = s(["a thing"], init_image=init, mask=Image.fromarray(mask), steps=3, edit_threshold=0, progress=False)
    original = s.image_tokenizer.encode(torch.from_numpy(np.array(init)).permute(2, 0, 1)[None].float() / 255)
    tm = torch.from_numpy(mask > 0).view(8, 4, 8, 4).any(3).any(1)
    assert torch.equal(out.tokens[0][~tm], original[0][~tm])
    with pytest.raises(ValueError, match="does not match the image size"):
        s(["x"], init_image=init, mask=Image.fromarray(mask[:16]), progress=False)


def cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools/sample.py"), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_plain_is_deterministic_and_records_settings(ckpt, tmp_path):
    for out in ("a", "b"):
        r = cli(
            "--checkpoint",
            ckpt,
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "--out",
            tmp_path / out,
            "--steps",
            3,
            "--edit-threshold",
            0.5,
            "--num-images-per-prompt",
            2,
            "--seed",
            3,
            "--quiet",
        )
        assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    info = Image.open(tmp_path / "a/00001_01.png").info
    meta = json.loads(info["megamdm"])
    assert info["prompt"] == "a blue square" and meta["steps"] == 3 and meta["edit_threshold"] == 0.5
    assert meta["seed"] == 5 and meta["image_index"] == 1


def test_cli_geneval_and_dpg_layouts(ckpt, tmp_path):
    md = tmp_path / "evaluation_metadata.jsonl"
    rows = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a red cup"},
    ]
    md.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli(
        "--checkpoint",
        ckpt,
        "--geneval-metadata",
        md,
        "--out",
        tmp_path / "ge",
        "--steps",
        2,
        "--num-images-per-prompt",
        3,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "ge").iterdir()) == ["00000", "00001"]
    for i, row in enumerate(rows):
        folder = tmp_path / "ge" / f"{i:05d}"
        with open(folder / "metadata.jsonl") as f:
            assert json.load(f) == row  # GenEval reads the file with json.load: one object
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    prompts = tmp_path / "dpg_prompts"
    prompts.mkdir()
    (prompts / "partiprompts7.txt").write_text("a cat on a mat\n")
    (prompts / "whoops3.txt").write_text("a dog\n")
    r = cli("--checkpoint", ckpt, "--dpg-prompts", prompts, "--out", tmp_path / "dpg", "--steps", 2, "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "dpg").iterdir()) == ["partiprompts7.png", "whoops3.png"]
    assert Image.open(tmp_path / "dpg/whoops3.png").size == (64, 64)  # 2x2 grid of 32 px samples


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "/nonexistent"], "checkpoint directory not found"),
        (["--policy", "greedy"], "unknown policy 'greedy'"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--height", "36"], "not allowed: height and width must be positive multiples of 2*f = 8"),
    ],
)
def test_cli_bad_input(ckpt, tmp_path, args, message):
    argv = ["--checkpoint", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "o")]
    for k, v in zip(args[::2], args[1::2]):
        if k in argv:
            argv[argv.index(k) + 1] = v
        else:
            argv += [k, v]
    r = cli(*argv)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_empty_prompt_file_and_bad_mask(ckpt, tmp_path):
    empty = tmp_path / "p.txt"
    empty.write_text("\n  \n")
    r = cli("--checkpoint", ckpt, "--prompts", empty, "--out", tmp_path / "o")
    assert r.returncode == 2 and "prompt file is empty" in r.stderr
    Image.new("RGB", (32, 32)).save(tmp_path / "i.png")
    Image.new("L", (16, 32)).save(tmp_path / "m.png")
    r = cli(
        "--checkpoint",
        ckpt,
        "--prompt",
        "x",
        "--init-image",
        tmp_path / "i.png",
        "--mask",
        tmp_path / "m.png",
        "--out",
        tmp_path / "o",
    )
    assert r.returncode == 2 and "does not match the image size" in r.stderr
    assert not (tmp_path / "o").exists()
