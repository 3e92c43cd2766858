"""CondInst and SOLOv2 as their originals: squared dice (AdelaiDet / SOLO), L_equi on the base loss's
grid, CondInst's inference (centerness in the threshold, masks at stride 4) and frozen stages."""

import pytest
import torch
import torch.nn.functional as F

from iuq.config import load_config
from iuq.core.decoders import DotProductDecoder
from iuq.core.equivariance import equivariance_loss
from iuq.core.sampling import downsample_masks
from iuq.core.transforms import BatchTransform
from iuq.models.build import build_model
from iuq.models.condinst import CondInstConfig, candidates
from tests.models.test_condinst import tiny_condinst


def squared_dice(p, t, eps):
    """The originals' per-mask formula on probabilities [Q, P]: 1 - 2 sum(pt) / (sum(p^2) + sum(t^2) + eps)."""
    return 1 - 2 * (p * t).sum(1) / ((p * p).sum(1) + (t * t).sum(1) + eps)


def tiny_solov2():
    cfg = load_config(None, ["model.type=solov2", "model.backbone=resnet", "model.backbone_widths=[8,16,16,16]",
                             "model.num_labels=2", "model.solov2.fpn_channels=32", "model.solov2.head_channels=32",
                             "model.solov2.head_convs=1", "model.solov2.mask_feature_channels=32",
                             "model.solov2.kernel_channels=32"])  # fmt: skip
    return build_model(cfg.model)


