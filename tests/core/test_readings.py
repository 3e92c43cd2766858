"""The switches for the paper's open readings of L_inter and L_equi, on hand-checked cases."""

import math

import pytest
import torch

from iuq.core.config import IUQConfig
from iuq.core.criterion import IUQCriterion
from iuq.core.decoders import DotProductDecoder
from iuq.core.equivariance import equivariance_loss
from iuq.core.inter_scene import inter_scene_diagnostics, inter_scene_loss_naive, pair_count
from iuq.core.losses import dice_loss
from iuq.core.sampling import PixelSamples, sample_pixels
from tests.core.test_criterion import _batch


def test_pair_count_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 5, (37,), generator=g)
    p = torch.randint(0, 7, (113,), generator=g)
    assert int(pair_count(q, p)) == int((q[:, None] != p[None, :]).sum())


def test_inter_scale_mask_weight_multiplies_by_the_base_mask_weight():
    pair = IUQCriterion(IUQConfig(inter_weight=2.0), DotProductDecoder(), 6, dice_loss, mask_loss_weight=5.0)
    literal = IUQCriterion(
        IUQConfig(inter_weight=2.0, inter_scale="mask_weight"), DotProductDecoder(), 6, dice_loss, mask_loss_weight=5.0
    )
    assert pair.weights["loss_inter"] == 2.0 and literal.weights["loss_inter"] == 10.0
    assert pair.weights["loss_equi"] == literal.weights["loss_equi"] == 3.0


