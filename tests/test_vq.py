import pytest
import torch

from megamdm.vq import KMeansPatchTokenizer, check_image_size, load_image_tokenizer, tokenizer_kind

COLORS = torch.tensor([[1.0, 1.0, 1.0], [0.86, 0.16, 0.16], [0.16, 0.67, 0.24], [0.16, 0.31, 0.86]])


def flat_images(n, size=16, seed=0):
    """Images made of four flat-coloured quadrants."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    h = size // 2
    for i in range(n):
        c = COLORS[torch.randint(0, len(COLORS), (4,), generator=g)]
        for q, (y, x) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
            out[i, :, y : y + h, x : x + h] = c[q][:, None, None]
    return out


def test_kmeans_round_trip_of_flat_images(tmp_path):
    imgs = flat_images(64)
    tok = KMeansPatchTokenizer.fit([imgs], vocab_size=4, patch_size=4, iters=10, progress=False)
    ids = tok.encode(imgs)
    assert ids.shape == (64, 4, 4) and ids.dtype == torch.long
    rec = tok.decode(ids)
    assert rec.shape == imgs.shape
    assert (rec - imgs).abs().max() < 0.02  # flat colours are reproduced almost exactly
    tok.save(tmp_path / "tok")
    again = load_image_tokenizer(tokenizer_kind(tmp_path / "tok"), tmp_path / "tok")
    assert torch.equal(again.encode(imgs), ids) and again.name == tok.name


def test_image_size_must_be_a_multiple_of_2f():
    check_image_size(64, 128, 4)
    with pytest.raises(ValueError, match=r"multiples of 2\*f = 32.*32, 64"):
        check_image_size(100, 64, 16)


@pytest.mark.parametrize("lookup", [True, False])
def test_diffusers_vq_adapter_round_trips_shapes(tmp_path, lookup):
    diffusers = pytest.importorskip("diffusers")
    vq = diffusers.VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=32,
        norm_num_groups=4,
        vq_embed_dim=4,
        lookup_from_codebook=lookup,
    )
    vq.save_pretrained(tmp_path / "vq", safe_serialization=True)
    tok = load_image_tokenizer(tokenizer_kind(tmp_path / "vq"), tmp_path / "vq")
    assert (tok.vocab_size, tok.downsample) == (32, 4)
    imgs = torch.rand(2, 3, 32, 48)
    ids = tok.encode(imgs)
    assert ids.shape == (2, 8, 12) and int(ids.max()) < 32
    out = tok.decode(ids)
    assert out.shape == imgs.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert tok.codebook().shape == (32, 4)


# ---- Emu3.5 / IBQ VQGAN: an independent forward of the taming VQGAN math, in its own key names ----
class _ResBlock(torch.nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        nn = torch.nn
        self.norm1, self.conv1 = nn.GroupNorm(32, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(32, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        act = torch.nn.functional.silu
        h = self.conv2(act(self.norm2(self.conv1(act(self.norm1(x))))))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class _AttnBlock(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = torch.nn.GroupNorm(32, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (torch.nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (f(h).reshape(b, c, hh * ww) for f in (self.q, self.k, self.v))
        w = torch.softmax(q.transpose(1, 2) @ k / c**0.5, dim=-1)  # [b, query, key]
        return x + self.proj_out((v @ w.transpose(1, 2)).reshape(b, c, hh, ww))


class _Level(torch.nn.Module):
    pass


class _TamingVQGAN(torch.nn.Module):
    """taming-transformers' VQGAN (encoder, quant convs, codebook, decoder), written from its description."""

    def __init__(self, ch, ch_mult, nres, attn_res, resolution, z, embed, n_embed):
        super().__init__()
        nn, n = torch.nn, len(ch_mult)
        enc, dec = nn.Module(), nn.Module()
        enc.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        enc.down, res, cin = nn.ModuleList(), resolution, ch
        for i, m in enumerate(ch_mult):
            lvl = _Level()
            lvl.block = nn.ModuleList(_ResBlock(cin if j == 0 else ch * m, ch * m) for j in range(nres))
            lvl.attn = nn.ModuleList(_AttnBlock(ch * m) for _ in range(nres) if res in attn_res)
            if i != n - 1:
                lvl.downsample = _Level()
                lvl.downsample.conv = nn.Conv2d(ch * m, ch * m, 3, stride=2)
                res //= 2
            enc.down.append(lvl)
            cin = ch * m
        for part in (enc, dec):
            part.mid = _Level()
            part.mid.block_1, part.mid.attn_1, part.mid.block_2 = _ResBlock(cin, cin), _AttnBlock(cin), _ResBlock(cin, cin)
        enc.norm_out, enc.conv_out = nn.GroupNorm(32, cin, eps=1e-6), nn.Conv2d(cin, z, 3, padding=1)
        dec.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        dec.up = nn.ModuleList(_Level() for _ in ch_mult)
        for i in reversed(range(n)):
            lvl = dec.up[i]
            lvl.block = nn.ModuleList(_ResBlock(cin if j == 0 else ch * ch_mult[i], ch * ch_mult[i]) for j in range(nres + 1))
            cin = ch * ch_mult[i]
            lvl.attn = nn.ModuleList(_AttnBlock(cin) for _ in range(nres + 1) if res in attn_res)
            if i != 0:
                lvl.upsample = _Level()
                lvl.upsample.conv = nn.Conv2d(cin, cin, 3, padding=1)
                res *= 2
        dec.norm_out, dec.conv_out = nn.GroupNorm(32, cin, eps=1e-6), nn.Conv2d(cin, 3, 3, padding=1)
        self.encoder, self.decoder = enc, dec
        self.quant_conv, self.post_quant_conv = nn.Conv2d(z, embed, 1), nn.Conv2d(embed, z, 1)
        self.quantize = _Level()
        self.quantize.embedding = nn.Embedding(n_embed, embed)

    def _levels(self, h, lvl, ups=False):
        for j, blk in enumerate(lvl.block):
            h = blk(h)
            if len(lvl.attn):
                h = lvl.attn[j](h)
        if hasattr(lvl, "downsample"):
            h = lvl.downsample.conv(torch.nn.functional.pad(h, (0, 1, 0, 1)))
        if ups and hasattr(lvl, "upsample"):
            h = lvl.upsample.conv(torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h

    def codes(self, x):  # pixels in [-1, 1]
        e, act = self.encoder, torch.nn.functional.silu
        h = e.conv_in(x)
        for lvl in e.down:
            h = self._levels(h, lvl)
        h = e.mid.block_2(e.mid.attn_1(e.mid.block_1(h)))
        h = self.quant_conv(e.conv_out(act(e.norm_out(h))))
        z = h.permute(0, 2, 3, 1)
        return (z @ self.quantize.embedding.weight.T).argmax(-1)  # the dot product picks the code

    def pixels(self, codes):
        d, act = self.decoder, torch.nn.functional.silu
        h = self.post_quant_conv(self.quantize.embedding(codes).permute(0, 3, 1, 2))
        h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(d.conv_in(h))))
        for lvl in reversed(d.up):
            h = self._levels(h, lvl, ups=True)
        x = d.conv_out(act(d.norm_out(h)))
        return ((x.clamp(-1, 1) + 1) * 127.5).floor()  # uint8 values, truncated


