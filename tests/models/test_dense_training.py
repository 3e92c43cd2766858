"""CondInst and SOLOv2 train: loss falls, empty images train, IUQ reaches the dynamic parameters,
and an exported model predicts what the trained one does."""

import pytest
import torch

from iuq.config import load_config
from iuq.core.criterion import IUQCriterion
from iuq.core.views import boxes_from_masks
from iuq.engine.inference import load_trained, save_model_dir
from iuq.engine.step import training_step
from iuq.models.build import build_model
from iuq.models.paste import paste_masks

HEADS = {
    "condinst": ["model.condinst.fpn_channels=32", "model.condinst.head_convs=1",
                 "model.condinst.mask_branch_channels=32", "model.condinst.mask_branch_convs=1",
                 "model.condinst.sizes_of_interest=[16,32,64,128,256]"],
    "solov2": ["model.solov2.fpn_channels=32", "model.solov2.head_channels=32", "model.solov2.head_convs=1",
               "model.solov2.kernel_channels=32", "model.solov2.mask_feature_channels=32",
               "model.solov2.grids=[12,10,8,6,4]",
               "model.solov2.scale_ranges=[[1,24],[12,48],[24,96],[48,192],[96,512]]"],
    "sotr": ["model.sotr.fpn_channels=32", "model.sotr.depth=1", "model.sotr.heads=2",
             "model.sotr.kernel_channels=32", "model.sotr.mask_feature_channels=32", "model.sotr.grids=[12,10,8,6,4]",
             "model.sotr.scale_ranges=[[1,24],[12,48],[24,96],[48,192],[96,512]]"],
    "queryinst": ["model.queryinst.fpn_channels=32", "model.queryinst.proposals=8", "model.queryinst.stages=2",
                  "model.queryinst.heads=2", "model.queryinst.dynamic_channels=8", "model.queryinst.ffn_dim=32",
                  "model.queryinst.reg_fcs=1", "model.queryinst.mask_convs=1", "model.queryinst.mask_channels=16",
                  "iuq.roi_memory_capacity=50"],
}  # fmt: skip
DENSE = sorted(k for k in HEADS if k != "queryinst")  # QueryInst's masks come from RoIs: tests/models/test_queryinst.py
DYNAMIC = {
    "condinst": lambda m: m.head.controller.weight,
    "solov2": lambda m: m.kernel_out.weight,
    "sotr": lambda m: m.kernel_out.weight,
}


