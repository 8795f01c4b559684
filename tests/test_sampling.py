import json
import math
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megamdm.demo import shapesworld
from megamdm.formats.single import load_single, save_single
from megamdm.sampling.draw import filter_logits
from megamdm.sampling.loop import cfg_combine, sample_tokens
from megamdm.sampling.pipeline import MDMSampler
from megamdm.sampling.schedules import stratified_order
from megamdm.sampling.settings import SampleSettings
from megamdm.text import HFTokenizer

from .support.checkpoints import make_tiny_checkpoint
from .support.device_reads import DeviceReads

ROOT = Path(__file__).resolve().parents[1]
V, MASK = 8, 8


class Stub:
    """A model whose step-k prediction at position p is token table[k][p] with probability conf[k][p].
    Its "hidden state" at position p is the one-hot vector of p, and the head reads the step's table."""

    def __init__(self, tables, confs):
        self.tables, self.confs, self.calls, self.rows_seen = tables, confs, 0, []

    def hidden(self, x, step=None):
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
    from megamdm.sampling.schedules import unmask_counts

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
    out = s(["a red circle", "a blue square"], steps=3, cfg=3.0, seed=1, progress=False, batch_size=2)
    assert calls == [4, 4, 4]  # one forward per step, batch 2 cond + 2 uncond
    ids, pad, _ = s.encode_prompts(["a red circle"], 32, 32)
    x = torch.full((1, 8, 8), s.cfg.model.image_mask_id)
    guided = s.guided_hidden_fn(ids, pad, s.default_settings(cfg=3.0))(x, 0)
    from megamdm.text import masked_prompt

    uid, upad = masked_prompt(s.text_tokenizer.mask_id, ids, pad)
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
    """megamdm-sample, run from a folder outside the repository (every command works from any folder)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools/sample.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
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
    files = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert files == ["00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png"]
    assert (tmp_path / "a/manifest.jsonl").is_file()
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
        (["--policy", "greedy"], "argument --policy: invalid choice: 'greedy' (choose from 'gumbel', 'maskgit', 'stratified')"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--height", "36"], "not allowed: height and width must be positive multiples of 2*f = 8"),
        (["--cfg-interval", "0.5,1.5"], "cfg_interval must be two fractions 0 <= lo <= hi <= 1"),
        (["--cfg-interval", "0.5"], "cfg_interval must be two fractions 0 <= lo <= hi <= 1 of the steps, got [0.5]"),
        (["--cfg-interval", "0.5,x"], "argument --cfg-interval: takes comma-separated float values, got '0.5,x'"),
        (["--outpaint", "8,0,0,0"], "--outpaint and --mask need --init-image"),
        (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
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
    r = cli(
        "--checkpoint",
        ckpt,
        "--prompt",
        "x",
        "--init-image",
        tmp_path / "i.png",
        "--outpaint",
        "6,0,0,0",
        "--out",
        tmp_path / "o",
    )
    assert r.returncode == 2 and "multiples of the tokenizer's 4 px patches" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_cli_outpaints_and_records_it(ckpt, tmp_path):
    Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype("uint8")).save(tmp_path / "i.png")
    r = cli(
        "--checkpoint", ckpt, "--prompt", "x", "--init-image", tmp_path / "i.png", "--outpaint", "16,0,16,0",
        "--negative-prompt", "a blue square", "--cfg-interval", "0,0.5", "--steps", 2, "--out", tmp_path / "o", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    img = Image.open(tmp_path / "o" / "00000_00.png")
    meta = json.loads(img.info["megamdm"])
    assert img.size == (64, 32) and meta["outpaint"] == [16, 0, 16, 0] and meta["cfg_interval"] == [0.0, 0.5]
    assert meta["negative_prompt"] == "a blue square"


def test_auto_batch_size_follows_the_memory_there_is(ckpt, monkeypatch):
    import psutil

    s = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32")
    st = s.default_settings()
    real = psutil.virtual_memory()
    assert s.auto_batch_size(32, 32, st, 6) == 6  # a tiny model: all of them fit
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=1))
    assert s.auto_batch_size(32, 32, st, 6) == 1  # never fewer than one


@pytest.mark.parametrize("release", [False, "raw", "untempered"])
@pytest.mark.parametrize("threshold,top_k,top_p", [(0.0, 0, 1.0), (0.3, 5, 1.0), (0.3, 0, 0.8), (0.2, 6, 0.9)])
def test_chunked_prediction_equals_the_straightforward_one_for_the_same_draws(threshold, top_k, top_p, release):
    """One step of the fused, chunked prediction against the whole-image computation: full logits,
    filtering, the editing test, then inverse-CDF draws from the same uniforms (same generator
    seed, one per candidate row in ascending order: every position with editing, the masked ones
    without). The hidden states are one-hot rows through a logits table, so both see bit-identical
    logits. ``release``: the filters before the temperature, and confidences from the untempered
    softmax, unfiltered (``raw``) or filtered (``untempered``, the release's)."""
    from megamdm.sampling.draw import candidates, predict

    n, vocab = 64, 40
    g = torch.Generator().manual_seed(11)
    table = torch.randn(n, vocab, generator=g) * 3
    masked = torch.rand(n, generator=g) < 0.5
    st = SampleSettings(temperature=0.7, top_k=top_k, top_p=top_p, edit_threshold=threshold)
    if release:
        st.filter_order, st.confidence = "filter_first", release
    x0 = torch.full((n + 1,), -1, dtype=torch.long)
    conf = torch.zeros(n + 1)
    cand = candidates(masked, None, st, int(masked.sum()))
    predict(torch.eye(n), lambda r: r @ table, masked, cand, st, torch.Generator().manual_seed(5), 7, x0, conf)

    if release:
        kept = filter_logits(table, 1.0, top_k, top_p)
        z = kept / st.temperature
        untempered = torch.softmax(table if release == "raw" else kept, -1)
        top = untempered.max(-1).values
    else:
        z = filter_logits(table, st.temperature, top_k, top_p)
        top = torch.softmax(z, -1).max(-1).values
    drawn = torch.arange(n) if threshold > 0 else masked.nonzero().squeeze(1)
    assert torch.equal(cand, drawn)
    probs = torch.softmax(z[drawn], -1)
    u = torch.rand(drawn.numel(), 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    picks = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1)
    used = (masked | (top > threshold))[drawn] if threshold > 0 else torch.ones(drawn.numel(), dtype=torch.bool)
    rows, pick = drawn[used], picks[used]
    assert rows.numel() > masked.sum() or threshold == 0
    assert torch.equal(x0[rows], pick)
    want = (untempered[rows] if release else probs[used]).gather(1, pick[:, None]).squeeze(1)
    assert torch.allclose(conf[rows], want, rtol=1e-5, atol=0)
    others = ~torch.isin(torch.arange(n), rows)
    assert not conf[:n][others].any()  # nothing predicted where nothing can change
    assert (x0[:n][others] == -1).all()  # the current token (here -1) stays where the prediction is not used


def _spy(sampler):
    calls = []
    inner = sampler._hidden

    def hidden(ids, pad, x):
        calls.append(ids.clone())
        return inner(ids, pad, x)

    sampler._hidden = hidden
    return calls


def test_negative_prompt_replaces_only_the_unconditional_branch(ckpt):
    s = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32")
    kw = dict(steps=3, cfg=3.0, seed=2, progress=False, batch_size=1)
    calls = _spy(s)
    plain = s("a red circle", **kw)
    plain_calls, calls[:] = list(calls), []
    neg = s("a red circle", negative_prompt="a blue square", **kw)
    cond, _, _ = s.encode_prompts(["a red circle"], 32, 32)
    uncond, _, _ = s.encode_prompts(["a blue square"], 32, 32)
    width = max(int((cond != s.text_tokenizer.pad_id).sum()), int((uncond != s.text_tokenizer.pad_id).sum()))
    for a, b in zip(plain_calls, calls):
        assert torch.equal(b[0, :width], cond[0, :width])  # the conditional row: the same prompt
        assert torch.equal(b[1], uncond[0, : b.shape[1]])  # the unconditional row: the negative prompt
        assert torch.equal(a[1], torch.full_like(a[1], s.text_tokenizer.mask_id))  # before: the masked prompt
    assert not torch.equal(plain.tokens, neg.tokens)
    assert neg.settings["negative_prompts"] == ["a blue square"]
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        s("a red circle", negative_prompt=["x", "y"], **kw)


def test_guidance_interval_runs_one_branch_outside_it(ckpt):
    s = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32")
    calls = _spy(s)
    kw = dict(steps=4, cfg=3.0, seed=2, progress=False, batch_size=1)
    late = s("a red circle", cfg_interval=[0.5, 1.0], **kw)
    assert [c.shape[0] for c in calls] == [1, 1, 2, 2]  # steps 0, 1 unguided: the conditional branch alone
    calls[:] = []
    full = s("a red circle", **kw)
    assert [c.shape[0] for c in calls] == [2, 2, 2, 2]
    calls[:] = []
    none = s("a red circle", **{**kw, "cfg": 0.0})
    assert [c.shape[0] for c in calls] == [1, 1, 1, 1]
    # the first half of the late-guidance run is the unguided run's, step for step
    assert not torch.equal(late.tokens, full.tokens) and not torch.equal(late.tokens, none.tokens)
    with pytest.raises(ValueError, match="cfg_interval must be two fractions"):
        s("a red circle", cfg_interval=[0.5, 1.5], **kw)


@pytest.mark.parametrize("threshold", [0.0, 0.01])  # 0.01: below the random model's confidence, edits happen
def test_outpainting_fills_the_new_region_and_edits_only_its_border(ckpt, threshold):
    s = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32")
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    out = s("a thing", init_image=init, outpaint=(8, 0, 16, 8), steps=4, edit_threshold=threshold, progress=False, seed=3)
    assert out.images[0].size == (32 + 24, 32 + 8)
    tok = out.tokens[0]  # tokenizer order, a 10 x 14 grid of 4 px patches; the image at rows 0-7, columns 2-9
    assert tok.shape == (10, 14)
    original = s.image_tokenizer.encode(torch.from_numpy(np.array(init)).permute(2, 0, 1)[None].float() / 255)[0]
    region = tok[0:8, 2:10]
    far = torch.zeros(8, 8, dtype=torch.bool)
    far[0:6, 2:6] = True  # more than edit_border = 2 tokens from the new columns 0-1, 10-13 and rows 8-9
    assert torch.equal(region[far], original[far])
    if threshold == 0:
        assert torch.equal(region, original)
    else:
        assert sum(out.edits_per_step[0]) > 0  # editing did act, near the new region
    assert out.settings["outpaint"] == [8, 0, 16, 8]
    with pytest.raises(ValueError, match="multiples of the tokenizer's 4 px patches"):
        s("a thing", init_image=init, outpaint=(6, 0, 0, 0), progress=False)


def test_cli_rerun_resumes_only_what_matches_and_never_returns_stale_images(ckpt, tmp_path):
    base = ["--checkpoint", ckpt, "--prompt", "a red circle", "--prompt", "a blue square", "--steps", 2]
    base += ["--out", tmp_path / "o", "--num-images-per-prompt", 2]
    r = cli(*base, "--seed", 3)
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "o/00000_00.png").read_bytes()
    again = cli(*base, "--seed", 3)
    assert again.returncode == 0 and "skipping 2 prompts already finished" in again.stdout
    for changed, word in ((["--seed", 4], "seed"), (["--seed", 3, "--steps", 3], "steps")):
        r = cli(*base, *changed)
        assert r.returncode == 2 and word in r.stderr and "--overwrite" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert (tmp_path / "o/00000_00.png").read_bytes() == before  # nothing stale returned, nothing touched
    other = ["--checkpoint", ckpt, "--prompt", "a green triangle", "--prompt", "a blue square", "--steps", 2]
    r = cli(*other, "--out", tmp_path / "o", "--num-images-per-prompt", 2, "--seed", 3)
    assert r.returncode == 2 and "prompt" in r.stderr
    r = cli(*base, "--seed", 4, "--overwrite")
    assert r.returncode == 0, r.stderr
    meta = json.loads(Image.open(tmp_path / "o/00001_01.png").info["megamdm"])
    assert meta["seed"] == 6 and (tmp_path / "o/00000_00.png").read_bytes() != before


