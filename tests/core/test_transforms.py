import torch

from iuq.core.sampling import downsample_masks
from iuq.core.transforms import BatchTransform, hflip, sample_transforms


def test_flip_twice_is_identity_and_exact():
    x = torch.randn(3, 4, 10, 14)
    f = hflip(3)
    assert torch.equal(f.apply(x), x.flip(-1))
    assert torch.equal(f.apply(f.apply(x)), x)
    ff = f.then(f)
    assert torch.equal(ff.scale, torch.ones(3, 2)) and torch.equal(ff.offset, torch.zeros(3, 2))
    masks = torch.rand(5, 10, 14) > 0.5
    index = torch.tensor([0, 0, 1, 2, 2])
    assert torch.equal(f.apply_masks(f.apply_masks(masks, index), index), masks)


def test_crop_of_masks_then_downsample_agrees_with_crop_of_downsampled_map():
    # A crop aligned to the stride-4 grid: window x in [8, 40) of 64, y in [16, 48) of 64, resized back.
    g = BatchTransform(torch.tensor([[0.5, 0.5]]), torch.tensor([[8 / 64, 16 / 64]]))
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 20:44, 12:36] = True
    m_then_down = downsample_masks(g.apply_masks(masks, torch.tensor([0])), (16, 16))
    down = downsample_masks(masks, (16, 16))
    down_then_g = g.apply(down[:, None].float(), mode="bilinear")[:, 0] >= 0.5
    assert m_then_down.sum() == 144
    assert torch.equal(m_then_down, down_then_g)


def test_feature_map_equivariance_of_a_pointwise_map():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel_size=1)
    image = torch.randn(4, 3, 32, 48)
    g = sample_transforms(4, torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(conv(g.apply(image)), g.apply(conv(image)), atol=1e-5, rtol=1e-5)


def test_points_and_boxes_follow_the_masks():
    g = sample_transforms(2, torch.Generator().manual_seed(5), crop=(0.8, 0.8), flip_p=1.0)
    masks = torch.zeros(1, 100, 100, dtype=torch.bool)
    masks[0, 40:60, 30:70] = True
    out = g.apply_masks(masks, torch.tensor([1]))
    ys, xs = out[0].nonzero(as_tuple=True)
    box = g.apply_boxes(torch.tensor([[30.0, 40.0, 70.0, 60.0]]), torch.tensor([1]), (100, 100))[0]
    assert abs(xs.min().item() - box[0].item()) <= 1 and abs(xs.max().item() + 1 - box[2].item()) <= 1
    assert abs(ys.min().item() - box[1].item()) <= 1 and abs(ys.max().item() + 1 - box[3].item()) <= 1
    # Points map forward and back.
    xy = torch.rand(6, 2)
    idx = torch.tensor([0, 1, 0, 1, 0, 1])
    back = g.scale[idx] * g.apply_points(xy, idx) + g.offset[idx]
    torch.testing.assert_close(back, xy)


def test_sampled_crops_stay_in_range_and_inside_valid_region():
    valid = torch.tensor([[1.0, 1.0], [0.5, 0.75]])
    for seed in range(20):
        g = sample_transforms(2, torch.Generator().manual_seed(seed), valid=valid)
        lo = g.offset  # source of output 0 (or of output v for flips)
        hi = g.scale * valid + g.offset  # source of output v
        a, b = torch.minimum(lo, hi), torch.maximum(lo, hi)
        assert (a >= -1e-6).all() and (b <= valid + 1e-6).all()
        side = (b - a) / valid
        assert ((side >= 0.6 - 1e-6) & (side <= 1.0 + 1e-6)).all()
    # Same generator seed -> same transforms.
    g1 = sample_transforms(3, torch.Generator().manual_seed(1))
    g2 = sample_transforms(3, torch.Generator().manual_seed(1))
    assert torch.equal(g1.scale, g2.scale) and torch.equal(g1.offset, g2.offset)


def test_a_batch_is_transformed_as_its_rows_one_at_a_time():
    """apply runs the exact rows as one gather and the resampled ones as one grid_sample: batching
    must not mix rows (masks of several images, exact and resampled rows in one call)."""
    from iuq.core.transforms import sample_transforms

    g = torch.Generator().manual_seed(3)
    for mode in ("stretch", "no_resize"):
        t = sample_transforms(5, torch.Generator().manual_seed(1), mode=mode, canvas=(48, 64), align=8)
        t.scale[0], t.offset[0] = torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 0.0])  # an exact flip among them
        index = torch.tensor([4, 0, 2, 2, 1, 3, 0])
        x = torch.randn(7, 3, 48, 64, generator=g)
        batched = t.apply(x, index=index)
        for n in range(7):
            assert torch.equal(batched[n : n + 1], t.apply(x[n : n + 1], index=index[n : n + 1])), (mode, n)
