import pytest
import torch

from iuq.core.config import IUQConfig
from iuq.core.criterion import IUQCriterion
from iuq.core.decoders import DotProductDecoder
from iuq.core.inter_scene import inter_scene_loss_naive
from iuq.core.losses import dice_loss
from iuq.core.sampling import PixelSamples, sample_pixels
from iuq.core.transforms import sample_transforms


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(4, 6, 8, 8, generator=g).requires_grad_()  # 2 images x 2 views
    gt = []
    for _ in range(2):
        m = torch.zeros(2, 32, 32, dtype=torch.bool)
        m[0, :16], m[1, 16:] = True, True
        gt.append(m)
    queries = [torch.randn(2, 6, generator=g).requires_grad_() for _ in range(4)]
    t = sample_transforms(2, g)
    idx = torch.zeros(2, dtype=torch.long)
    targets = gt + [t.apply_masks(gt[0], idx), t.apply_masks(gt[1], idx + 1)]
    return emb, queries, targets, gt, t


def test_inter_term_equals_hand_assembled_reference_and_memory_follows():
    cfg = IUQConfig(memory_capacity=1000, samples_per_instance=5, equi=False)
    crit = IUQCriterion(cfg, DotProductDecoder(), pixel_dim=6, mask_loss=dice_loss)
    emb, queries, targets, gt, t = _batch()
    ids = torch.tensor([10, 11])
    terms, samples = crit(emb, queries, targets, gt, ids, g=t, generator=torch.Generator().manual_seed(3))
    ref_samples = sample_pixels(emb[:2], gt, ids, k=5, generator=torch.Generator().manual_seed(3))
    assert len(samples) == len(ref_samples) == 2 * 2 * 5
    q_ids = torch.tensor([10, 10, 11, 11, 10, 10, 11, 11])
    ref = inter_scene_loss_naive(
        torch.cat(queries), q_ids, ref_samples.embeddings, ref_samples.image_ids, DotProductDecoder()
    )
    assert terms["loss_inter"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert set(terms) == {"loss_inter"}
    crit.update_memory(samples)
    assert len(crit.memory) == 20
    # The next batch (other images) contrasts with its own samples and the memory.
    terms2, s2 = crit(emb, queries, targets, gt, torch.tensor([12, 13]), generator=torch.Generator().manual_seed(4))
    negatives = PixelSamples.cat([s2, crit.memory.contents()])
    ref2 = inter_scene_loss_naive(
        torch.cat(queries), q_ids + 2, negatives.embeddings, negatives.image_ids, DotProductDecoder()
    )
    assert terms2["loss_inter"].item() == pytest.approx(ref2.item(), abs=1e-6)
    assert "memory.embeddings" in crit.state_dict()


def test_both_terms_reach_the_queries_and_equi_needs_views():
    crit = IUQCriterion(IUQConfig(memory_capacity=100), DotProductDecoder(), pixel_dim=6, mask_loss=dice_loss)
    emb, queries, targets, gt, t = _batch()
    terms, _ = crit(emb, queries, targets, gt, torch.tensor([1, 2]), g=t)
    assert set(terms) == {"loss_inter", "loss_equi"}
    g_inter = torch.autograd.grad(terms["loss_inter"], queries, retain_graph=True)
    g_equi = torch.autograd.grad(terms["loss_equi"], queries + [emb])
    assert all(g.abs().sum() > 0 for g in g_inter)
    assert all(g.abs().sum() == 0 for g in g_equi[:2])  # original views' queries are not in L_equi
    assert all(g.abs().sum() > 0 for g in g_equi[2:])  # g-view queries and f(I) are
    with pytest.raises(ValueError, match="g-views"):
        crit(emb[:2], queries[:2], targets[:2], gt, torch.tensor([1, 2]))


def test_minibatch_mode_has_no_memory():
    crit = IUQCriterion(IUQConfig(inter_mode="minibatch", equi=False), DotProductDecoder(), 6, dice_loss)
    assert crit.memory is None


def test_chunk_size_by_device():
    from iuq.core.config import IUQConfig
    from iuq.core.criterion import IUQCriterion
    from iuq.core.decoders import DotProductDecoder
    from iuq.core.losses import dice_loss

    crit = IUQCriterion(IUQConfig(chunk_size=1000, cuda_chunk_pairs=2**20), DotProductDecoder(), 8, dice_loss)
    assert crit.chunk_size(torch.device("cpu"), 200) == 1000
    assert crit.chunk_size(torch.device("cuda"), 256) == 4096  # 2^20 pairs / 256 queries
    assert crit.chunk_size(torch.device("cuda"), 5000) == 1000  # never below chunk_size
    cpu = IUQCriterion(IUQConfig(chunk_size=16384, cpu_chunk_pairs=2**19), DotProductDecoder(), 8, dice_loss)
    assert cpu.chunk_size(torch.device("cpu"), 640) == 819  # 2^19 pairs / 640 queries
    assert cpu.chunk_size(torch.device("cpu"), 10) == 16384  # never above chunk_size
    assert cpu.chunk_size(torch.device("cpu"), 10**5) == 256
