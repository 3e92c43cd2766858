"""G's crop readings and the padding of padded batches (iuq/core/transforms.py)."""

import torch

from iuq.core.sampling import downsample_masks
from iuq.core.transforms import BatchTransform, sample_transforms


def _padded_ones(valid_w: int, valid_h: int, size=(64, 96)):
    """One image of ones on its valid top-left region of a zero-padded canvas, and its pixel mask."""
    mask = torch.zeros(1, *size, dtype=torch.bool)
    mask[0, :valid_h, :valid_w] = True
    return mask[:, None].float(), mask


def test_padding_stays_padding_for_every_crop_mode():
    """Crops drawn inside the valid region fill the same region: nothing of the image leaks into
    the padding (the former transform filled it with image content from outside the crop)."""
    image, mask = _padded_ones(48, 40)
    valid = torch.tensor([[48 / 96, 40 / 64]])
    for mode in ("stretch", "keep_aspect", "no_resize"):
        for seed in range(10):
            g = sample_transforms(1, torch.Generator().manual_seed(seed), valid, 0.5, (0.6, 0.9), mode, (64, 96), 4)
            out = g.apply(image, mode="nearest")[0, 0]
            assert not out[:, 48:].any() and not out[40:].any(), (mode, seed)
            if mode != "no_resize":  # resized back: the valid region stays covered
                assert out[:40, :48].all(), (mode, seed)


def test_a_crop_beyond_the_valid_width_would_have_leaked():
    # The transform the old code built for a crop of side 0.6 at the left of a half-wide image: its
    # output beyond x = 0.5 reads source x = 0.6 * u, still inside the image. The extent now zeroes it.
    image, _ = _padded_ones(48, 64)
    leaky = BatchTransform(torch.tensor([[0.6, 1.0]]), torch.zeros(1, 2))
    fixed = BatchTransform(torch.tensor([[0.6, 1.0]]), torch.zeros(1, 2), torch.tensor([[0.5, 1.0]]))
    assert leaky.apply(image, mode="nearest")[0, 0, :, 48:].any()
    assert not fixed.apply(image, mode="nearest")[0, 0, :, 48:].any()


def test_keep_aspect_uses_one_zoom_for_both_axes_and_stretch_does_not():
    g = sample_transforms(64, torch.Generator().manual_seed(0), mode="keep_aspect")
    assert torch.equal(g.scale[:, 0].abs(), g.scale[:, 1].abs())
    assert ((g.scale.abs() >= 0.6 - 1e-6) & (g.scale.abs() <= 1 + 1e-6)).all()
    s = sample_transforms(64, torch.Generator().manual_seed(0), mode="stretch")
    assert not torch.equal(s.scale[:, 0].abs(), s.scale[:, 1].abs())


def test_no_resize_is_an_exact_stride_aligned_crop_of_the_feature_map():
    """g(f(I)) is f(I)'s cells shifted (and flipped) by whole cells, zero beyond the crop: no
    resampling, so equality is exact, and it commutes exactly with a pointwise map and with mask
    downsampling."""
    h, w, stride = 64, 96, 4
    g = sample_transforms(6, torch.Generator().manual_seed(1), None, 0.5, (0.6, 1.0), "no_resize", (h, w), stride)
    assert torch.equal(g.scale.abs(), torch.ones(6, 2))
    cells = torch.tensor([w / stride, h / stride])
    first = torch.where(g.scale > 0, g.offset, g.offset - g.extent) * cells  # crop start, in cells
    assert torch.allclose(first, first.round(), atol=1e-4)
    assert torch.allclose(g.extent * cells, (g.extent * cells).round(), atol=1e-4)
    feats = torch.randn(6, 5, h // stride, w // stride)
    out = g.apply(feats)
    for i in range(6):
        x0, y0 = (int(v) for v in first[i].round())
        ew, eh = (int(v) for v in (g.extent[i] * cells).round())
        crop = feats[i, :, y0 : y0 + eh, x0 : x0 + ew]
        if g.scale[i, 0] < 0:
            crop = crop.flip(-1)
        assert torch.equal(out[i, :, :eh, :ew], crop)
        assert not out[i, :, eh:].any() and not out[i, :, :, ew:].any()
    conv = torch.nn.Conv2d(5, 3, 1)
    with torch.no_grad():
        assert torch.equal(conv(g.apply(feats)) * (g.apply(torch.ones_like(feats[:, :1])) > 0), g.apply(conv(feats)))
    masks = torch.zeros(6, h, w, dtype=torch.bool)
    masks[:, 10:40, 20:70] = True
    index = torch.arange(6)
    small = downsample_masks(masks, (h // stride, w // stride))
    assert torch.equal(
        downsample_masks(g.apply_masks(masks, index), (h // stride, w // stride)),
        g.apply(small[:, None].float(), mode="nearest")[:, 0] > 0.5,
    )


def test_boxes_are_clipped_to_the_crop():
    g = BatchTransform(torch.ones(1, 2), torch.tensor([[0.25, 0.0]]), torch.tensor([[0.5, 1.0]]))
    box = g.apply_boxes(torch.tensor([[10.0, 10.0, 90.0, 50.0]]), torch.tensor([0]), (100, 100))
    assert box.tolist() == [[0.0, 10.0, 50.0, 50.0]]