def test_cli_out_that_is_a_file_is_one_line(ckpt, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("mine")
    r = cli("--checkpoint", ckpt, "--prompt", "x", "--out", f)
    assert r.returncode == 2 and "is an existing file; give a folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and f.read_text() == "mine"


@pytest.mark.parametrize("flag", [("--num-images-per-prompt", 0), ("--num-images-per-prompt", -2), ("--batch-size", 0)])
def test_cli_a_count_below_one_is_refused_not_replaced(ckpt, tmp_path, flag):
    """0 used to become the default silently (`args.n or default`)."""
    r = cli("--checkpoint", ckpt, "--prompt", "x", "--steps", 1, "--out", tmp_path / "o", *flag)
    assert r.returncode == 2 and flag[0].lstrip("-").replace("-", "_") in r.stderr.replace("-", "_"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_cut_prompt_is_counted_once_per_prompt(ckpt):
    s = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32")
    s.cfg.text.micro_conditioning = False  # its suffix alone would not fit the tiny model's 24 tokens
    long = "a red circle " * (s.cfg.text.max_len // 4)
    with pytest.warns(UserWarning, match="was cut"):
        out = s([long, "a blue square"], num_images_per_prompt=2, steps=1, batch_size=1, progress=False)
    assert out.prompts_cut == 1
    out = s(["a blue square"], negative_prompt=long, steps=1, progress=False)
    assert out.prompts_cut == 1


def test_final_prediction_leaves_the_last_steps_prediction_everywhere():
    """NL-Diffusion-Image's sampler ends with ``x = x0``: with editing on, every position takes the last
    step's prediction. A stub model predicts another table at every step (argmax draws)."""

    h, w, vocab, steps = 4, 4, 10, 4
    tables = torch.randn(steps, h * w, vocab, generator=torch.Generator().manual_seed(3)) * 4

    def run(final):
        st = SampleSettings(steps=steps, temperature=0.0, edit_threshold=0.999, final_prediction=final, cfg=0.0)
        out = sample_tokens(
            lambda x, k: tables[k].view(1, h, w, vocab),
            lambda rows: rows,
            torch.full((1, h, w), vocab, dtype=torch.long),
            vocab,
            st,
            [torch.Generator().manual_seed(0)],
        )
        return out.tokens.view(-1)

    last = tables[-1].argmax(-1)
    assert torch.equal(run(True), last)
    assert not torch.equal(run(False), last)  # early commitments stay where the threshold is not passed


def test_a_png_from_before_a_new_setting_still_resumes(ckpt, tmp_path):
    """PNGs written before filter_order / confidence / final_prediction existed were made with their defaults."""
    from PIL import PngImagePlugin

    args = ["--checkpoint", ckpt, "--prompt", "a red circle", "--steps", 2, "--out", tmp_path / "o", "--quiet"]
    assert cli(*args).returncode == 0
    png = tmp_path / "o/00000_00.png"
    im = Image.open(png)
    meta = json.loads(im.info["megamdm"])
    for k in ("filter_order", "confidence", "final_prediction"):
        meta.pop(k)
    info = PngImagePlugin.PngInfo()
    for k, v in im.info.items():
        if isinstance(v, str):
            info.add_text(k, json.dumps(meta) if k == "megamdm" else v)
    im.save(png, pnginfo=info)
    r = cli(*args[:-1])
    assert r.returncode == 0 and "skipping 1 prompts already finished" in r.stdout, r.stdout + r.stderr
    r = cli(*args[:-1], "--confidence", "raw")
    assert r.returncode == 2 and "confidence" in r.stderr


@pytest.mark.parametrize("draw", ["confidence", "softmax"])
def test_maskgit_draws_positions_in_proportion_to_what_it_says(draw):
    """``maskgit_draw``: ``confidence`` draws positions in proportion to their confidence, ``softmax`` (the
    released sampler's mask_git) to softmax(confidence / gumbel_temperature). Argmax tokens use no random
    draw, so the generator's first draw is the choice of positions: redone here by hand."""
    from megamdm.sampling.schedules import unmask_counts

    conf = 0.2 + 0.8 * torch.rand(16, generator=torch.Generator().manual_seed(4))
    stub = Stub([torch.arange(16) % V], [conf])
    st = SampleSettings(steps=2, cfg=0, temperature=0.0, policy="maskgit", maskgit_draw=draw, gumbel_temperature=0.3)
    seen = []
    sample_tokens(
        stub.hidden,
        stub.head,
        torch.full((1, 4, 4), MASK),
        MASK,
        st,
        [torch.Generator().manual_seed(9)],
        on_step=lambda k, x: seen.append((x.view(16) != MASK).clone()),
    )
    n = unmask_counts(16, 2, "shift", 3.0)[0]
    weights = torch.softmax(conf / 0.3, -1) if draw == "softmax" else conf
    want = torch.multinomial(weights, n, replacement=False, generator=torch.Generator().manual_seed(9))
    assert torch.equal(seen[0].nonzero().squeeze(1).sort().values, want.sort().values)


def test_gumbel_temperature_schedule_cfg_interval_rule_and_pmj_order():
    """The release's dynamic Gumbel temperature, its guidance interval and its stratified order."""
    from megamdm.sampling.schedules import pmj_order

    st = SampleSettings(steps=3, gumbel_temperature=2.0, min_gumbel_temperature=0.1)
    assert [st.gumbel_temperature_at(k) for k in range(3)] == [2.0, 2.0, 2.0]  # constant: the default
    st.gumbel_temperature_schedule = "linear"  # t = 0, .5, 1: factor 1, .5, 0 -> 2 (f .9 + .1)
    assert [round(st.gumbel_temperature_at(k), 6) for k in range(3)] == [2.0, 1.1, 0.2]
    st.gumbel_temperature_schedule = "cosine"
    assert st.gumbel_temperature_at(1) == pytest.approx(2.0 * (math.cos(math.pi / 4) * 0.9 + 0.1))
    g = SampleSettings(steps=20, cfg=5.0, cfg_interval=[0.25, 1.0])
    assert [k for k in range(20) if g.guided(k)] == list(range(5, 20))  # lo <= k/steps < hi
    g.cfg_interval_rule = "nld"  # guided at 1-based steps 5..20
    assert [k for k in range(20) if g.guided(k)] == list(range(4, 20))
    rank = pmj_order(16, 16)
    assert sorted(rank.tolist()) == list(range(256)) and torch.equal(rank, pmj_order.__wrapped__(16, 16))
    order = rank.argsort()
    for level in range(1, 5):  # the first 4^L cells visited hold one cell of every block of side 16 / 2^L
        side = 16 >> level
        cells = order[: 4**level]
        blocks = {(int(c) // 16 // side, int(c) % 16 // side) for c in cells}
        assert len(blocks) == 4**level
    assert not torch.equal(rank, pmj_order(16, 16, seed=1))
    with pytest.raises(ValueError, match="square power-of-two"):
        pmj_order(8, 12)


def test_the_nld_preset_sets_the_released_samplers_rules(ckpt):
    from megamdm.sampling.settings import SAMPLE_PRESETS

    plain = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32")
    nld = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32", preset="nld")
    st = nld.default_settings()
    for k, v in SAMPLE_PRESETS["nld"].items():
        assert getattr(st, k) == v, k
    assert plain.default_settings().schedule_counts == "megamdm"  # megamdm's own defaults stay
    MDMSampler(plain.pretrained, preset="nld")
    assert plain.pretrained.config.sample.schedule_counts == "megamdm"  # the preset applies to a copy
    assert nld.default_settings(steps=3).steps == 3  # a setting given still wins
    with pytest.raises(ValueError, match="unknown sampler preset 'x'; allowed: nld"):
        MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32", preset="x")
    r = cli("--checkpoint", ckpt, "--prompt", "a red circle", "--preset", "nld", "--steps", 2, "--out", ckpt.parent / "p")
    assert r.returncode == 0, r.stderr
    meta = json.loads(Image.open(ckpt.parent / "p" / "00000_00.png").info["megamdm"])
    assert meta["schedule_counts"] == "nld" and meta["confidence"] == "untempered" and meta["steps"] == 2


@pytest.mark.parametrize(
    "kw,region",
    [
        (dict(edit_threshold=0.0, policy="gumbel", top_k=4), False),
        (dict(edit_threshold=0.05, policy="maskgit", top_p=0.9), False),
        (dict(edit_threshold=0.05, policy="stratified", final_prediction=True), True),  # inpainting
    ],
)
def test_a_sampling_step_never_waits_for_the_device(ckpt, kw, region):
    """The loop reads the device only before its first step (each image's masked count, and the
    editable region's size) and after its last (the edit counts): the reads do not grow with the
    number of steps, so ``--compile`` and CUDA graphs can cover a whole step. The real tiny model,
    guidance on, two images."""
    s = MDMSampler.from_pretrained(ckpt, device="cpu", dtype="fp32")
    ids, pad, _ = s.encode_prompts(["a red circle", "two blue squares"], 32, 32)
    gh, gw = s.grid_for(32, 32)
    mask_id = s.model.mask_id if hasattr(s.model, "mask_id") else s.cfg.model.image_vocab_size
    init = torch.full((2, gh, gw), mask_id, dtype=torch.long)
    editable = None
    if region:
        init[:, : gh // 2] = 1  # the given half, editable only on its last row
        editable = torch.zeros(2, gh, gw, dtype=torch.bool)
        editable[:, gh // 2 - 1 :] = True

    def reads(steps):
        st = s.default_settings(steps=steps, cfg=2.0, **kw)
        fn = s.guided_hidden_fn(ids, pad, st)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        spy = DeviceReads()
        with spy.mode:
            out = sample_tokens(fn, s.head_fn, init, mask_id, st, gens, editable=editable)
        assert (out.tokens != mask_id).all()
        return spy.reads

    stratified_order(gh, gw)  # built once and cached: host work before any step
    few, many = reads(2), reads(6)
    assert few == many, (few, many)
    assert len(few) == (4 if region else 2), few  # 2 images: masked counts (+ the editable regions' sizes)


@pytest.mark.gpu
def test_sampling_steps_make_no_host_sync_on_gpu(ckpt):
    """CUDA's sync debug mode set to error from the end of the first step to the end of the last
    but one: the steps in between (guided forward, chunked head, draws, editing, progress bar) run."""
    from tqdm import tqdm

    s = MDMSampler.from_pretrained(ckpt, device="cuda", dtype="bf16")
    ids, pad, _ = s.encode_prompts(["a red circle", "two blue squares"], 32, 32)
    gh, gw = s.grid_for(32, 32)
    mask_id = s.cfg.model.image_vocab_size
    st = s.default_settings(steps=5, cfg=2.0, edit_threshold=0.05, policy="maskgit")
    init = torch.full((2, gh, gw), mask_id, dtype=torch.long, device="cuda")
    gens = [torch.Generator(device="cuda").manual_seed(i) for i in range(2)]

    def on_step(k, _x):
        torch.cuda.set_sync_debug_mode("error" if k < st.steps - 2 else "default")

    try:
        with tqdm(total=st.steps, disable=True) as bar:
            out = sample_tokens(
                s.guided_hidden_fn(ids, pad, st), s.head_fn, init, mask_id, st, gens, on_step=on_step, progress=bar
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (out.tokens != mask_id).all()


def test_a_rerun_redoes_images_made_from_other_inputs_and_knows_its_checkpoint_by_content(ckpt, tmp_path):
    """A rerun into the same --out is refused (one line) when a negative prompt, an init image or a
    mask differs, or the checkpoint's weights changed; the same checkpoint under another path resumes."""
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "i.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "m.png")
    base = ["--checkpoint", ckpt, "--prompt", "a red circle", "--steps", 2, "--quiet"]
    runs = [
        (["--negative-prompt", "blue"], [], "negative_prompt"),
        (["--init-image", tmp_path / "i.png", "--mask", tmp_path / "m.png"], [], "init_image"),
    ]
    for k, (first, second, word) in enumerate(runs):
        out = ["--out", tmp_path / f"o{k}"]
        assert cli(*base, *out, *first).returncode == 0
        r = cli(*base, *out, *second)
        assert r.returncode == 2 and word in r.stderr and "--overwrite" in r.stderr, r.stderr
    Image.new("RGB", (32, 32), (30, 200, 30)).save(tmp_path / "i2.png")
    r = cli(*base, "--out", tmp_path / "o1", "--init-image", tmp_path / "i2.png", "--mask", tmp_path / "m.png")
    assert r.returncode == 2 and "init_image" in r.stderr  # another picture under another name
    copy = tmp_path / "copy_of_ckpt"
    shutil.copytree(ckpt, copy)
    out = ["--out", tmp_path / "o0", "--negative-prompt", "blue"]
    r = cli("--checkpoint", copy, *base[2:], *out)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr  # the same weights by another path: nothing to redo
    pre = load_single(copy)
    pre.model.head.weight.data.mul_(1.5)  # new weights exported to the same path
    save_single(copy, pre.model, pre.config, pre.groups, pre.image_tokenizer, pre.text_tokenizer, overwrite=True)
    r = cli("--checkpoint", copy, *base[2:], *out)
    assert r.returncode == 2 and "another checkpoint" in r.stderr, r.stderr


def test_the_sampler_refuses_settings_it_does_not_have(ckpt):
    s = MDMSampler.from_pretrained(ckpt, device="cpu")
    with pytest.raises(ValueError, match="unknown sampler setting `guidance_scale`"):
        s("a red circle", guidance_scale=7, progress=False)
    with pytest.raises(ValueError, match="`edit_treshold`: did you mean `edit_threshold`"):
        s("a red circle", edit_treshold=0.5, progress=False)


def test_the_api_and_the_command_make_the_same_image_and_both_record_it(ckpt, tmp_path):
    s = MDMSampler.from_pretrained(ckpt)  # on CPU: fp32, as the command
    out = s("a red circle", steps=3, seed=7, progress=False)
    assert s.dtype == torch.float32
    r = cli("--checkpoint", ckpt, "--prompt", "a red circle", "--steps", 3, "--seed", 7, "--out", tmp_path / "o", "--quiet")
    assert r.returncode == 0, r.stderr
    png = Image.open(tmp_path / "o/00000_00.png")
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(out.images[0]))
    api = json.loads(out.images[0].info["megamdm"])
    assert out.images[0].info["prompt"] == "a red circle" and api["seed"] == 7 and api["steps"] == 3
    saved = Image.open(out.save(tmp_path / "api")[0])
    assert json.loads(saved.info["megamdm"]) == api and np.array_equal(np.asarray(saved), np.asarray(out.images[0]))
    two = s(["a red circle", "a blue square"], steps=1, num_images_per_prompt=2, progress=False).images
    assert [json.loads(im.info["megamdm"])["image_index"] for im in two] == [0, 1, 0, 1]  # within its prompt, as PNGs


def test_words_the_text_tokenizer_does_not_know_are_warned_about(ckpt, tmp_path):
    s = MDMSampler.from_pretrained(ckpt)
    shapesworld.write_text_tokenizer(tmp_path / "words")
    s.text_tokenizer = HFTokenizer(tmp_path / "words")
    assert s.text_tokenizer.encode("A Red Circle.") == s.text_tokenizer.encode("a red circle")  # normalised
    with pytest.warns(UserWarning, match="does not know 'corgi'"):
        s.check_inputs(["a red corgi"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.auto_batch_size(32, 32, s.default_settings(), 2)  # its probe prompt is not the user's: no warning


@pytest.mark.parametrize(
    "args,message",
    [
        (["--edit-threshold", "1.5"], "edit_threshold must be < 1"),
        (["--outpaint", "8,0,0,0", "--height", "64"], "--height and --width come from --init-image"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
    ],
)
def test_values_that_would_do_nothing_are_refused_in_one_line(ckpt, tmp_path, args, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "i.png")
    extra = ["--init-image", tmp_path / "i.png"] if "--outpaint" in args else []
    r = cli("--checkpoint", ckpt, "--prompt", "x", "--steps", 1, "--out", tmp_path / "o", *extra, *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_asked_for_where_there_is_none_is_one_line(ckpt, tmp_path):
    r = cli("--checkpoint", ckpt, "--prompt", "x", "--out", tmp_path / "o", "--device", "cuda")
    assert r.returncode == 2 and "CUDA is not available on this machine" in r.stderr, r.stderr


def test_a_training_checkpoint_given_to_the_sampler_says_how_to_convert_it(tmp_path):
    run = tmp_path / "run"
    (run / "iter_0000010").mkdir(parents=True)
    (run / "iter_0000010/.metadata").write_bytes(b"")
    (run / "latest_checkpointed_iteration.txt").write_text("10\n")
    r = cli("--checkpoint", run, "--prompt", "x", "--out", tmp_path / "o")
    assert r.returncode == 2 and "megamdm-convert to-single --checkpoint" in r.stderr, r.stderr


def test_per_step_callback_sees_the_tokens_fill_in(ckpt):
    s = MDMSampler.from_pretrained(ckpt)
    seen = []
    s(["a red circle"], steps=4, on_step=lambda k, tokens: seen.append((k, tokens.clone())), progress=False)
    assert [k for k, _ in seen] == [0, 1, 2, 3]
    vocab = s.image_tokenizer.vocab_size
    masked = [int((t >= vocab).sum()) for _, t in seen]  # the MASK id is past the tokenizer's codes
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0 and masked[0] > 0
    assert len(s.decode(seen[0][1])) == 1


def test_prompt_files_skip_comment_lines_and_the_plain_layout_has_a_manifest(ckpt, tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\na red circle\n\n  # another\na blue square\n")
    r = cli("--checkpoint", ckpt, "--prompts", tmp_path / "p.txt", "--steps", 1, "--out", tmp_path / "o", "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "o/manifest.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["a red circle", "a blue square"]
    assert rows[1]["files"] == ["00001_00.png"] and rows[1]["seed"] == 1