def _fill_memory(crit, n=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    crit.memory.enqueue(
        PixelSamples(torch.randn(n, 6, generator=g), torch.rand(n, 2, generator=g), torch.arange(n) % 3)
    )


@pytest.mark.parametrize("views", ["all", "original"])
def test_batch_grad_matches_plain_autograd_over_batch_and_memory(views):
    """inter_batch_grad: the value equals the mean over all pairs (batch + memory), and the gradient
    reaching the pixel embeddings equals plain autograd with the batch negatives left attached; memory
    entries get none. Without the switch, no gradient reaches the embeddings through L_inter."""
    cfg = IUQConfig(memory_capacity=100, samples_per_instance=5, equi=False, inter_batch_grad=True, inter_views=views)
    crit = IUQCriterion(cfg, DotProductDecoder(), 6, dice_loss)
    _fill_memory(crit)
    emb, queries, targets, gt, t = _batch()
    ids = torch.tensor([10, 11])
    terms, samples = crit(emb, queries, targets, gt, ids, g=t, generator=torch.Generator().manual_seed(3))
    (grad_emb,) = torch.autograd.grad(terms["loss_inter"], [emb], retain_graph=True)

    ref_batch = sample_pixels(emb[:2], gt, ids, k=5, generator=torch.Generator().manual_seed(3), detach=False)
    mem = crit.memory.contents()
    used = queries if views == "all" else queries[:2]
    q_ids = torch.tensor([10, 10, 11, 11, 10, 10, 11, 11][: 2 * len(used)])
    pixels = torch.cat([ref_batch.embeddings, mem.embeddings])
    pixel_ids = torch.cat([ref_batch.image_ids, mem.image_ids])
    ref = inter_scene_loss_naive(torch.cat(used), q_ids, pixels, pixel_ids, DotProductDecoder(), pixel_grad=True)
    (ref_grad,) = torch.autograd.grad(ref, [emb])
    assert terms["loss_inter"].item() == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(grad_emb, ref_grad, atol=1e-6, rtol=1e-5)
    assert grad_emb.abs().sum() > 0
    assert not samples.embeddings.requires_grad  # what goes into the memory is a constant

    crit.cfg = IUQConfig(memory_capacity=100, samples_per_instance=5, equi=False, inter_views=views)
    terms, _ = crit(emb, queries, targets, gt, ids, g=t, generator=torch.Generator().manual_seed(3))
    (no_grad,) = torch.autograd.grad(terms["loss_inter"], [emb], allow_unused=True)
    assert no_grad is None or no_grad.abs().sum() == 0
    assert terms["loss_inter"].item() == pytest.approx(ref.item(), abs=1e-6)  # same value, other gradient


def test_inter_views_original_leaves_out_the_g_view_queries():
    cfg = IUQConfig(memory_capacity=100, samples_per_instance=5, equi=False, inter_views="original")
    crit = IUQCriterion(cfg, DotProductDecoder(), 6, dice_loss)
    emb, queries, targets, gt, t = _batch()
    ids = torch.tensor([10, 11])
    terms, samples = crit(emb, queries, targets, gt, ids, g=t, generator=torch.Generator().manual_seed(3))
    ref = inter_scene_loss_naive(
        torch.cat(queries[:2]),
        torch.tensor([10, 10, 11, 11]),
        samples.embeddings,
        samples.image_ids,
        DotProductDecoder(),
    )
    assert terms["loss_inter"].item() == pytest.approx(ref.item(), abs=1e-6)
    (grad_g,) = torch.autograd.grad(terms["loss_inter"], [queries[2]], allow_unused=True)
    assert grad_g is None or grad_g.abs().sum() == 0


def test_diagnostics_split_same_and_other_class_by_hand():
    # One query (image 1, class 0); negatives: image 1 (own image, left out), image 2 class 0 with
    # logit 2, image 2 class 1 with logits 0 and -2, image 3 of unknown class (left out).
    q = torch.tensor([[1.0, 0.0]])
    neg = PixelSamples(
        torch.tensor([[5.0, 0.0], [2.0, 0.0], [0.0, 0.0], [-2.0, 0.0], [9.0, 0.0]]),
        torch.zeros(5, 2),
        torch.tensor([1, 2, 2, 2, 3]),
        torch.tensor([0, 0, 1, 1, -1]),
    )
    out = inter_scene_diagnostics(
        q, torch.tensor([1]), torch.tensor([0]), neg, DotProductDecoder(), alpha=0.1, gamma=2.5
    )

    def focal0(x):  # target 0: (1 - alpha) * sigmoid(x)^gamma * softplus(x)
        s = 1 / (1 + math.exp(-x))
        return 0.9 * s**2.5 * math.log1p(math.exp(x))

    assert out["inter_same_class"].item() == pytest.approx(focal0(2.0), rel=1e-6)
    assert out["inter_other_class"].item() == pytest.approx((focal0(0.0) + focal0(-2.0)) / 2, rel=1e-6)
    assert out["inter_fire_same_class"].item() == 1.0 and out["inter_fire_other_class"].item() == 0.0
    assert out["inter_same_class_pairs"].item() == pytest.approx(1 / 3)


def test_samples_and_memory_keep_instance_labels_and_old_memory_loads():
    emb = torch.randn(2, 4, 8, 8)
    masks = [torch.zeros(2, 16, 16, dtype=torch.bool), torch.zeros(1, 16, 16, dtype=torch.bool)]
    masks[0][0, :8], masks[0][1, 8:], masks[1][0, :, :4] = True, True, True
    labels = [torch.tensor([3, 1]), torch.tensor([2])]
    for strategy in ("instance_balanced", "sparse", "dense"):
        s = sample_pixels(emb, masks, [7, 8], strategy, k=4, generator=torch.Generator().manual_seed(0), labels=labels)
        top = s.xy[:, 1] < 0.5
        expected = torch.where(s.image_ids == 8, 2, torch.where(top, 3, 1))  # each pixel's own instance
        assert len(s) > 0 and torch.equal(s.labels, expected), strategy
    crit = IUQCriterion(IUQConfig(memory_capacity=1000), DotProductDecoder(), 4, dice_loss)
    crit.memory.enqueue(s)
    assert crit.memory.contents().labels.tolist() == s.labels.tolist()
    state = {k: v for k, v in crit.memory.state_dict().items() if k != "labels"}  # a checkpoint of before
    fresh = IUQCriterion(IUQConfig(memory_capacity=1000), DotProductDecoder(), 4, dice_loss)
    fresh.memory.load_state_dict(state)
    assert len(fresh.memory) == len(s) and (fresh.memory.contents().labels == -1).all()


def test_feature_variant_ignores_padded_cells():
    """With valid_g, cells of the g-view that are padding do not enter the feature variant."""
    f = torch.randn(1, 3, 4, 4)
    from iuq.core.transforms import hflip

    g = hflip(1)
    f_g = g.apply(f).clone()
    f_g[..., 3] += 10.0  # differs only in the last column
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[..., 3] = False
    args = ([torch.zeros(0, 3)], [torch.zeros(0, 16, 16, dtype=torch.bool)], f, g, DotProductDecoder(), dice_loss)
    assert equivariance_loss(*args, variant="feature", pixel_embeddings_g=f_g, valid_g=valid).item() == 0.0
    assert equivariance_loss(*args, variant="feature", pixel_embeddings_g=f_g).item() > 1.0
