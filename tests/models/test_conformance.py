"""Every model of `iuq.models.build.SPECS` keeps the base-model contract (`iuq.models.interface`):
output fields and shapes, a parameter-free decoder that reproduces the matched masks' logits, a train
step with and without IUQ, export and reload, and `iuq eval` of its run directory."""

import json

import pytest
import torch

from iuq.cli import main
from iuq.config import load_config
from iuq.core.sampling import grid_xy
from iuq.engine.inference import load_trained, save_model_dir
from iuq.engine.step import build_criterion, training_step
from iuq.engine.train import train
from iuq.models.build import SPECS, build_model
from iuq.models.interface import SegmenterOutput, batch_instances, matched
from tests.engine.test_dense_engine import dense_overrides
from tests.engine.test_train import tiny_data, tiny_overrides  # noqa: F401 (fixture)
from tests.models.test_dense_training import HEADS, batch

MODELS = sorted(SPECS)


def tiny(kind: str, *extra: str):
    head = HEADS.get(kind, ["model.num_queries=6", "model.hidden_dim=32", "model.mask_feature_size=32",
                            "model.encoder_layers=1", "model.decoder_layers=2", "model.heads=2", "model.ffn_dim=32",
                            "model.train_num_points=64"])  # fmt: skip
    cfg = load_config(None, [f"model.type={kind}", "model.backbone=resnet", "model.backbone_widths=[8,16,16,16]",
                             "model.num_labels=2", "iuq.memory_capacity=500", "iuq.samples_per_instance=8",
                             *head, *extra])  # fmt: skip
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


@pytest.mark.parametrize("kind", MODELS)
def test_forward_output_keeps_the_contract(kind):
    cfg, model = tiny(kind)
    images, pixel_mask, targets = batch()
    out = model(torch.cat([images, images.flip(-1)]), torch.cat([pixel_mask, pixel_mask]),
                targets + targets, views=2, view_loss=(True, False))  # fmt: skip
    assert isinstance(out, SegmenterOutput)
    n, s = 4, model.stride
    assert out.pixel_embeddings.shape == (n, model.pixel_dim, 64 // s, 64 // s)
    assert out.stride == s and torch.isfinite(out.loss)
    assert len(out.view_losses) == 2 and out.view_losses[1] is None
    assert len(out.queries) == len(out.instances) == n
    for q, k, t in zip(out.queries, out.instances, targets + targets, strict=True):
        assert q.ndim == 2 and q.shape[0] == k.shape[0] > 0
        assert k.dtype == torch.int64 and 0 <= int(k.min()) and int(k.max()) < len(t["labels"])
    if out.query_xy is not None:
        assert [x.shape for x in out.query_xy] == [(q.shape[0], 4) for q in out.queries]
    queries, masks, labels = matched(out, targets + targets)
    assert all(m.shape[0] == q.shape[0] and m.shape[-2:] == (64, 64) for m, q in zip(masks, queries, strict=True))
    assert all(lab.shape[0] == q.shape[0] for lab, q in zip(labels, queries, strict=True))
    assert model.equi_normaliser(queries[2:], targets) >= 1.0
    assert isinstance(model.checkpoint_extras(), dict)
    assert not list(model.decoder.parameters())  # a decoder holds no parameters of its own
    if getattr(model, "decoder_kind", "pixel") == "roi":
        # An RoI decoder reads pooled features [n, C, S, S]; every matched query has its box.
        boxes = out.head["query_boxes"]
        assert [b.shape for b in boxes] == [(q.shape[0], 4) for q in out.queries]
        assert [lv.shape[0] for lv in out.head["levels"]] == [n] * len(model.strides)
        s_ = model.roi_size
        feats = torch.randn(queries[0].shape[0], model.pixel_dim, s_, s_)
        logits = model.decoder(queries[0], feats, labels[0])
        m = model.decoder.mask_size
        assert logits.shape == (queries[0].shape[0], m, m) and torch.isfinite(logits).all()
        value = model.mask_loss(logits.flatten(1), torch.zeros_like(logits, dtype=torch.bool).flatten(1), 1.0)
        assert value.ndim == 0 and torch.isfinite(value)
        return
    # A pixel decoder decodes the queries on the flat embeddings.
    h, w = out.pixel_embeddings.shape[-2:]
    pixels = out.pixel_embeddings[0].flatten(1).t()  # [h*w, D]
    qxy = out.query_xy[0] if out.query_xy is not None else None
    logits = model.decoder(queries[0], pixels, grid_xy(h, w), qxy)
    assert logits.shape == (queries[0].shape[0], h * w) and torch.isfinite(logits).all()
    value = model.mask_loss(logits, torch.zeros_like(logits, dtype=torch.bool), 1.0)
    assert value.ndim == 0 and torch.isfinite(value)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("with_iuq", [False, True])
def test_a_train_step_with_and_without_iuq(kind, with_iuq):
    cfg, model = tiny(kind)
    criterion = None
    if with_iuq:
        criterion = build_criterion(cfg.iuq, model)
    images, pixel_mask, targets = batch()
    result = training_step(model, criterion, images, pixel_mask, targets, torch.tensor([0, 1]),
                           torch.Generator().manual_seed(0), cfg=cfg.iuq)  # fmt: skip
    assert torch.isfinite(result.loss)
    assert ("loss_inter" in result.terms and "loss_equi" in result.terms) == with_iuq
    result.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(int(g is not None and g.abs().sum() > 0) for g in grads) > len(grads) // 2


@pytest.mark.parametrize("kind", MODELS)
def test_export_and_reload_predict_the_same(kind, tmp_path):
    _, model = tiny(kind)
    model.eval()
    images, pixel_mask, targets = batch()
    for t in targets:
        t["size"], t["orig_size"] = (64, 64), (64, 64)
    collated = {"images": images, "pixel_mask": pixel_mask, "targets": targets}
    before = batch_instances(model, collated, 5)
    save_model_dir(model, tmp_path / "model", [3, 7], ["a", "b"], 64, 64)
    again = load_trained(tmp_path / "model")
    after = batch_instances(again.model, collated, 5)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"])
        torch.testing.assert_close(a["mask_logits"], b["mask_logits"])
    assert again.label_to_category == [3, 7] and again.class_names == ["a", "b"]


@pytest.mark.parametrize("kind", MODELS)
def test_iuq_eval_of_a_run_directory(kind, tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    sets = tiny_overrides(tiny_data, out) if kind == "mask2former" else dense_overrides(kind, tiny_data, out)
    metrics = train(load_config(None, [*sets, "train.max_steps=2", "train.max_epochs=null"]))
    assert main(["eval", str(out), "--out", str(tmp_path / "m.json"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(metrics, abs=1e-9)