def tiny(kind: str, *extra: str):
    cfg = load_config(None, [f"model.type={kind}", "model.backbone=resnet", "model.backbone_widths=[8,16,16,16]",
                             "model.num_labels=2", "iuq.memory_capacity=500", "iuq.samples_per_instance=8",
                             *HEADS[kind], *extra])  # fmt: skip
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def batch(empty: bool = False):
    """Two 64 px images: one square (class 0) and one bar (class 1) each, or nothing."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.2
    targets = []
    for i in range(2):
        masks = torch.zeros(2, 64, 64, dtype=torch.bool)
        masks[0, 8 + 4 * i : 32 + 4 * i, 6:30] = True
        masks[1, 36:58, 34 - 3 * i : 60 - 3 * i] = True
        if empty:
            masks = masks[:0]
        for m, colour in zip(masks, ([0.9, 0.2, 0.1], [0.1, 0.3, 0.9]), strict=False):
            images[i][:, m] = torch.tensor(colour)[:, None]
        targets.append({"masks": masks, "labels": torch.tensor([0, 1])[: len(masks)], "boxes": boxes_from_masks(masks),
                        "image_id": i})  # fmt: skip
    return images, torch.ones(2, 64, 64, dtype=torch.bool), targets


@pytest.mark.parametrize("kind", DENSE)
def test_loss_decreases_over_30_steps(kind):
    cfg, model = tiny(kind)
    images, pixel_mask, targets = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        out = model(images, pixel_mask, targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    mask_terms = [k for k in out.loss_terms if "mask" in k]
    assert mask_terms and all(torch.isfinite(out.loss_terms[k]) for k in out.loss_terms)


@pytest.mark.parametrize("kind", DENSE)
def test_a_batch_of_empty_images_trains(kind):
    cfg, model = tiny(kind)
    images, pixel_mask, targets = batch(empty=True)
    out = model(images, pixel_mask, targets)
    assert torch.isfinite(out.loss) and out.loss > 0  # the classification term: everything is background
    assert out.loss_terms["loss_mask"] == 0 and all(q.shape[0] == 0 for q in out.queries)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # IUQ on an empty batch: every term is a finite zero.
    cfg, model = tiny(kind)
    criterion = IUQCriterion(cfg.iuq, model.decoder, model.pixel_dim, model.mask_loss, model.mask_loss_weight)
    result = training_step(model, criterion, images, pixel_mask, targets, torch.tensor([0, 1]),
                           torch.Generator().manual_seed(0))  # fmt: skip
    assert result.terms["loss_inter"] == 0 and result.terms["loss_equi"] == 0
    result.loss.backward()


@pytest.mark.parametrize("kind", DENSE)
def test_one_iuq_step_reaches_the_dynamic_parameters(kind):
    cfg, model = tiny(kind)
    criterion = IUQCriterion(cfg.iuq, model.decoder, model.pixel_dim, model.mask_loss, model.mask_loss_weight)
    images, pixel_mask, targets = batch()
    for step in range(2):  # the second step contrasts with the memory the first filled
        result = training_step(model, criterion, images, pixel_mask, targets, torch.tensor([10 + step, 20 + step]),
                               torch.Generator().manual_seed(step), diagnose=step == 1)  # fmt: skip
        criterion.update_memory(result.samples)
    assert len(criterion.memory) > 0
    terms = result.terms
    assert {"loss_inter", "loss_equi"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["loss_inter"] > 0 and terms["loss_equi"] > 0
    dynamic = DYNAMIC[kind](model)
    for name in ("loss_inter", "loss_equi"):
        (grad,) = torch.autograd.grad(terms[name], [dynamic], retain_graph=True)
        assert grad.abs().sum() > 0, name
    # Gradient shares at the pixel embeddings and at the queries (the dynamic parameters) sum to 1.
    for point in ("pixel", "query"):
        shares = [result.diagnostics[f"grad_share/{point}/{part}"] for part in ("base", "inter", "equi")]
        assert float(sum(shares)) == pytest.approx(1.0, abs=1e-5)
    assert all(result.diagnostics[f"grad_share/query/{part}"] > 0 for part in ("base", "inter", "equi"))
    # L_inter's negatives are constants (no iuq.inter_batch_grad): it sends nothing to the pixels.
    assert result.diagnostics["grad_share/pixel/inter"] == 0


@pytest.mark.parametrize("kind", DENSE)
def test_export_and_reload_predict_the_same(kind, tmp_path):
    keep_all = {  # a barely trained model: keep every candidate, so that there is something to compare
        "condinst": ["model.condinst.score_threshold=0.0"],
        "solov2": ["model.solov2.score_threshold=0.0", "model.solov2.update_threshold=0.0",
                   "model.solov2.mask_threshold=0.01"],
        "sotr": ["model.sotr.score_threshold=0.0", "model.sotr.update_threshold=0.0", "model.sotr.mask_threshold=0.01"],
    }  # fmt: skip
    cfg, model = tiny(kind, *keep_all[kind])
    images, pixel_mask, targets = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        out = model(images, pixel_mask, targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    sizes, orig = [(64, 64)] * 2, [(48, 50)] * 2
    before = model.predict_instances(images, pixel_mask, sizes, orig, top_k=10)
    save_model_dir(model, tmp_path / "model", [3, 7], ["square", "bar"], 64, 64)
    loaded = load_trained(tmp_path / "model")
    assert loaded.label_to_category == [3, 7] and loaded.class_names == ["square", "bar"]
    assert type(loaded.model) is type(model) and not loaded.model.training
    after = loaded.model.predict_instances(images, pixel_mask, sizes, orig, top_k=10)
    for a, b in zip(before, after, strict=True):
        assert paste_masks(a).shape[1:] == (48, 50)
        assert len(a["scores"]) > 0
        torch.testing.assert_close(a["scores"], b["scores"])
        assert torch.equal(paste_masks(a), paste_masks(b)) and torch.equal(a["labels"], b["labels"])
