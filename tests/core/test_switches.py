"""The failure-mode switches of IUQConfig: weight ramp, centred L_inter, per-instance reduction,
unit-weight L_equi, one-sided stop-gradients, and gradient shares at parameter groups."""

import pytest
import torch

from iuq.core.config import IUQConfig
from iuq.core.criterion import IUQCriterion
from iuq.core.decoders import DotProductDecoder, DynamicConvDecoder
from iuq.core.equivariance import equivariance_loss
from iuq.core.inter_scene import inter_scene_loss, inter_scene_loss_naive, pair_count
from iuq.core.losses import dice_loss, l2_toward_zero
from iuq.core.sampling import PixelSamples
from iuq.core.transforms import hflip
from iuq.engine.step import gradient_shares, shared_parameter_groups
from tests.models.test_condinst import tiny_condinst


def test_warmup_ramps_both_weights_linearly_from_zero():
    crit = IUQCriterion(IUQConfig(warmup_steps=4, equi_weight=3.0), DotProductDecoder(), 4, dice_loss)
    assert crit.weights_at(0) == {"loss_inter": 0.25, "loss_equi": 0.75}
    assert crit.weights_at(2) == {"loss_inter": 0.75, "loss_equi": 2.25}
    assert crit.weights_at(3) == crit.weights_at(500) == {"loss_inter": 1.0, "loss_equi": 3.0}
    off = IUQCriterion(IUQConfig(), DotProductDecoder(), 4, dice_loss)
    assert off.weights_at(0) == off.weights == {"loss_inter": 1.0, "loss_equi": 3.0}
    with pytest.raises(ValueError, match="iuq.warmup_steps"):
        IUQConfig(warmup_steps=-1)


def test_unit_equi_weight_divides_out_the_base_mask_weight():
    weighted = IUQCriterion(IUQConfig(), DotProductDecoder(), 4, dice_loss, mask_loss_weight=3.0)
    unit = IUQCriterion(IUQConfig(equi_weight_base="unit"), DotProductDecoder(), 4, dice_loss, mask_loss_weight=3.0)
    assert weighted.weights["loss_equi"] == 3.0 and unit.weights["loss_equi"] == 1.0
    assert unit.weights["loss_inter"] == weighted.weights["loss_inter"] == 1.0


def test_centring_removes_the_free_zero_of_an_all_negative_kernel():
    """ReLU features are >= 0, so a kernel with every entry negative scores every pixel of every image
    below 0: L_inter is ~0 whatever the kernel learns. Against centred features it is not."""
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(400, 8, generator=g) * 2  # ReLU-like: non-negative
    ids = torch.arange(400) % 5 + 1
    kernel = torch.full((1, 8), -3.0, requires_grad=True)
    q_ids = torch.zeros(1, dtype=torch.long)
    plain = inter_scene_loss(kernel, q_ids, feats, ids, DotProductDecoder(), loss="l2")
    assert plain.item() < 1e-9
    cfg = IUQConfig(inter_center=True, inter_mode="minibatch", equi=False, inter_loss="l2")
    crit = IUQCriterion(cfg, DotProductDecoder(), 8, dice_loss)
    centred = crit.centred(PixelSamples(feats, torch.rand(400, 2), ids))
    mean = feats.mean(0)
    assert torch.allclose(centred.embeddings, feats - mean)
    loss = inter_scene_loss(kernel, q_ids, centred.embeddings, ids, DotProductDecoder(), loss="l2")
    expected = l2_toward_zero(kernel.detach() @ (feats - mean).t()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and loss.item() > 0.05
    (grad,) = torch.autograd.grad(loss, kernel)
    assert grad.abs().sum() > 0


def test_running_center_first_takes_the_mean_then_moves_with_momentum():
    cfg = IUQConfig(inter_center=True, inter_center_momentum=0.75, equi=False)
    crit = IUQCriterion(cfg, DotProductDecoder(), 2, dice_loss)
    one = PixelSamples(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), torch.zeros(2, 2), torch.tensor([1, 2]))
    crit.update_memory(one)
    assert crit.center.tolist() == [2.0, 4.0] and int(crit.center_count) == 1
    two = PixelSamples(torch.tensor([[6.0, 0.0]]), torch.zeros(1, 2), torch.tensor([3]))
    crit.update_memory(two)
    assert crit.center.tolist() == [0.75 * 2 + 0.25 * 6, 0.75 * 4]
    assert set(crit.state_dict()) >= {"center", "center_count"}  # checkpointed, so a resume is exact
    assert "center" not in IUQCriterion(IUQConfig(), DotProductDecoder(), 2, dice_loss).state_dict()