@pytest.mark.parametrize(("build", "weight", "eps"), [(tiny_condinst, 1.0, 1e-5), (tiny_solov2, 3.0, 0.002)])
def test_mask_loss_is_the_originals_squared_dice(build, weight, eps):
    model = build()
    logits = torch.tensor([[2.0, -1.0, 0.0, 3.0], [0.5, 0.5, -2.0, -2.0]])
    targets = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    p = logits.sigmoid()
    expected = weight * squared_dice(p, targets.float(), eps).sum() / 2
    assert model.mask_loss(logits, targets, 2.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_squared_dice_ignores_empty_targets_and_linear_plus1_does_not():
    from iuq.core.losses import dice_loss

    logits = torch.tensor([[1.0, -0.5, 2.0]], requires_grad=True)
    empty = torch.zeros(1, 3, dtype=torch.bool)
    squared = dice_loss(logits, empty, form="squared", eps=1e-5)
    assert squared.item() == 1.0
    (grad,) = torch.autograd.grad(squared, logits)
    assert torch.count_nonzero(grad) == 0
    linear = dice_loss(logits, empty)  # 1 - 1 / (sum p + 1)
    assert linear.item() == pytest.approx(1 - 1 / (logits.sigmoid().sum().item() + 1))
    (grad,) = torch.autograd.grad(linear, logits)
    assert (grad > 0).all()  # every pixel of an empty target is pushed toward 0
    with pytest.raises(ValueError, match="dice form"):
        dice_loss(logits, empty, form="cubic")


def test_equi_upsample_decodes_like_the_base_loss():
    """With upsample 2, L_equi = mask_loss(bilinear x2 of the decoded logits, majority-vote targets at
    twice the embedding grid): the rule of CondInst's base mask loss."""
    torch.manual_seed(0)
    emb = torch.randn(1, 3, 4, 5)
    q = torch.randn(2, 3)
    masks = torch.zeros(2, 32, 40, dtype=torch.bool)
    masks[0, 4:20, 8:30] = True
    masks[1, 18:31, 2:9] = True
    identity = BatchTransform(torch.ones(1, 2), torch.zeros(1, 2))
    loss = equivariance_loss([q], [masks], emb, identity, DotProductDecoder(), tiny_condinst().mask_loss, upsample=2)
    logits = torch.einsum("qd,dhw->qhw", q, emb[0])
    logits = F.interpolate(logits[None], size=(8, 10), mode="bilinear", align_corners=False)[0]
    targets = downsample_masks(masks, (8, 10))
    expected = squared_dice(logits.sigmoid().flatten(1), targets.flatten(1).float(), 1e-5).sum() / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_candidates_threshold_on_class_times_centerness():
    probs = torch.tensor([[0.10, 0.02], [0.30, 0.90], [0.06, 0.00]])  # [L=3, C=2]
    ctr = torch.tensor([0.3, 0.5, 1.0])
    cfg = CondInstConfig(score_threshold=0.05)
    loc, cls, score = candidates(probs, ctr, cfg)
    # products: 0.03, 0.006 | 0.15, 0.45 | 0.06, 0: only (1, 0), (1, 1), (2, 0) pass
    assert sorted(zip(loc.tolist(), cls.tolist(), strict=True)) == [(1, 0), (1, 1), (2, 0)]
    assert sorted(score.tolist()) == pytest.approx(sorted([0.15**0.5, 0.45**0.5, 0.06**0.5]))
    loc, cls, _ = candidates(probs, ctr, CondInstConfig(score_threshold=0.05, thresh_with_ctr=False))
    assert sorted(zip(loc.tolist(), cls.tolist(), strict=True)) == [(0, 0), (1, 0), (1, 1), (2, 0)]
    loc, cls, score = candidates(probs, ctr, CondInstConfig(score_threshold=0.05, pre_nms_topk=1))
    assert (loc.tolist(), cls.tolist()) == ([1], [1]) and score.item() == pytest.approx(0.45**0.5)


@pytest.mark.parametrize("threshold", [0.0, 1.0])  # every location a candidate / none at all
def test_condinst_predicts_masks_at_stride_4_as_it_trains(threshold):
    model = tiny_condinst().eval()
    model.cfg.score_threshold = threshold
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        heads = model._heads(images, None)
        pred = model.predict_instances(images, None, [(64, 96)], [(64, 96)], top_k=3)[0]
    assert heads["mask_feats"].shape[-2:] == (8, 12)
    assert pred["stride"] == 4
    assert pred["mask_logits"].shape == (3 if threshold == 0 else 0, 16, 24)
    if threshold == 0:  # the decode at stride 8, upsampled x2 as in the loss
        assert pred["mask_logits"].abs().sum() > 0


@pytest.mark.parametrize(
    ("sets", "frozen"),
    [
        (["model.backbone=efficientnet_lite0"], 1),  # pretrained: stem + first stage by default
        (["model.backbone=efficientnet_lite0", "model.freeze_stages=0"], 0),
        (["model.backbone=resnet", "model.backbone_weights=none"], 0),  # random init: nothing frozen
        (["model.backbone=resnet50", "model.backbone_weights=none", "model.freeze_stages=2"], 2),
    ],
)
def test_freeze_stages(sets, frozen):
    cfg = load_config(None, ["model.type=condinst", "model.num_labels=2", *sets])
    assert cfg.model.frozen_stages() == frozen
    model = build_model(cfg.model, load_weights=False)
    names = [n for n, p in model.backbone.body.named_parameters() if not p.requires_grad]
    if frozen == 0:
        assert names == []
        return
    prefix = {"efficientnet_lite0": ("conv_stem", "bn1", "blocks.0.", "blocks.1."),
              "resnet50": ("conv1", "bn1", "layer1.", "layer2.")}[cfg.model.backbone]  # fmt: skip
    trainable = [n for n, p in model.backbone.body.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(prefix) for n in names)
    assert trainable and not any(n.startswith(prefix) for n in trainable)
    # BatchNorm statistics of the frozen stages stay put in training mode
    model.train()
    before = {k: v.clone() for k, v in model.backbone.body.state_dict().items() if "running_mean" in k}
    model.backbone(torch.rand(2, 3, 64, 64))
    after = model.backbone.body.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and not any(k.startswith(prefix) for k in moved)


def test_freeze_stages_is_refused_for_mask2former():
    with pytest.raises(ValueError, match="model.freeze_stages: Mask2Former"):
        load_config(None, ["model.freeze_stages=1"])
