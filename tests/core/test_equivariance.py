import pytest
import torch

from iuq.core.decoders import DotProductDecoder
from iuq.core.equivariance import equivariance_loss
from iuq.core.losses import dice_loss
from iuq.core.transforms import BatchTransform, hflip


def _scene():
    """One 32x32 image, stride 4 embeddings; embedding channel k is +10 on instance k, -10 elsewhere."""
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 0:16, 0:16] = True
    masks[1, 16:32, 0:32] = True
    masks[2, 0:16, 16:32] = True
    small = torch.nn.functional.adaptive_avg_pool2d(masks[:, None].float(), (8, 8))[:, 0]  # [3, 8, 8]
    emb = (20 * small - 10)[None].requires_grad_()  # [1, 3, 8, 8]
    return masks, emb


@pytest.mark.parametrize(
    "g, tol",
    [
        (hflip(1), 1e-3),
        # A 2x zoom on the top-right quarter: bilinear resampling blends logits across the one
        # instance boundary inside the window, the only source of loss.
        (BatchTransform(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.0]])), 0.06),
    ],
)
def test_zero_when_queries_reproduce_transformed_masks_positive_otherwise(g, tol):
    masks, emb = _scene()
    index = torch.zeros(3, dtype=torch.long)
    target_g = g.apply_masks(masks, index)  # g(M)
    queries = torch.eye(3, requires_grad=True)  # q_k picks channel k: <q_k, g(I)> = g(M_k) logits
    loss = equivariance_loss([queries], [target_g], emb, g, DotProductDecoder(), dice_loss)
    # Logits are +-10 on every cell of a flip: each mask's dice loss is ~sigmoid(-10) ~ 5e-5.
    assert 0 <= loss.item() < tol
    wrong = equivariance_loss([queries[[1, 2, 0]]], [target_g], emb, g, DotProductDecoder(), dice_loss)
    assert wrong.item() > 0.5 > 5 * tol
    (gq, ge) = torch.autograd.grad(wrong, [queries, emb])
    assert gq.abs().sum() > 0 and ge.abs().sum() > 0  # reaches queries and f(I)


def test_variants():
    masks, emb = _scene()
    g = hflip(1)
    q = torch.eye(3, requires_grad=True)
    aug = equivariance_loss([q], [masks], emb, g, DotProductDecoder(), dice_loss, variant="augmentation")
    assert aug.item() == 0.0 and aug.requires_grad
    f_g = g.apply(emb.detach())  # a perfectly equivariant f
    feat = equivariance_loss(
        [q], [masks], emb, g, DotProductDecoder(), dice_loss, variant="feature", pixel_embeddings_g=f_g
    )
    assert feat.item() == 0.0
    feat = equivariance_loss(
        [q], [masks], emb, g, DotProductDecoder(), dice_loss, variant="feature", pixel_embeddings_g=f_g + 2.0
    )
    assert feat.item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="'rotate'"):
        equivariance_loss([q], [masks], emb, g, DotProductDecoder(), dice_loss, variant="rotate")


def test_empty_batch_is_a_connected_zero():
    emb = torch.randn(2, 4, 8, 8, requires_grad=True)
    q = [torch.zeros(0, 4, requires_grad=True)] * 2
    m = [torch.zeros(0, 32, 32, dtype=torch.bool)] * 2
    loss = equivariance_loss(q, m, emb, hflip(2), DotProductDecoder(), dice_loss)
    assert loss.item() == 0.0 and loss.requires_grad
