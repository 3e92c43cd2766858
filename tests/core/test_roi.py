"""IUQ for RoI mask heads (`iuq.core.roi`): levels, the inverse boxes of g, the mirrored RoI grid,
mask targets, and the chunked L_inter against plain autograd."""

import math

import pytest
import torch
from torchvision.ops import roi_align

from iuq.core.losses import focal_toward_zero
from iuq.core.roi import (
    equivariance_rois,
    inverse_boxes,
    pool_rois,
    roi_inter_scene_loss,
    roi_inter_scene_loss_naive,
    roi_levels,
    roi_mask_targets,
    roi_pairs,
)
from iuq.core.transforms import BatchTransform, hflip


def test_levels_follow_the_56_pixel_rule():
    sides = torch.tensor([20.0, 111.0, 112.0, 223.0, 224.0, 447.0, 448.0, 5000.0])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sides, sides], 1)
    assert roi_levels(boxes, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert roi_levels(boxes, 2).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def test_inverse_boxes_of_a_flip_and_of_a_crop():
    canvas = (64, 64)
    box = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    src, flipped = inverse_boxes(hflip(1), box, torch.tensor([0]), canvas)
    assert src.tolist() == [[34.0, 5.0, 54.0, 25.0]] and flipped.tolist() == [True]
    # A crop of the central half, resized back: output [0, 64] is source [16, 48].
    crop = BatchTransform(torch.full((1, 2), 0.5), torch.full((1, 2), 0.25))
    src, flipped = inverse_boxes(crop, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), torch.tensor([0]), canvas)
    assert src.tolist() == [[16.0, 16.0, 48.0, 48.0]] and flipped.tolist() == [False]


def test_mirrored_rois_equal_pooling_the_flipped_map():
    """Under a flip, RoIAlign on f(I) at g^-1(b) with the grid mirrored is RoIAlign on g(f(I)) at b."""
    torch.manual_seed(0)
    level = torch.randn(2, 3, 16, 16)  # stride 4 on a 64 px canvas
    boxes_g = torch.tensor([[6.0, 10.0, 30.0, 50.0], [20.0, 4.0, 61.0, 33.0]])
    index = torch.tensor([1, 0])
    pooled = equivariance_rois([level], [4], hflip(2), boxes_g, index, (64, 64), 7)
    flipped_map = hflip(2).apply(level)  # exact: a flip is a gather
    rois = torch.cat([index[:, None].float(), boxes_g], 1)
    reference = roi_align(flipped_map, rois, 7, 0.25, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=0)  # float rounding of the sample points
    unmirrored = pool_rois([level], [4], inverse_boxes(hflip(2), boxes_g, index, (64, 64))[0], index, 7)
    assert (unmirrored - reference).abs().max() > 0.1


def test_shifted_rois_equal_pooling_the_shifted_map():
    """An integer shift (no_resize crop): pooling f(I) at g^-1(b) is pooling g(f(I)) at b."""
    torch.manual_seed(1)
    level = torch.randn(1, 2, 16, 16)
    g = BatchTransform(torch.ones(1, 2), torch.tensor([[0.25, 0.125]]))  # source = output + (16, 8) px
    box_g = torch.tensor([[4.0, 8.0, 28.0, 40.0]])  # its source [20, 16, 44, 48] lies inside the canvas
    pooled = equivariance_rois([level], [4], g, box_g, torch.tensor([0]), (64, 64), 7)
    reference = roi_align(g.apply(level), torch.cat([torch.zeros(1, 1), box_g], 1), 7, 0.25, 2, aligned=True)
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=0)


def test_pool_rois_reads_each_box_from_its_level():
    p2, p3 = torch.zeros(1, 1, 64, 64), torch.ones(1, 1, 32, 32)  # strides 4 and 8 on a 256 px canvas
    boxes = torch.tensor([[0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 150.0, 150.0]])
    out = pool_rois([p2, p3], [4, 8], boxes, torch.tensor([0, 0]), 5)
    assert out.shape == (2, 1, 5, 5)
    assert out[0].abs().sum() == 0 and torch.all(out[1] == 1)


