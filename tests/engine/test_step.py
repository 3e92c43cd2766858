import itertools

import pytest
import torch

from iuq.core.config import IUQConfig
from iuq.core.criterion import IUQCriterion
from iuq.data.coco import CocoInstances
from iuq.data.transforms import collate
from iuq.engine.step import training_step
from iuq.models.config import ModelConfig
from iuq.models.mask2former import Mask2FormerAdapter, build_mask2former


def _setup(synth_dir, cfg: IUQConfig | None, seed=0):
    torch.manual_seed(seed)
    ds = CocoInstances(synth_dir / "annotations" / "instances_train.json", synth_dir / "train")
    model = Mask2FormerAdapter(
        build_mask2former(
            ModelConfig(backbone="resnet", num_labels=len(ds.category_ids), num_queries=20, train_num_points=256)
        )
    )
    crit = None if cfg is None else IUQCriterion(cfg, model.decoder, 64, model.mask_loss)
    return ds, model, crit


def _batch(ds, indices):
    batch = collate([ds[i] for i in indices])
    ids = torch.tensor([t["image_id"] for t in batch["targets"]])
    return batch["images"], batch["pixel_mask"], batch["targets"], ids


SWITCHES = [
    dict(inter=i, equi=e, inter_mode=m, equi_variant=v)
    for i, e, m, v in itertools.product([True, False], [True, False], ["memory", "minibatch"], ["full", "augmentation"])
    if (e or v == "full") and (i or m == "memory")
] + [dict(inter_loss="l2", sampling="sparse"), dict(equi_variant="feature"), dict(sampling="dense", inter_loss="bce")]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_every_switch_combination_gives_finite_losses(synth_dir, switches):
    cfg = IUQConfig(memory_capacity=500, **switches)
    ds, model, crit = _setup(synth_dir, cfg)
    for step in range(2):  # the second step sees a non-empty memory
        images, mask, targets, ids = _batch(ds, [2 * step, 2 * step + 1])
        res = training_step(model, crit, images, mask, targets, ids, torch.Generator().manual_seed(step))
        assert torch.isfinite(res.loss)
        assert all(torch.isfinite(v) for v in res.terms.values())
        assert ("loss_inter" in res.terms) == cfg.inter and ("loss_equi" in res.terms) == cfg.equi
        res.loss.backward()
        crit.update_memory(res.samples)
    if cfg.inter and cfg.inter_mode == "memory":
        assert len(crit.memory) > 0


def test_baseline_has_no_iuq_terms(synth_dir):
    ds, model, _ = _setup(synth_dir, None)
    res = training_step(model, None, *_batch(ds, [0, 1]))
    assert "loss_inter" not in res.terms and res.samples is None
    assert torch.isfinite(res.loss)
    assert res.loss.item() == pytest.approx(
        sum(
            v.item() * next(w for k, w in model.model.weight_dict.items() if k in name) for name, v in res.terms.items()
        ),
        rel=1e-5,
    )


def test_inter_and_equi_gradients_reach_the_query_path(synth_dir):
    ds, model, crit = _setup(synth_dir, IUQConfig(memory_capacity=500))
    res = training_step(model, crit, *_batch(ds, [0, 1]), generator=torch.Generator().manual_seed(0))
    mask_embedder = model.model.model.transformer_module.decoder.mask_predictor.mask_embedder
    params = list(mask_embedder.parameters())
    for name in ("loss_inter", "loss_equi"):
        grads = torch.autograd.grad(res.terms[name], params, retain_graph=True)
        assert sum(g.abs().sum() for g in grads) > 0, name


def test_loss_decreases_over_30_steps(synth_dir):
    ds, model, crit = _setup(synth_dir, IUQConfig(memory_capacity=2000))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for step in range(30):
        idx = [(2 * step) % len(ds), (2 * step + 1) % len(ds)]
        res = training_step(model, crit, *_batch(ds, idx), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        crit.update_memory(res.samples)
        losses.append(res.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print("loss trajectory", [round(v, 2) for v in losses])
    assert last < 0.8 * first, (first, last)


def test_images_without_instances():
    """Negatives (images with no annotation) train: finite losses; an all-empty batch has only L_ce."""
    torch.manual_seed(0)
    model = Mask2FormerAdapter(
        build_mask2former(ModelConfig(backbone="resnet", num_labels=4, num_queries=8, train_num_points=64))
    )
    crit = IUQCriterion(IUQConfig(memory_capacity=100), model.decoder, 64, model.mask_loss)
    images, pixel_mask = torch.rand(2, 3, 64, 64), torch.ones(2, 64, 64, dtype=torch.bool)
    one = torch.zeros(1, 64, 64, dtype=torch.bool)
    one[0, 10:30, 10:30] = True
    empty = {"masks": torch.zeros(0, 64, 64, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.long)}
    mixed = [{"masks": one, "labels": torch.tensor([1])}, empty]
    result = training_step(
        model, crit, images, pixel_mask, mixed, torch.tensor([1, 2]), torch.Generator().manual_seed(0)
    )
    result.loss.backward()
    assert all(torch.isfinite(v) for v in result.terms.values()) and result.terms["loss_mask"] > 0
    result = training_step(
        model, crit, images, pixel_mask, [empty, empty], torch.tensor([1, 2]), torch.Generator().manual_seed(0)
    )
    result.loss.backward()
    terms = result.terms
    assert terms["loss_mask"] == 0 and terms["loss_dice"] == 0 and terms["loss_inter"] == 0 and terms["loss_equi"] == 0
    assert terms["loss_cross_entropy"] > 0  # every query is trained toward "no object"


READINGS = [
    dict(crop_mode="stretch"),
    dict(crop_mode="no_resize"),
    dict(g_view_base_loss=True),
    dict(g_augment=False),
    dict(inter_batch_grad=True),
    dict(inter_views="original"),
    dict(inter_scale="mask_weight"),
    dict(equi_variant="feature", crop_mode="no_resize"),
]


@pytest.mark.parametrize("switches", READINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_every_reading_gives_finite_losses_and_gradients(synth_dir, switches):
    cfg = IUQConfig(memory_capacity=500, **switches)
    ds, model, crit = _setup(synth_dir, cfg)
    for step in range(2):
        images, mask, targets, ids = _batch(ds, [2 * step, 2 * step + 1])
        res = training_step(model, crit, images, mask, targets, ids, torch.Generator().manual_seed(step), diagnose=True)
        assert torch.isfinite(res.loss) and all(torch.isfinite(v) for v in res.terms.values())
        assert ("loss_base_g" in res.terms) == cfg.g_view_base_loss
        res.loss.backward()
        crit.update_memory(res.samples)
    shares = {k: v for k, v in res.diagnostics.items() if k.startswith("grad_share/query/")}
    assert set(shares) == {"grad_share/query/base", "grad_share/query/inter", "grad_share/query/equi"}
    assert sum(shares.values()).item() == pytest.approx(1.0, abs=1e-5)
    assert all(res.diagnostics[f"grad_norm/{p}/base"] > 0 for p in ("pixel", "query"))
    assert 0 <= res.diagnostics["inter_fire_other_class"] <= 1
