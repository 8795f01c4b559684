import pytest
import torch

from megamdm.gce import GCEGroups, build_groups


def planted(num_clusters, size, dim=8, noise=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_clusters, dim, generator=g) * 2
    labels = torch.arange(num_clusters).repeat_interleave(size)
    x = centers[labels] + noise * torch.randn(num_clusters * size, dim, generator=g)
    shuffle = torch.randperm(x.shape[0], generator=g)
    return x[shuffle], labels[shuffle]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_recover_planted_clusters(seed):
    x, labels = planted(32, 8, seed=seed)
    groups = build_groups(x, [8], [0.2], seed=seed, progress=False)
    blocks = labels[groups.perm].view(-1, 8)
    assert all(len(set(b.tolist())) == 1 for b in blocks)  # every group is exactly one planted cluster


def test_two_levels_recover_nested_clusters():
    # 16 super-clusters, each of 4 tight sub-clusters of 4 points
    g = torch.Generator().manual_seed(3)
    supers = torch.randn(16, 6, generator=g) * 10
    subs = supers.repeat_interleave(4, 0) + torch.randn(64, 6, generator=g)
    x = subs.repeat_interleave(4, 0) + 0.01 * torch.randn(256, 6, generator=g)
    sub_label = torch.arange(64).repeat_interleave(4)
    groups = build_groups(x, [4, 16], [0.2, 0.1], progress=False)
    assert all(len(set(b.tolist())) == 1 for b in sub_label[groups.perm].view(-1, 4))
    assert all(len(set(b.tolist())) == 1 for b in (sub_label[groups.perm] // 4).view(-1, 16))


def test_permutation_is_balanced_and_round_trips(tmp_path):
    x = torch.randn(96, 5)
    groups = build_groups(x, [4, 12], [0.2, 0.05], codebook_hash="abc", progress=False)
    assert sorted(groups.perm.tolist()) == list(range(96))  # each token exactly once
    ids = torch.randint(0, 96, (3, 7))
    assert torch.equal(groups.to_tokenizer(groups.to_model(ids)), ids)
    groups.save(tmp_path / "g.safetensors")
    back = GCEGroups.load(tmp_path / "g.safetensors")
    assert torch.equal(back.perm, groups.perm) and back.group_sizes == [4, 12]
    assert back.group_weights == [0.2, 0.05] and back.codebook_hash == "abc"


def test_bad_group_sizes_are_refused():
    with pytest.raises(ValueError, match="does not divide the vocabulary"):
        build_groups(torch.randn(100, 3), [8], [0.2], progress=False)
    with pytest.raises(ValueError, match="each dividing the next"):
        build_groups(torch.randn(96, 3), [8, 12], [0.2, 0.1], progress=False)