def test_mask_targets_crop_and_resize():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [0.0, 0.0, 8.0, 8.0]])
    target = roi_mask_targets(masks, boxes, 28)
    assert target.shape == (2, 28, 28)
    assert target[0].all() and not target[1].any()  # the box on the mask, and a box beside it
    # The whole canvas: the mask covers the middle half of the 28 cells on each axis.
    whole = roi_mask_targets(masks[:1], torch.tensor([[0.0, 0.0, 32.0, 32.0]]), 28)[0]
    assert whole.sum() == 14 * 14 and whole[7:21, 7:21].all()


def test_pairs_leave_out_the_query_image_and_cap_per_query():
    q_ids = torch.tensor([0, 0, 1])
    r_ids = torch.tensor([0, 1, 2, 2, 1, 3])
    q, r = roi_pairs(q_ids, r_ids, None, None)
    assert torch.all(q_ids[q] != r_ids[r]) and q.numel() == 5 + 5 + 4
    q, r = roi_pairs(q_ids, r_ids, 3, torch.Generator().manual_seed(0))
    assert torch.all(q_ids[q] != r_ids[r])
    assert torch.bincount(q).tolist() == [3, 3, 3]
    for i in range(3):  # no RoI twice for one query
        assert r[q == i].unique().numel() == 3


class TinyHead(torch.nn.Module):
    """A mask head with parameters and BatchNorm, as an `RoIDecoder`: a 1x1 conv generated from the
    query, a 3x3 conv + BN, one channel per class, at the RoI's size. `norm` (L_inter): a dict of
    the statistics to normalise by, {"mean": [c], "var": [c]}."""

    mask_size = 5

    def __init__(self, c=4, classes=3):
        super().__init__()
        self.generate = torch.nn.Linear(c, c)
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(c)
        self.out = torch.nn.Conv2d(c, classes, 1)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, q, feats, labels, norm=None):
        x = feats * self.generate(q)[:, :, None, None]
        x = self.conv(x)
        if norm is None:
            x = self.norm(x)
        else:
            n = self.norm
            scale = torch.rsqrt(norm["var"] + n.eps) * n.weight
            x = (x - norm["mean"][:, None, None]) * scale[:, None, None] + n.bias[:, None, None]
        logits = self.out(torch.relu(x))
        return logits[torch.arange(labels.shape[0]), labels]


def step_stats(c=4):
    """Statistics that depend on a parameter, as a step's base-batch statistics do: [c] each."""
    base = torch.randn(c, requires_grad=True)
    return base, {"mean": 0.3 * base, "var": base.exp()}


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_inter_scene_equals_plain_autograd(chunk):
    torch.manual_seed(0)
    head = TinyHead()
    q = torch.randn(3, 4, requires_grad=True)
    q_ids, q_labels = torch.tensor([0, 0, 1]), torch.tensor([2, 0, 1])
    rois, r_ids = torch.randn(5, 4, 5, 5), torch.tensor([0, 1, 2, 1, 0])
    base, stats = step_stats()
    before = head.norm.running_mean.clone()
    value = roi_inter_scene_loss(q, q_ids, q_labels, rois, r_ids, head, alpha=0.25, gamma=2.0, chunk_pairs=chunk,
                                 norm=stats)  # fmt: skip
    params = [q, base, *head.parameters()]  # the statistics' own inputs get their gradient under checkpointing
    grads = torch.autograd.grad(value, params, retain_graph=True)  # the statistics' graph serves both
    reference = roi_inter_scene_loss_naive(q, q_ids, q_labels, rois, r_ids, head, alpha=0.25, gamma=2.0, norm=stats)
    ref_grads = torch.autograd.grad(reference, params)
    torch.testing.assert_close(value, reference, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-5)
    assert torch.equal(head.norm.running_mean, before)  # L_inter leaves BatchNorm's statistics alone


