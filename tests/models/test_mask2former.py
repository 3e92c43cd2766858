import pytest
import torch

from iuq.models.config import ModelConfig
from iuq.models.mask2former import Mask2FormerAdapter, build_mask2former
from tests.conftest import plain_transformers_max_diff


def _tiny(backbone="resnet", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=backbone, num_labels=4, num_queries=12, train_num_points=256)
    return Mask2FormerAdapter(build_mask2former(cfg))


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g)
    targets = []
    for k in (3, 2):
        masks = torch.zeros(k, 64, 64, dtype=torch.bool)
        for i in range(k):
            masks[i, 8 * i : 8 * i + 20, 10 * i : 10 * i + 24] = True
        targets.append({"masks": masks, "labels": torch.arange(k) % 4})
    return images, targets


def test_query_embeddings_reproduce_the_models_mask_logits_exactly():
    model = _tiny()
    images, targets = _batch()
    out = model(images, targets=targets)
    assert out.pixel_embeddings.shape == (2, 64, 16, 16) and out.stride == 4
    assert out.head["query_embeddings"].shape == (2, 12, 64)
    recomputed = torch.einsum("bqd,bdhw->bqhw", out.head["query_embeddings"], out.pixel_embeddings)
    assert torch.equal(recomputed, out.head["mask_logits"])


def test_captured_matching_is_the_one_the_loss_used():
    model = _tiny()
    images, targets = _batch()
    out = model(images, targets=targets)
    assert [len(s) for s, _ in out.head["indices"]] == [3, 2]
    assert all(sorted(t.tolist()) == list(range(len(t))) for _, t in out.head["indices"])
    # The classification term depends only on sigma: recomputing it with the captured indices must
    # give the model's own value.
    labels = [t["labels"] for t in targets]
    ce = model.model.criterion.loss_labels(out.head["class_logits"], labels, out.head["indices"])
    torch.testing.assert_close(ce["loss_cross_entropy"], out.loss_terms["loss_cross_entropy"])
    # The captured terms are unweighted: the model's total is their sum under its weight_dict.
    weights = model.model.weight_dict
    total = sum(v * next(w for k, w in weights.items() if k in name) for name, v in out.loss_terms.items())
    torch.testing.assert_close(total, out.loss)
    assert {"loss_mask", "loss_dice", "loss_cross_entropy", "loss_mask_0"} <= set(out.loss_terms)


def test_matched_queries_and_masks():
    model = _tiny()
    images, targets = _batch()
    out = model(images, targets=targets)
    queries, masks, labels = model.matched(out, targets)
    assert [q.shape for q in queries] == [(3, 64), (2, 64)]
    src, tgt = out.head["indices"][1]
    assert torch.equal(queries[1], out.head["query_embeddings"][1, src])
    assert torch.equal(masks[1], targets[1]["masks"][tgt])
    assert torch.equal(labels[1], targets[1]["labels"][tgt])


def test_each_view_is_weighted_like_a_batch_of_its_own():
    """Two views of B images: the loss is the sum of each view's loss computed alone, so adding a
    view never dilutes the first (one HF loss over both would halve each view's weight)."""
    model = _tiny().eval()  # BatchNorm on running statistics: the forward does not depend on the batch
    images, targets = _batch()
    flipped = images.flip(-1)
    targets_f = [{**t, "masks": t["masks"].flip(-1)} for t in targets]
    torch.manual_seed(0)  # the loss samples points at random: replay the same draws in both ways
    both = model(torch.cat([images, flipped]), targets=targets + targets_f, views=2)
    torch.manual_seed(0)
    alone = [model(images, targets=targets), model(flipped, targets=targets_f)]
    torch.testing.assert_close(both.loss, alone[0].loss + alone[1].loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both.view_losses[1], alone[1].loss, rtol=1e-5, atol=1e-5)
    assert both.loss_terms.keys() == alone[0].loss_terms.keys()
    torch.testing.assert_close(both.loss_terms["loss_dice"], alone[0].loss_terms["loss_dice"], rtol=1e-5, atol=1e-5)
    # Without the second view's loss, it is still matched (L_equi needs its sigma).
    torch.manual_seed(0)
    first_only = model(torch.cat([images, flipped]), targets=targets + targets_f, views=2, view_loss=(True, False))
    torch.testing.assert_close(first_only.loss, alone[0].loss, rtol=1e-5, atol=1e-5)
    assert first_only.view_losses[1] is None and [len(s) for s, _ in first_only.head["indices"]] == [3, 2, 3, 2]


def test_swin_backbone_builds_and_runs():
    model = _tiny("swin")
    images, targets = _batch()
    out = model(images, targets=targets)
    assert torch.isfinite(out.loss) and out.head["mask_logits"].shape == (2, 12, 16, 16)


def test_save_pretrained_loads_in_plain_transformers_with_identical_outputs(tmp_path):
    model = _tiny().eval()
    model.model.save_pretrained(tmp_path / "model")
    assert plain_transformers_max_diff(tmp_path / "model", model.model, tmp_path) == 0.0


def test_instance_predictions_on_a_constructed_output():
    from iuq.models.interface import SegmenterOutput
    from iuq.models.mask2former import instance_predictions
    from iuq.models.paste import paste_masks

    # One image, valid 32x24 of a 32x32 padded canvas, stride 4 -> 8x8 logits; 2 queries, 3 classes.
    mask_logits = torch.full((1, 2, 8, 8), -200.0)
    mask_logits[0, 0, 0:4, 0:3] = (
        200.0  # sharp: bilinear edges stay saturated  # query 0: top-left block, 16 x 12 input pixels
    )
    class_logits = torch.tensor([[[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]]])  # query 1 is "no object"
    head = {"mask_logits": mask_logits, "class_logits": class_logits}
    out = SegmenterOutput(None, {}, None, torch.zeros(1, 1, 8, 8), 4, head=head)
    (pred,) = instance_predictions(out, sizes=[(32, 24)], orig_sizes=[(64, 48)], top_k=2)
    p0 = torch.tensor([5.0, 0, 0, 0]).softmax(0)[0]
    assert pred["labels"].tolist()[0] == 0
    assert pred["scores"][0].item() == pytest.approx(p0.item(), rel=1e-4)  # mask prob ~1 inside its mask
    masks = paste_masks(pred)
    assert masks.shape == (2, 64, 48) and pred["mask_logits"].shape == (2, 8, 8)
    # The block covers input rows 0-16 and columns 0-12, i.e. 0-32 x 0-24 at the original size; the
    # two bilinear resizes move the edge by at most a few pixels.
    m = masks[0]
    assert m[:28, :20].all() and not m[34:].any() and not m[:, 26:].any()


def test_pretrained_checkpoint_is_loaded_with_a_new_class_layer(tmp_path):
    """model.pretrained: every weight comes from the checkpoint except the re-sized class layer."""
    source = _tiny()  # 4 labels
    source.model.save_pretrained(tmp_path / "m2f")
    cfg = ModelConfig(pretrained=str(tmp_path / "m2f"), num_labels=7)
    loaded = build_mask2former(cfg)
    assert loaded.config.num_labels == 7 and loaded.class_predictor.out_features == 8
    a, b = source.model.state_dict(), loaded.state_dict()
    for key, value in a.items():
        if not key.startswith("class_predictor") and "empty_weight" not in key:
            assert torch.equal(value, b[key]), key
