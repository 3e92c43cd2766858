"""FCOS assignment (CondInst's sigma) on hand-built cases with known answers."""

import math

import pytest
import torch

from iuq.models.fcos import (
    assign,
    centerness_targets,
    fcos_losses,
    level_locations,
    mask_centres,
    scale_ranges,
)

ANY = [(0.0, float("inf"))]


def test_level_locations_are_cell_centres():
    (xy,) = level_locations([(2, 3)], [8])
    assert xy.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]


def test_scale_ranges_from_sizes_of_interest():
    assert scale_ranges([64, 128, 256, 512, 1024]) == [
        (0, 64), (64, 128), (128, 256), (256, 512), (512, float("inf"))
    ]  # fmt: skip


def test_centre_sampling_radius_1_5_strides():
    """Box (0, 0, 32, 32) with a full mask, centre (16, 16), stride 8: the window is [4, 28] on both
    axes, so of the cell centres 4, 12, 20, 28 only 12 and 20 lie strictly inside."""
    locations = level_locations([(4, 4)], [8])
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    masks = torch.ones(1, 32, 32, dtype=torch.bool)
    a = assign(locations, [8], ANY, boxes, mask_centres(masks, boxes), radius=1.5)
    positive = a.gt.reshape(4, 4) >= 0
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 1:3] = True
    assert torch.equal(positive, expected)
    # (12, 12): left 12, top 12, right 20, bottom 20.
    assert a.reg[5].tolist() == [12, 12, 20, 20]
    # Without centre sampling's limit (a huge radius) every location inside the box is positive.
    wide = assign(locations, [8], ANY, boxes, mask_centres(masks, boxes), radius=100)
    assert bool((wide.gt >= 0).all())


def test_centre_is_the_mask_centre_of_mass():
    """A mask filling only the left quarter of its box moves the centre window left."""
    boxes = torch.tensor([[0.0, 0.0, 64.0, 16.0]])
    masks = torch.zeros(1, 16, 64, dtype=torch.bool)
    masks[0, :, :16] = True
    masks[0, 0, 63] = True  # the box spans the whole width
    centre = mask_centres(masks, boxes)
    assert centre[0, 0] == pytest.approx((16 * 8 * 16 + 63.5) / (16 * 16 + 1))
    locations = level_locations([(2, 8)], [8])
    a = assign(locations, [8], ANY, boxes, centre, radius=1.5)
    xs = sorted({float(locations[0][i, 0]) for i in (a.gt >= 0).nonzero()[:, 0]})
    assert xs == [4.0, 12.0, 20.0]  # the window is [8.3 - 12, 8.3 + 12] = [0, 20.3] clipped to the box


def test_smaller_box_wins_and_scale_range_filters():
    locations = level_locations([(4, 4)], [8])
    big = torch.tensor([0.0, 0.0, 32.0, 32.0])
    small = torch.tensor([8.0, 8.0, 24.0, 24.0])
    boxes = torch.stack([big, small])
    centres = torch.tensor([[16.0, 16.0], [16.0, 16.0]])
    a = assign(locations, [8], ANY, boxes, centres, radius=1.5)
    assert (a.gt[a.gt >= 0] == 1).all()  # every shared location goes to the smaller box
    # The four candidates (12|20, 12|20) lie at largest distance 12 from the small box, 20 from the big.
    inner = [5, 6, 9, 10]
    to_small = assign(locations, [8], [(0.0, 13.0)], boxes, centres, radius=1.5)
    assert to_small.gt[inner].tolist() == [1] * 4
    to_big = assign(locations, [8], [(13.0, 25.0)], boxes, centres, radius=1.5)  # small one out of range
    assert to_big.gt[inner].tolist() == [0] * 4 and int((to_big.gt >= 0).sum()) == 4
    none = assign(locations, [8], [(0.0, 10.0)], boxes, centres, radius=1.5)
    assert none.gt.tolist() == [-1] * 16


def test_no_instances_gives_all_background():
    a = assign(level_locations([(2, 2)], [8]), [8], ANY, torch.zeros(0, 4), torch.zeros(0, 2))
    assert a.gt.tolist() == [-1] * 4 and a.reg.shape == (4, 4)


def test_centerness_by_hand():
    value = centerness_targets(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert value.item() == pytest.approx(math.sqrt(1 / 3 * 2 / 4))


def test_fcos_losses_by_hand():
    """One location, one class, positive, predicted box equal to the target: GIoU loss 0."""
    cls = torch.tensor([[0.0]])
    reg = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    ctr = torch.tensor([0.0])
    terms = fcos_losses(cls, reg, ctr, torch.tensor([0]), reg.clone(), torch.tensor([[5.0, 5.0]]), 1.0, 1.0)
    # focal at p = 0.5, target 1: 0.25 * 0.5^2 * log 2
    assert terms["loss_fcos_cls"].item() == pytest.approx(0.25 * 0.25 * math.log(2))
    assert terms["loss_fcos_box"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["loss_fcos_ctr"].item() == pytest.approx(math.log(2))  # BCE(0, target 1)