def test_inter_scene_by_hand_on_one_pair():
    """One query, one RoI of another image: the mean over M x M pixels of the focal toward 0."""
    torch.manual_seed(2)
    head = TinyHead()
    q = torch.randn(1, 4)
    rois = torch.randn(2, 4, 5, 5)
    stats = {"mean": torch.randn(4), "var": torch.rand(4) + 0.5}
    value = roi_inter_scene_loss(q, torch.tensor([7]), torch.tensor([1]), rois, torch.tensor([7, 3]), head,
                                 alpha=0.25, gamma=2.0, norm=stats)  # fmt: skip
    logits = head(q, rois[1:], torch.tensor([1]), stats)[0].detach()  # only the RoI of image 3 (a constant here)
    p = logits.sigmoid()
    by_hand = (-(1 - 0.25) * p**2 * torch.log(1 - p)).mean()
    torch.testing.assert_close(value, by_hand, atol=1e-6, rtol=1e-5)
    assert math.isclose(float(focal_toward_zero(logits.detach(), 0.25, 2.0).mean()), by_hand.item(), rel_tol=1e-5)


def test_inter_scene_without_other_images_is_a_zero_with_a_graph():
    head = TinyHead()
    q = torch.randn(2, 4, requires_grad=True)
    value = roi_inter_scene_loss(q, torch.tensor([1, 1]), torch.tensor([0, 0]), torch.randn(3, 4, 5, 5),
                                 torch.tensor([1, 1, 1]), head, norm={})  # fmt: skip
    assert value == 0 and value.requires_grad


def test_inter_scene_refuses_training_mode_normalisation():
    """Without the step's statistics the pairs would be normalised by their own, and BatchNorm's
    running statistics updated by L_inter (twice under checkpointing)."""
    with pytest.raises(ValueError, match=r"norm is None.*head\['roi_norm'\]"):
        roi_inter_scene_loss(torch.randn(1, 4), torch.tensor([0]), torch.tensor([0]), torch.randn(1, 4, 5, 5),
                             torch.tensor([1]), TinyHead(), norm=None)  # fmt: skip


class TwoStageHead(torch.nn.Module):
    """Two `TinyHead`s, each query decoded by its stage's (a decoder with `stages`)."""

    mask_size = 5

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleList([TinyHead(), TinyHead()])

    def forward(self, q, feats, labels, norm=None, stages=None):
        stages = torch.ones_like(labels) if stages is None else stages
        out = torch.zeros(q.shape[0], 5, 5)
        for s in (0, 1):
            at = (stages == s).nonzero()[:, 0]
            out = out.index_put((at,), self.heads[s](q[at], feats[at], labels[at], None if norm is None else norm[s]))
        return out


def test_chunked_inter_scene_with_stages_equals_plain_autograd():
    torch.manual_seed(4)
    head = TwoStageHead()
    q = torch.randn(4, 4, requires_grad=True)
    q_ids, q_labels, stages = torch.tensor([0, 0, 1, 1]), torch.tensor([2, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    rois, r_ids = torch.randn(5, 4, 5, 5), torch.tensor([0, 1, 2, 1, 0])
    params = [q, *head.parameters()]
    norm = [step_stats()[1], step_stats()[1]]
    value = roi_inter_scene_loss(q, q_ids, q_labels, rois, r_ids, head, chunk_pairs=3, query_stages=stages, norm=norm)
    reference = roi_inter_scene_loss_naive(q, q_ids, q_labels, rois, r_ids, head, query_stages=stages, norm=norm)
    torch.testing.assert_close(value, reference, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(value, params, retain_graph=True)
    for g, r in zip(grads, torch.autograd.grad(reference, params), strict=True):
        torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-5)
    # Both stages' heads are trained; without stages only the default (second) one is.
    outs = dict(zip([id(p) for p in params], grads, strict=True))
    assert all(outs[id(h.out.weight)].abs().sum() > 0 for h in head.heads)
    default = roi_inter_scene_loss(q, q_ids, q_labels, rois, r_ids, head, norm=norm)
    first = torch.autograd.grad(default, [head.heads[0].out.weight], allow_unused=True)[0]
    assert first is None or first.abs().sum() == 0
