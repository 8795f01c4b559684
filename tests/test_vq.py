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
