"""ShapesWorld: the generator follows its spec, its captions are true, and the evaluator is exact."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from megamdm.demo import shapesworld as shapes

ROOT = Path(__file__).resolve().parents[1]


def test_generator_follows_the_spec():
    objs_seen = 0
    for objs in shapes.scenes(3, 2000):
        assert len(objs) in (1, 2)
        for o in objs:
            assert shapes.MIN_SIDE <= o.side <= shapes.MAX_SIDE
            assert 0 <= o.x <= shapes.SIZE - o.side and 0 <= o.y <= shapes.SIZE - o.side
            objs_seen += 1
        if len(objs) == 2:
            a, b = objs
            assert (a.color, a.shape) != (b.color, b.shape)
            (ax, ay), (bx, by) = a.center, b.center
            assert max(abs(ax - bx), abs(ay - by)) >= shapes.MIN_OFFSET
        im = np.asarray(shapes.render(objs))
        assert im.shape == (64, 64, 3)
    assert objs_seen > 2000
    # deterministic by seed
    assert list(shapes.scenes(5, 50)) == list(shapes.scenes(5, 50))
    assert list(shapes.scenes(5, 50)) != list(shapes.scenes(6, 50))


def test_captions_are_true_and_evaluator_scores_ground_truth():
    results = [shapes.score(shapes.render(o), shapes.caption(o)) for o in shapes.scenes(11, 3000)]
    wrong = [r for r in results if not r["correct"]]
    assert len(wrong) / len(results) <= 0.01, wrong[:5]
    s = shapes.summarize(results)
    assert s["single"] >= 0.99 and s["two"] >= 0.99 and s["n_single"] > 500 and s["n_two"] > 1000


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_evaluator_names_each_shape_colour_and_relation(shape):
    for side in (shapes.MIN_SIDE, shapes.MAX_SIDE):
        a = shapes.Obj("blue", shape, 4, 30, side)
        b = shapes.Obj("orange", "circle" if shape != "circle" else "square", 40, 30, 16)
        im = shapes.render([a, b])
        det = {(d.color, d.shape) for d in shapes.detect(im)}
        assert det == {("blue", shape), ("orange", b.shape)}
        assert shapes.score(im, f"a blue {shape} left of a orange {b.shape}")["correct"]
        assert not shapes.score(im, f"a blue {shape} right of a orange {b.shape}")["correct"]
        assert not shapes.score(im, f"a blue {shape}")["correct"]  # one object too many


def test_evaluator_rejects_what_is_wrong():
    im = shapes.render([shapes.Obj("red", "square", 10, 10, 20)])
    assert shapes.score(im, "a red square")["correct"]
    assert not shapes.score(im, "a green square")["correct"]
    assert not shapes.score(im, "a red circle")["correct"]
    # an extra blob bigger than decoding noise makes the count wrong
    d = ImageDraw.Draw(im)
    d.rectangle([45, 45, 54, 54], fill=shapes.COLORS["red"])
    assert not shapes.score(im, "a red square")["correct"]
    # a few stray pixels do not
    im2 = shapes.render([shapes.Obj("red", "square", 10, 10, 20)])
    ImageDraw.Draw(im2).rectangle([50, 50, 52, 52], fill=shapes.COLORS["red"])
    assert shapes.score(im2, "a red square")["correct"]
    with pytest.raises(ValueError, match="not a ShapesWorld caption"):
        shapes.parse_caption("a red thing next to a box")
    res = shapes.score(im, "a red thing next to a box")  # counted apart by the evaluation, not fatal
    assert res["unscorable"] and not res["correct"]


def test_relation_parse_round_trip():
    for objs in shapes.scenes(2, 200, two_prob=1.0):
        cap = shapes.caption(objs)
        want, rel = shapes.parse_caption(cap)
        assert want == [(o.color, o.shape) for o in objs] and rel == shapes.relation(*objs)


def test_heldout_prompts_never_generated():
    singles, doubles = shapes.heldout_prompts(7, 18, 30)
    assert len(set(singles)) == 18 and len(doubles) == 30
    caps = {shapes.caption(o) for o in shapes.scenes(0, 3000, exclude=frozenset(doubles))}
    assert not caps & set(doubles)
    assert set(singles) <= caps  # every single-object caption is trained on


def test_shards_are_img2dataset_layout(tmp_path):
    paths = shapes.write_shards(tmp_path, seed=0, n=25, per_shard=10)
    assert [Path(p).name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(paths[0]) as tf:
        names = tf.getnames()
        assert {"000000000.png", "000000000.txt", "000000000.json"} <= set(names)
        cap = tf.extractfile("000000000.txt").read().decode()
        meta = json.loads(tf.extractfile("000000000.json").read())
        im = Image.open(tf.extractfile("000000000.png"))
        assert shapes.score(im, cap)["correct"] and meta["width"] == 64


def test_eval_tool_ground_truth_and_folders(tmp_path):
    r = subprocess.run(
        [sys.executable, ROOT / "tools/eval_shapes.py", "--ground-truth", "300", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(r.stdout)["overall"] >= 0.99
    from PIL.PngImagePlugin import PngInfo

    for i, (objs, cap) in enumerate(
        [([shapes.Obj("red", "circle", 5, 5, 20)], "a red circle"), ([shapes.Obj("red", "circle", 5, 5, 20)], "a blue circle")]
    ):
        info = PngInfo()
        info.add_text("prompt", cap)
        shapes.render(objs).save(tmp_path / f"{i}.png", pnginfo=info)
    r = subprocess.run(
        [sys.executable, ROOT / "tools/eval_shapes.py", tmp_path, "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(r.stdout)["single"] == 0.5
    Image.new("RGB", (64, 64)).save(tmp_path / "2.png")
    r = subprocess.run([sys.executable, ROOT / "tools/eval_shapes.py", tmp_path], capture_output=True, text=True)
    assert r.returncode == 2 and "no 'prompt' text chunk" in r.stderr


def test_grouping_features_keep_gce_groups_colour_pure():
    """Codes = 16 partial-patch masks in each of the 6 colours, plus white codes. On raw pixels the
    groups of 8 mix colours (one edge in several colours is close); with the ink colour appended
    every group holds one colour."""
    import torch

    from megamdm.gce import build_groups

    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(16, 1, 16, generator=g) < 0.5).float()  # [16 masks, 1, 4x4]
    palette = torch.tensor(shapes.PALETTE[1:]) / 255  # [6, 3]
    codes = [1 - masks * (1 - c[None, :, None]) for c in palette]  # ink where the mask is set
    cb = torch.cat([*codes, torch.ones(8, 3, 16)]).reshape(-1, 48)
    colour = torch.arange(7).repeat_interleave(torch.tensor([16] * 6 + [8]))

    def mixed(features):
        perm = build_groups(features, [8], [0.2], progress=False).perm
        return sum(len(set(r.tolist())) > 1 for r in colour[perm].reshape(-1, 8))

    assert mixed(shapes.grouping_features(cb)) == 0
    assert mixed(cb) >= 10


def test_a_prompt_outside_shapesworld_is_counted_apart_not_fatal(tmp_path):
    """A caption the evaluator cannot read aborted the whole evaluation with a traceback."""
    from PIL.PngImagePlugin import PngInfo

    for i, cap in enumerate(["a red circle", "a corgi on a beach"]):
        info = PngInfo()
        info.add_text("prompt", cap)
        shapes.render([shapes.Obj("red", "circle", 5, 5, 20)]).save(tmp_path / f"{i}.png", pnginfo=info)
    r = subprocess.run([sys.executable, ROOT / "tools/eval_shapes.py", tmp_path, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["single"] == 1.0 and summary["n_single"] == 1 and summary["n_unscorable"] == 1
    assert "1 prompts are not ShapesWorld captions (e.g. 'a corgi on a beach')" in r.stderr
