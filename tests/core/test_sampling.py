import pytest
import torch

from iuq.core.sampling import downsample_masks, sample_pixels


def _batch():
    """Two images, embeddings at stride 4 on a 32x32 input (8x8 grid); value = flat cell index."""
    emb = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8).repeat(1, 3, 1, 1)
    m0 = torch.zeros(3, 32, 32, dtype=torch.bool)
    m0[0, 0:16, 0:16] = True  # 16 cells
    m0[1, 16:24, 16:32] = True  # 8 cells
    m0[2, 28:32, 28:32] = True  # 1 cell
    m1 = torch.zeros(0, 32, 32, dtype=torch.bool)  # an image with no instance
    return emb, [m0, m1]


def test_instance_balanced_takes_k_per_instance_or_all():
    emb, masks = _batch()
    s = sample_pixels(emb, masks, [10, 11], "instance_balanced", k=5, generator=torch.Generator().manual_seed(0))
    assert len(s) == 5 + 5 + 1
    assert s.image_ids.tolist() == [10] * 11  # nothing from the empty image
    cells = s.embeddings[:, 0].long()
    inst0 = (cells // 8 < 4) & (cells % 8 < 4)
    inst1 = (cells // 8 == 4) | (cells // 8 == 5)
    assert int(inst0.sum()) == 5 and int(inst1.sum()) == 5 and 63 in cells.tolist()
    assert len(set(cells.tolist())) == 11  # without replacement
    # xy are the cell centres
    torch.testing.assert_close(s.xy[:, 0], ((cells % 8).float() + 0.5) / 8)
    torch.testing.assert_close(s.xy[:, 1], ((cells // 8).float() + 0.5) / 8)


def test_no_background_and_dense_takes_all():
    emb, masks = _batch()
    s = sample_pixels(emb, masks, [10, 11], "dense")
    fg = downsample_masks(masks[0], (8, 8)).any(0).flatten().nonzero()[:, 0]
    assert sorted(s.embeddings[:, 0].long().tolist()) == fg.tolist() and len(s) == 25


def test_sparse_takes_k_per_image():
    emb, masks = _batch()
    masks[1] = masks[0][:1].clone()
    s = sample_pixels(emb, masks, [10, 11], "sparse", k=20, generator=torch.Generator().manual_seed(0))
    assert (s.image_ids == 10).sum() == 20 and (s.image_ids == 11).sum() == 16
    assert ((s.embeddings[:, 0] >= 64) == (s.image_ids == 11)).all()  # image 2's cells are 64..127


def test_empty_batch_and_unknown_strategy():
    emb = torch.randn(2, 4, 8, 8)
    empty = [torch.zeros(0, 32, 32, dtype=torch.bool)] * 2
    s = sample_pixels(emb, empty, [1, 2])
    assert len(s) == 0 and s.embeddings.shape == (0, 4) and s.xy.shape == (0, 2)
    with pytest.raises(ValueError, match="'grid'"):
        sample_pixels(emb, _batch()[1], [1, 2], "grid")


def test_sampled_embeddings_are_detached():
    emb = torch.randn(2, 3, 8, 8, requires_grad=True)
    s = sample_pixels(emb, _batch()[1], [1, 2])
    assert not s.embeddings.requires_grad