@pytest.mark.parametrize("decoder,d,pix_dim", [(DotProductDecoder(), 6, 6), (DynamicConvDecoder(soi=0.3), 169, 8)])
def test_query_weights_chunked_equals_naive_and_the_hand_formula(decoder, d, pix_dim):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, d, dtype=torch.float64, generator=g).requires_grad_()
    qi = torch.tensor([0, 0, 0, 1])  # image 0: an instance with 3 positives; image 1: one with 1
    w = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0], dtype=torch.float64)
    pixels = torch.randn(50, pix_dim, dtype=torch.float64, generator=g)
    pi = torch.tensor([0] * 10 + [1] * 15 + [2] * 25)
    pxy, qxy = torch.rand(50, 2, dtype=torch.float64, generator=g), torch.rand(4, 2, dtype=torch.float64, generator=g)
    a = inter_scene_loss(q, qi, pixels, pi, decoder, pxy, qxy, loss="bce", chunk_size=7, query_weights=w)
    (ga,) = torch.autograd.grad(a, q)
    b = inter_scene_loss_naive(q, qi, pixels, pi, decoder, pxy, qxy, loss="bce", query_weights=w)
    (gb,) = torch.autograd.grad(b, q)
    assert abs(a.item() - b.item()) < 1e-12 and (ga - gb).abs().max().item() < 1e-12
    # by hand: each query's mean over its valid pixels (40 for image 0's, 35 for image 1's), averaged
    # within its instance, then over the two instances
    logits = decoder(q.detach(), pixels, pxy, qxy)  # [4, 50]; some above 20, where F.softplus cuts over to x
    per_pair = torch.logaddexp(logits, torch.zeros_like(logits))  # log(1 + e^x)
    inst0 = sum(per_pair[k, 10:].sum() for k in range(3)) / 3
    inst1 = per_pair[3, torch.cat([torch.arange(10), torch.arange(25, 50)])].sum()
    expected = (inst0 + inst1) / (40 + 35)
    assert a.item() == pytest.approx(expected.item(), rel=1e-12)
    assert pair_count(qi, pi, w).item() == pytest.approx(75.0)
    assert pair_count(qi, pi).item() == 3 * 40 + 35


def test_instance_reduction_in_l_equi_averages_each_instances_queries():
    torch.manual_seed(0)
    emb = torch.randn(1, 4, 6, 6, requires_grad=True)
    q = torch.randn(4, 4, requires_grad=True)
    masks = torch.zeros(4, 24, 24, dtype=torch.bool)
    masks[:3, 2:12, 4:16] = True  # one instance matched by 3 queries
    masks[3, 14:22, 3:9] = True  # another by 1
    groups = torch.tensor([0, 0, 0, 1])
    g = hflip(1)
    loss = equivariance_loss([q], [masks], emb, g, DotProductDecoder(), dice_loss, query_groups=[groups])
    per_query = [equivariance_loss([q[i : i + 1]], [masks[i : i + 1]], emb, g, DotProductDecoder(), dice_loss)
                 for i in range(4)]  # fmt: skip
    expected = (sum(per_query[:3]) / 3 + per_query[3]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("stopgrad", ["features", "queries"])
def test_equi_stopgrad_cuts_one_branch(stopgrad):
    torch.manual_seed(0)
    emb = torch.randn(1, 4, 6, 6, requires_grad=True)
    q = torch.randn(2, 4, requires_grad=True)
    masks = torch.zeros(2, 24, 24, dtype=torch.bool)
    masks[0, :12], masks[1, 12:] = True, True
    full = equivariance_loss([q], [masks], emb, hflip(1), DotProductDecoder(), dice_loss)
    cut = equivariance_loss([q], [masks], emb, hflip(1), DotProductDecoder(), dice_loss, stopgrad=stopgrad)
    assert cut.item() == full.item()
    g_emb, g_q = torch.autograd.grad(cut, [emb, q])
    f_emb, f_q = torch.autograd.grad(full, [emb, q])
    assert torch.count_nonzero(g_emb if stopgrad == "features" else g_q) == 0
    assert torch.equal(g_q, f_q) if stopgrad == "features" else torch.equal(g_emb, f_emb)


def test_gradient_shares_at_parameter_groups_are_the_norms_of_the_joint_gradient():
    model = tiny_condinst()
    groups = shared_parameter_groups(model)
    assert set(groups) == {"param_backbone", "param_pyramid", "param_head", "param_mask_branch"}
    x = torch.rand(1, 3, 64, 64)
    heads = model._heads(x, None)
    parts = {"a": heads["cls"].square().mean(), "b": heads["mask_feats"].mean()}
    shares = gradient_shares(parts, {"head": groups["param_head"], "mb": groups["param_mask_branch"]})
    grads = torch.autograd.grad(parts["a"], groups["param_head"], retain_graph=True, allow_unused=True)
    norm = torch.cat([g.flatten() for g in grads if g is not None]).norm()
    assert shares["grad_norm/head/a"].item() == pytest.approx(norm.item(), rel=1e-5)
    assert shares["grad_norm/mb/a"].item() == 0  # the class loss does not reach the mask branch
    assert shares["grad_share/mb/b"].item() == pytest.approx(1.0)
