"""QueryInst: the box coder, the matching cost and assignment, the heads' shapes, RoI mask pasting,
training, and its L_equi against a plain-autograd reference on g(f(I))."""

import math

import pytest
import torch
from torchvision.ops import roi_align

from iuq.config import load_config
from iuq.core.roi import roi_mask_targets
from iuq.core.roi_criterion import RoIIUQCriterion
from iuq.core.transforms import hflip
from iuq.engine.step import build_criterion, training_step
from iuq.models.build import build_model
from iuq.models.paste import paste_masks, roi_masks_to_image
from iuq.models.queryinst_parts import (
    DIIHead,
    DynamicConv,
    DynamicMaskHead,
    QueryInstConfig,
    decode_boxes,
    hungarian_match,
    match_cost,
)
from tests.models.test_dense_training import HEADS, batch


def tiny(*extra):
    cfg = load_config(None, ["model.type=queryinst", "model.backbone=resnet", "model.backbone_widths=[8,16,16,16]",
                             "model.num_labels=2", *HEADS["queryinst"], *extra])  # fmt: skip
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def test_box_deltas_decode_as_mmdetection():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # centre (20, 40), size (20, 40)
    assert torch.equal(decode_boxes(boxes, torch.zeros(1, 4)), boxes)
    # dx = 1 moves the centre by 0.5 widths (std 0.5); dw = log 2 doubles the width (std 1).
    out = decode_boxes(boxes, torch.tensor([[1.0, 0.0, math.log(2.0), 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[10.0, 20.0, 50.0, 60.0]]))
    huge = decode_boxes(boxes, torch.tensor([[0.0, 0.0, 100.0, 0.0]]))  # clamped at log(1000 / 16)
    torch.testing.assert_close(huge[0, 2] - huge[0, 0], torch.tensor(20.0 * 1000 / 16))


def test_match_cost_by_hand():
    cfg = QueryInstConfig()
    box, gt, whwh = (
        torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
        torch.tensor([[0.0, 0.0, 10.0, 20.0]]),
        torch.full((4,), 100.0),
    )
    cost = match_cost(torch.zeros(1, 3), box, torch.tensor([1]), gt, whwh, cfg)
    # p = 0.5: focal pos 0.25 * 0.25 * log 2, neg 0.75 * 0.25 * log 2; L1 0.1; IoU = GIoU = 0.5.
    by_hand = 2 * (0.0625 - 0.1875) * math.log(2) + 5 * 0.1 - 2 * 0.5
    assert float(cost[0, 0]) == pytest.approx(by_hand, abs=1e-6)


def test_hungarian_assignment_on_a_hand_worked_case():
    cfg = QueryInstConfig()
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 60.0, 60.0]])
    boxes = torch.tensor([[41.0, 40.0, 60.0, 61.0], [0.0, 0.0, 30.0, 30.0], [1.0, 0.0, 20.0, 20.0]])
    logits = torch.full((3, 2), -2.0)
    whwh = torch.tensor([64.0, 64.0, 64.0, 64.0])
    rows, cols = hungarian_match(logits, boxes, torch.tensor([0, 1]), gt, whwh, cfg)
    # Proposal 2 fits instance 0 better than proposal 1; proposal 0 fits instance 1.
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 2: 0}
    # A confident class can outweigh a slightly worse box: proposal 1 sure of class 0.
    logits[1, 0] = 8.0
    cost = match_cost(logits, boxes, torch.tensor([0, 1]), gt, whwh, cfg)
    assert cost[1, 0] < cost[2, 0]
    rows, cols = hungarian_match(logits, boxes, torch.tensor([0, 1]), gt, whwh, cfg)
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 1: 0}
    empty = hungarian_match(logits, boxes, torch.zeros(0, dtype=torch.long), gt[:0], whwh, cfg)
    assert [e.numel() for e in empty] == [0, 0]


def test_head_shapes():
    cfg = QueryInstConfig(fpn_channels=32, heads=4, dynamic_channels=8, ffn_dim=64, mask_channels=16, mask_convs=2)
    assert DynamicConv(32, 8, 7, project=True)(torch.randn(5, 32), torch.randn(5, 32, 7, 7)).shape == (5, 32)
    assert DynamicConv(32, 8, 14, project=False)(torch.randn(5, 32), torch.randn(5, 32, 14, 14)).shape == (5, 196, 32)
    logits, deltas, feats, attn = DIIHead(cfg, 3)(torch.randn(2, 6, 32), torch.randn(12, 32, 7, 7))
    assert logits.shape == (2, 6, 3) and deltas.shape == (2, 6, 4) and feats.shape == attn.shape == (2, 6, 32)
    assert DynamicMaskHead(cfg, 3)(torch.randn(4, 32), torch.randn(4, 32, 14, 14)).shape == (4, 3, 28, 28)


