"""The step's view plumbing: G as augmentation, which views get the base loss, L_equi's normaliser
(with a fake base model that records what it is given), and gradient shares on a constructed case."""

import pytest
import torch
import torch.distributed as dist

from iuq.core.config import IUQConfig
from iuq.core.criterion import IUQCriterion
from iuq.core.decoders import DotProductDecoder
from iuq.core.losses import dice_loss
from iuq.core.views import draw_g, transformed_views
from iuq.engine.step import gradient_shares, training_step
from iuq.models.dense import mean_mask_count
from iuq.models.interface import SegmenterOutput
from tests.conftest import spawn_two_ranks


class RecordingModel:
    """A stand-in base model: loss = sum of images per view; matches query k to target k."""

    stride = 4

    def __init__(self):
        self.calls = []

    def __call__(self, images, pixel_mask, targets, views=1, view_loss=None):
        self.calls.append({"images": images, "mask": pixel_mask, "targets": targets, "view_loss": view_loss})
        b = images.shape[0] // views
        losses = [images[v * b : (v + 1) * b].sum() if view_loss[v] else None for v in range(views)]
        n = images.shape[0]
        emb = images.mean(1, keepdim=True).repeat(1, 2, 1, 1)[:, :, ::4, ::4]  # [N, 2, H/4, W/4]
        queries = torch.ones(n, 3, 2, requires_grad=True)
        return SegmenterOutput(
            loss=sum(x for x in losses if x is not None),
            loss_terms={},
            view_losses=losses,
            pixel_embeddings=emb,
            stride=4,
            queries=[queries[i, : len(t["labels"])] for i, t in enumerate(targets)],
            instances=[torch.arange(len(t["labels"])) for t in targets],
            query_states=queries,
        )

    @staticmethod
    def equi_normaliser(queries_g, targets_g):  # as Mask2Former's: the g-views' mask count
        return mean_mask_count(targets_g, "cpu")


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)
    mask = torch.ones(2, 32, 32, dtype=torch.bool)
    targets = []
    for k in (2, 1):
        masks = torch.zeros(k, 32, 32, dtype=torch.bool)
        for i in range(k):
            masks[i, 4 + 8 * i : 12 + 8 * i, 4:20] = True
        targets.append({"masks": masks, "labels": torch.arange(k)})
    return images, mask, targets, torch.tensor([5, 6])


def test_baseline_with_g_augment_trains_on_g_of_the_images():
    images, mask, targets, ids = _batch()
    cfg = IUQConfig(inter=False, equi=False, g_augment=True, crop_min=0.7, crop_max=0.7)
    model = RecordingModel()
    training_step(model, None, images, mask, targets, ids, torch.Generator().manual_seed(4), cfg=cfg)
    g0 = draw_g(cfg, mask, 4, torch.Generator().manual_seed(4))
    expected, _, expected_targets = transformed_views(images, mask, targets, g0)
    (call,) = model.calls
    assert call["images"].shape == images.shape and torch.equal(call["images"], expected)
    assert not torch.equal(call["images"], images)
    assert all(torch.equal(a["masks"], b["masks"]) for a, b in zip(call["targets"], expected_targets, strict=True))
    # Without the switch the images go in untouched.
    model = RecordingModel()
    training_step(model, None, images, mask, targets, ids, cfg=IUQConfig(inter=False, equi=False, g_augment=False))
    assert torch.equal(model.calls[0]["images"], images)


@pytest.mark.parametrize("g_loss", [False, True])
def test_g_views_get_the_base_loss_only_when_asked(g_loss):
    images, mask, targets, ids = _batch()
    cfg = IUQConfig(inter=False, equi=True, equi_weight=0.0, g_augment=False, g_view_base_loss=g_loss)
    crit = IUQCriterion(cfg, DotProductDecoder(), 2, dice_loss)
    model = RecordingModel()
    res = training_step(model, crit, images, mask, targets, ids, torch.Generator().manual_seed(0))
    call = model.calls[0]
    assert call["view_loss"] == (True, g_loss) and call["images"].shape[0] == 4
    expected = call["images"][:2].sum() + (call["images"][2:].sum() if g_loss else 0)
    torch.testing.assert_close(res.loss, expected)  # originals at full weight, g-views added or not


def test_equi_normaliser_is_the_g_views_mask_count():
    images, mask, targets, ids = _batch()
    seen = {}

    def recording_loss(logits, tgt, num_masks):
        seen.setdefault("num_masks", num_masks)
        return dice_loss(logits, tgt, num_masks)

    cfg = IUQConfig(inter=False, equi=True, g_augment=False, crop_min=1.0, crop_max=1.0)  # flips: all kept
    crit = IUQCriterion(cfg, DotProductDecoder(), 2, recording_loss)
    training_step(RecordingModel(), crit, images, mask, targets, ids, torch.Generator().manual_seed(0))
    assert seen["num_masks"] == 3.0


def _count_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    targets = [{"labels": torch.zeros(3 if rank == 0 else 0)}]  # 3 masks on rank 0, none on rank 1
    torch.save(mean_mask_count(targets, "cpu"), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_equi_normaliser_is_averaged_over_ranks_like_the_base_loss(tmp_path):
    spawn_two_ranks(_count_worker, tmp_path)
    # (3 + 0) / 2 ranks = 1.5 on both: the rank without masks does not divide by its own 0 (or 1).
    assert [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)] == [1.5, 1.5]
    assert mean_mask_count([{"labels": torch.zeros(0)}], "cpu") == 1.0  # at least 1, single process


def test_gradient_shares_on_a_constructed_graph():
    x = torch.ones(4, requires_grad=True)
    y = 2 * x
    parts = {"a": (2 * y).sum(), "b": (3 * y).sum(), "c": x.sum() * 0}
    out = gradient_shares(parts, {"y": y})
    assert out["grad_norm/y/a"].item() == pytest.approx(4.0) and out["grad_norm/y/b"].item() == pytest.approx(6.0)
    assert out["grad_share/y/a"].item() == pytest.approx(0.4) and out["grad_share/y/b"].item() == pytest.approx(0.6)
    assert out["grad_share/y/c"].item() == 0.0