def test_emu3_vq_codes_and_pixels_match_the_taming_vqgan(tmp_path):
    pytest.importorskip("diffusers")
    import json

    from safetensors.torch import save_file

    cfg = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16, z_channels=32)
    torch.manual_seed(0)
    ref = _TamingVQGAN(32, [1, 2], 1, [8], 16, 32, 8, 64).eval()
    with torch.no_grad():
        ref.quantize.embedding.weight.normal_()
    folder = tmp_path / "emu3_vqvae"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"embed_dim": 8, "n_embed": 64, "ddconfig": cfg}))
    assert tokenizer_kind(folder) == "emu3"
    tok = load_image_tokenizer("emu3", folder)
    assert tok.downsample == 2 and tok.vocab_size == 64
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        want = ref.codes(x * 2 - 1)
        got = tok.encode(x)
        assert torch.equal(got, want)
        pix = tok.decode(got) * 255
        ref_pix = ref.pixels(want)
    assert (pix.round() - ref_pix).abs().max() <= 1 and (pix.round() == ref_pix).float().mean() > 0.99
    # saved into a checkpoint and loaded again, it is still this kind
    tok.save(tmp_path / "saved")
    again = load_image_tokenizer(tokenizer_kind(tmp_path / "saved"), tmp_path / "saved")
    assert type(again).__name__ == "Emu3VQTokenizer" and torch.equal(again.encode(x), want)
    # a wrong shape is one clear line
    bad = dict(ref.state_dict())
    bad["encoder.conv_in.weight"] = torch.zeros(32, 3, 5, 5)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"encoder.conv_in.weight has shape \(32, 3, 5, 5\)"):
        load_image_tokenizer("emu3", folder)