def test_roi_masks_paste_into_their_boxes():
    logits = torch.full((1, 28, 28), 10.0)
    box = torch.tensor([[16.0, 8.0, 48.0, 40.0]])
    pasted = roi_masks_to_image(logits, box, (64, 64), (64, 64))[0] > 0
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[8:40, 16:48] = True
    assert torch.equal(pasted, expected)
    half = roi_masks_to_image(logits, box, (64, 64), (32, 32))[0] > 0  # the original image at half size
    assert torch.equal(half, expected[::2, ::2])
    # Only the valid region maps to the original image: a 64 x 32 image padded to 64 x 64.
    wide = roi_masks_to_image(logits, box, (64, 32), (64, 32))[0] > 0
    assert torch.equal(wide, expected[:, :32])


def test_loss_decreases_and_predictions_find_the_objects():
    cfg, model = tiny()
    images, pixel_mask, targets = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        out = model(images, pixel_mask, targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
    model.eval()
    preds = model.predict_instances(images, pixel_mask, [(64, 64)] * 2, [(64, 64)] * 2, top_k=16)
    for pred, t in zip(preds, targets, strict=True):
        assert pred["mask_boxes"].shape == (16, 4) and torch.all(pred["scores"][:-1] >= pred["scores"][1:])
        masks = paste_masks(pred)
        for label in (0, 1):  # the best mask of each class overlaps its instance
            best = masks[pred["labels"] == label][0]
            truth = t["masks"][t["labels"] == label][0]
            assert (best & truth).sum() / (best | truth).sum() > 0.5


def test_an_empty_batch_trains():
    cfg, model = tiny()
    images, pixel_mask, targets = batch(empty=True)
    criterion = RoIIUQCriterion(cfg.iuq, model.decoder, model.pixel_dim, model.roi_size, model.mask_loss,
                                model.mask_loss_weight)  # fmt: skip
    result = training_step(model, criterion, images, pixel_mask, targets, torch.tensor([0, 1]),
                           torch.Generator().manual_seed(0))  # fmt: skip
    assert result.terms["loss_inter"] == 0 and result.terms["loss_equi"] == 0 and result.terms["loss_mask"] == 0
    result.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_equivariance_equals_plain_autograd_on_the_flipped_pyramid():
    """L_equi pools f(I) at g^-1(b^g), mirrored; the reference pools g(f(I)) (the flipped levels) at
    b^g and decodes with the same head: same value, same gradients at the queries and the levels."""
    cfg, model = tiny()
    criterion = RoIIUQCriterion(cfg.iuq.__class__(**{**cfg.iuq.to_dict(), "inter": False}), model.decoder,
                                model.pixel_dim, model.roi_size, model.mask_loss, model.mask_loss_weight)  # fmt: skip
    torch.manual_seed(3)
    c, s = model.pixel_dim, model.roi_size
    levels = [torch.randn(4, c, 64 // st, 64 // st, requires_grad=True) for st in model.strides]  # V=2, B=2
    queries = [torch.randn(k, c, requires_grad=True) for k in (2, 1, 2, 1)]
    labels = [torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([1, 0]), torch.tensor([0])]
    boxes_g = [None, None, torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 62.0, 60.0]]),
               torch.tensor([[10.0, 12.0, 50.0, 44.0]])]  # fmt: skip
    masks = [torch.zeros(k, 64, 64, dtype=torch.bool) for k in (2, 1, 2, 1)]
    masks[2][0, 10:30, 8:24] = True
    masks[2][1, 35:55, 36:60] = True
    masks[3][0, 20:40, 15:45] = True
    g = hflip(2)
    model.train()
    terms, _ = criterion(levels, list(model.strides), queries, labels, boxes_g, masks, [torch.zeros(0, 4)] * 2,
                         [torch.zeros(0, dtype=torch.long)] * 2, torch.tensor([0, 1]), g=g, num_masks=3.0)  # fmt: skip
    value = terms["loss_equi"]
    flipped = [g.apply(lv[:2]) for lv in levels]
    rois = torch.cat([torch.tensor([[0.0]] * 2 + [[1.0]]), torch.cat(boxes_g[2:])], 1)
    feats = roi_align(flipped[0], rois, s, 0.25, sampling_ratio=2, aligned=True)  # every box here reads P2
    logits = model.decoder(torch.cat(queries[2:]), feats, torch.cat(labels[2:]))  # BatchNorm as in training
    target = roi_mask_targets(torch.cat(masks[2:]), torch.cat(boxes_g[2:]), model.decoder.mask_size)
    reference = model.mask_loss(logits, target, 3.0)
    torch.testing.assert_close(value, reference, atol=1e-5, rtol=1e-5)
    points = [*queries[2:], levels[0]]
    for a, b in zip(torch.autograd.grad(value, points), torch.autograd.grad(reference, points), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert value > 0


def test_one_iuq_step_trains_the_mask_head_through_both_terms():
    cfg, model = tiny()
    criterion = RoIIUQCriterion(cfg.iuq, model.decoder, model.pixel_dim, model.roi_size, model.mask_loss,
                                model.mask_loss_weight)  # fmt: skip
    images, pixel_mask, targets = batch()
    for step in range(2):  # the second step contrasts with the RoIs the first enqueued
        result = training_step(model, criterion, images, pixel_mask, targets, torch.tensor([10 + step, 20 + step]),
                               torch.Generator().manual_seed(step), cfg=cfg.iuq)  # fmt: skip
        criterion.update_memory(result.samples)
    assert len(criterion.memory) == 8 and criterion.memory.dim == model.pixel_dim * model.roi_size**2
    head = model.stages[-1].mask_head
    for name in ("loss_inter", "loss_equi"):
        assert result.terms[name] > 0
        grads = torch.autograd.grad(result.terms[name], [head.interact.generate.weight, head.logits.weight],
                                    retain_graph=True)  # fmt: skip
        assert all(g.abs().sum() > 0 for g in grads), name


def test_pixel_readings_are_refused_and_augmentation_keeps_the_views_without_a_term():
    cfg, model = tiny()
    for key, value in (("inter_center", True), ("query_reduction", "instance"), ("equi_variant", "feature")):
        bad = cfg.iuq.__class__(**{**cfg.iuq.to_dict(), key: value})
        with pytest.raises(ValueError, match=rf"iuq\.{key}: a reading of the pixel decoders"):
            build_criterion(bad, model)
    aug = build_criterion(cfg.iuq.__class__(**{**cfg.iuq.to_dict(), "inter": False, "equi_variant": "augmentation"}),
                          model)  # fmt: skip
    images, pixel_mask, targets = batch()
    result = training_step(model, aug, images, pixel_mask, targets, torch.tensor([0, 1]),
                           torch.Generator().manual_seed(0))  # fmt: skip
    assert result.terms["loss_equi"] == 0 and result.terms["loss_equi"].requires_grad
    assert result.g is not None  # the g-views are there


def test_every_stage_trains_its_own_heads():
    """The base loss of stage s decodes with stage s's mask head (each head gets its gradient)."""
    cfg, model = tiny()
    images, pixel_mask, targets = batch()
    model(images, pixel_mask, targets).loss.backward()
    for stage in model.stages:
        for layer in (
            stage.mask_head.logits.weight,
            stage.mask_head.interact.generate.weight,
            stage.box_head.cls_out.weight,
        ):
            assert layer.grad is not None and layer.grad.abs().sum() > 0


def test_all_stages_reading_decodes_each_query_with_its_stage_head():
    cfg, model = tiny("iuq.roi_stages=all")
    criterion = build_criterion(cfg.iuq, model)
    images, pixel_mask, targets = batch()
    out = model(images, pixel_mask, targets)
    queries, instances, boxes, stages = model.roi_queries(out, all_stages=True)
    n_stages = len(model.stages)
    assert [q.shape[0] for q in queries] == [n_stages * q.shape[0] for q in out.queries]
    assert stages[0].tolist() == [s for s in range(n_stages) for _ in range(out.queries[0].shape[0])]
    torch.testing.assert_close(queries[0][-out.queries[0].shape[0] :], out.queries[0])  # the last stage's block
    # The staged decoder equals each stage's own head.
    feats = torch.randn(queries[0].shape[0], model.pixel_dim, model.roi_size, model.roi_size)
    labels = targets[0]["labels"][instances[0]]
    model.eval()
    staged = model.decoder(queries[0], feats, labels, stages=stages[0])
    for s in range(n_stages):
        at = stages[0] == s
        own = model.stages[s].mask_head(queries[0][at], feats[at])  # eval: running statistics
        torch.testing.assert_close(staged[at], own[torch.arange(int(at.sum())), labels[at]])
    model.train()
    result = training_step(model, criterion, images, pixel_mask, targets, torch.tensor([0, 1]),
                           torch.Generator().manual_seed(0), cfg=cfg.iuq)  # fmt: skip
    for name in ("loss_inter", "loss_equi"):
        grads = torch.autograd.grad(result.terms[name], [st.mask_head.logits.weight for st in model.stages],
                                    retain_graph=True)  # fmt: skip
        assert all(g.abs().sum() > 0 for g in grads), name


def test_roi_norm_holds_the_batch_statistics_the_base_loss_normalised_by():
    """Each stage's record equals what its BatchNorm folded into the running statistics:
    running' = 0.9 running + 0.1 mean, and 0.9 running + 0.1 var * n / (n - 1) (unbiased there)."""
    cfg, model = tiny()
    images, pixel_mask, targets = batch()
    before = [(st.mask_head.norms[0].running_mean.clone(), st.mask_head.norms[0].running_var.clone())
              for st in model.stages]  # fmt: skip
    out = model(images, pixel_mask, targets)
    assert sorted(out.head["roi_norm"]) == list(range(len(model.stages)))
    for s, stage in enumerate(model.stages):
        [(mean, var)] = out.head["roi_norm"][s]  # mask_convs=1: one layer
        assert mean.requires_grad and var.requires_grad  # L_inter's gradient reaches the base batch
        n = sum(len(t["labels"]) for t in targets) * model.roi_size**2  # matched RoIs x S x S values
        norm = stage.mask_head.norms[0]
        torch.testing.assert_close(norm.running_mean, 0.9 * before[s][0] + 0.1 * mean.detach())
        torch.testing.assert_close(norm.running_var, 0.9 * before[s][1] + 0.1 * var.detach() * n / (n - 1))


def test_inter_scene_is_blind_to_a_per_channel_shift_the_base_loss_cannot_see():
    """Adding a constant per channel to the mask head's conv output changes no base-loss value, so
    it must change no L_inter value or gradient either: L_inter decodes other images' RoIs under the
    base loss's batch statistics. Decoded under the running statistics (the earlier reading) it
    has a gradient along the shift: the shortcut of docs/evidence.md, section 12."""
    cfg, model = tiny("iuq.equi=false")
    criterion = build_criterion(cfg.iuq, model)
    images, pixel_mask, targets = batch()
    conv = model.stages[-1].mask_head.convs[0]
    delta = torch.zeros(conv.out_channels, requires_grad=True)
    conv.register_forward_hook(lambda module, inputs, output: output + delta[:, None, None])

    def inter_loss(shift: float, norm_of=None):
        with torch.no_grad():
            delta.fill_(shift)
        torch.manual_seed(0)
        out = model(images, pixel_mask, targets)
        queries, instances, boxes, _ = model.roi_queries(out)
        labels = [t["labels"][k] for t, k in zip(targets, instances, strict=True)]
        masks = [t["masks"][k] for t, k in zip(targets, instances, strict=True)]
        norm = out.head["roi_norm"] if norm_of is None else norm_of()
        terms, _ = criterion(out.head["levels"], list(model.strides), queries, labels, boxes, masks,
                             [t["boxes"] for t in targets], [t["labels"] for t in targets], torch.tensor([0, 1]),
                             roi_norm=norm)  # fmt: skip
        return out.loss, terms["loss_inter"]

    base0, inter0 = inter_loss(0.0)
    (grad,) = torch.autograd.grad(inter0, [delta], retain_graph=True)
    assert inter0 > 0
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-7, rtol=0)
    base1, inter1 = inter_loss(0.7)
    torch.testing.assert_close(base1, base0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inter1, inter0, atol=1e-5, rtol=1e-5)

    def running():
        return {s: [(n.running_mean, n.running_var) for n in st.mask_head.norms] for s, st in enumerate(model.stages)}

    _, old = inter_loss(0.0, running)
    (old_grad,) = torch.autograd.grad(old, [delta])
    assert old_grad.abs().max() > 1e-4  # what the test guards against is really there
