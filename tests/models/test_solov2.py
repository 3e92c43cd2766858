"""SOLOv2's grid assignment and Matrix NMS on hand-worked cases."""

import math

import pytest
import torch

from iuq.models.matrix_nms import matrix_nms
from iuq.models.solo import points_nms, solo_targets

RANGES = [[1.0, 96.0], [48.0, 192.0], [96.0, 384.0], [192.0, 768.0], [384.0, 2048.0]]


def square(x0, y0, x1, y1, size=100):
    m = torch.zeros(1, size, size, dtype=torch.bool)
    m[0, y0:y1, x0:x1] = True
    return m, torch.tensor([[float(x0), float(y0), float(x1), float(y1)]])


def cells(flat: torch.Tensor, s: int) -> set[tuple[int, int]]:
    return {(int(i) // s, int(i) % s) for i in (flat >= 0).nonzero()[:, 0]}


def test_grid_cells_of_one_instance():
    """Box (20, 20, 60, 60) on a 100 px canvas, grid 10: centre (40, 40) is cell (4, 4); sigma 0.2
    gives half-extents 4 px, so rows and columns int(36/10)=3 .. int(44/10)=4."""
    masks, boxes = square(20, 20, 60, 60)
    levels = solo_targets(boxes, masks, (100, 100), [10, 10, 10, 10, 10], RANGES, sigma=0.2)
    assert cells(levels[0], 10) == {(3, 3), (3, 4), (4, 3), (4, 4)}  # sqrt(area) 40 is in [1, 96]
    assert all(cells(level, 10) == set() for level in levels[1:])  # and in no other range


def test_centre_region_is_at_most_one_cell_from_the_centre_cell():
    """A wide sigma reaches far, but the region stays within one cell of the centre cell."""
    masks, boxes = square(0, 0, 100, 100)
    levels = solo_targets(boxes, masks, (100, 100), [10] * 5, [[50.0, 150.0]] + [[0.0, 0.0]] * 4, sigma=1.0)
    assert cells(levels[0], 10) == {(r, c) for r in (4, 5, 6) for c in (4, 5, 6)}


def test_overlapping_claims_go_to_the_smaller_instance():
    big, big_box = square(10, 10, 70, 70)
    small, small_box = square(30, 30, 50, 50)
    masks, boxes = torch.cat([big, small]), torch.cat([big_box, small_box])
    (level, *_) = solo_targets(boxes, masks, (100, 100), [10] * 5, [[1.0, 100.0]] * 5, sigma=0.5)
    grid = level.reshape(10, 10)
    # Both centres are at (40, 40): the big one's region is rows/cols 3..5 (half-extent 15 px), the
    # small one's 3..4 (5 px); where they meet, the small one keeps the cells.
    expected = torch.full((10, 10), -1)
    expected[3:6, 3:6] = 0
    expected[3:5, 3:5] = 1
    assert torch.equal(grid, expected)


def test_empty_image_has_no_positives():
    levels = solo_targets(torch.zeros(0, 4), torch.zeros(0, 50, 50, dtype=torch.bool), (50, 50), [4] * 5, RANGES)
    assert all(bool((level == -1).all()) for level in levels)


def _painted(boxes, masks, canvas, grids, ranges, sigma):
    """The assignment as SOLO paints it, one instance at a time in Python floats (the reference of
    the tensor version)."""
    from iuq.models.fcos import mask_centres

    h, w = canvas
    centres = mask_centres(masks, boxes)
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    out = []
    for s, (lo, hi) in zip(grids, ranges, strict=True):
        cells = torch.full((s, s), -1, dtype=torch.long)
        for k in torch.argsort(size, descending=True).tolist():
            if not lo <= float(size[k]) <= hi:
                continue
            cx, cy = float(centres[k, 0]), float(centres[k, 1])
            half_w = 0.5 * sigma * float(boxes[k, 2] - boxes[k, 0])
            half_h = 0.5 * sigma * float(boxes[k, 3] - boxes[k, 1])
            col, row = int(cx / w * s), int(cy / h * s)
            top, bottom = max(int((cy - half_h) / h * s), row - 1, 0), min(int((cy + half_h) / h * s), row + 1, s - 1)
            left, right = max(int((cx - half_w) / w * s), col - 1, 0), min(int((cx + half_w) / w * s), col + 1, s - 1)
            cells[top : bottom + 1, left : right + 1] = k
        out.append(cells.flatten())
    return out


def test_tensor_assignment_equals_instance_by_instance_painting():
    g = torch.Generator().manual_seed(0)
    grids, ranges = [40, 36, 24, 16, 12], [[1.0, 24.0], [12.0, 48.0], [24.0, 96.0], [48.0, 192.0], [96.0, 2048.0]]
    for trial in range(30):
        k = int(torch.randint(1, 25, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 150
        wh = torch.rand(k, 2, generator=g) * 120 + 2
        boxes = torch.cat([xy, (xy + wh).clamp(max=191)], 1).floor()
        if trial % 3 == 0:  # identical sizes: the painting order must break ties the same way
            boxes[1::2] = boxes[0]
        masks = torch.zeros(k, 160, 192, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = True
        ours = solo_targets(boxes, masks, (160, 192), grids, ranges, sigma=0.2)
        reference = _painted(boxes, masks, (160, 192), grids, ranges, 0.2)
        for a, b in zip(ours, reference, strict=True):
            assert torch.equal(a, b), trial


def test_matrix_nms_hand_worked():
    """m0 = {0,1}, m1 = {0,1,2} (IoU 2/3 with m0), m2 = {2,3} (IoU 1/4 with m1, 0 with m0), all class
    0; m3 = m0's pixels but class 1. Gaussian, sigma 2:
      m1 decays by exp(-2 (2/3)^2) (m0 is undecayed: compensation 0);
      m2 decays by min(f(0)/f(0), f(1/4)/f(2/3)) = 1: m1, itself a duplicate, barely suppresses;
      m3 is alone in its class."""
    masks = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([0, 0, 0, 1])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    out = matrix_nms(masks, labels, scores, "gaussian", sigma=2.0)
    assert out.tolist() == pytest.approx([0.9, 0.8 * math.exp(-8 / 9), 0.7, 0.6])
    linear = matrix_nms(masks, labels, scores, "linear")
    assert linear.tolist() == pytest.approx([0.9, 0.8 / 3, 0.7, 0.6])
    assert matrix_nms(masks[:0], labels[:0], scores[:0]).shape == (0,)


def test_points_nms_keeps_2x2_local_maxima():
    heat = torch.tensor([[[0.1, 0.5, 0.2], [0.3, 0.4, 0.9], [0.6, 0.2, 0.1]]])
    kept = points_nms(heat)
    # A cell survives when it is the largest of the 2x2 window ending at it (itself, up, left, up-left).
    assert kept[0].tolist() == [
        pytest.approx([0.1, 0.5, 0.0]),
        pytest.approx([0.3, 0.0, 0.9]),
        pytest.approx([0.6, 0.0, 0.0]),
    ]
