import math

import pytest
import torch

from iuq.core.decoders import DotProductDecoder, DynamicConvDecoder
from iuq.core.inter_scene import inter_scene_loss, inter_scene_loss_naive, inter_scene_negatives
from iuq.core.memory import PixelMemory
from iuq.core.sampling import PixelSamples


def _case(decoder, d, pix_dim, p=500):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, d, dtype=torch.float64, generator=g).requires_grad_()
    qi = torch.tensor([0, 0, 1, 1, 2, 3])
    pixels = torch.randn(p, pix_dim, dtype=torch.float64, generator=g)
    pi = torch.randint(0, 5, (p,), generator=g)
    pxy = torch.rand(p, 2, dtype=torch.float64, generator=g)
    qxy = torch.rand(6, 2, dtype=torch.float64, generator=g)
    return q, qi, pixels, pi, pxy, qxy


@pytest.mark.parametrize("loss", ["focal", "bce", "l1", "l2"])
@pytest.mark.parametrize("decoder,d,pix_dim", [(DotProductDecoder(), 16, 16), (DynamicConvDecoder(soi=0.3), 169, 8)])
def test_chunked_equals_naive_in_value_and_gradient(loss, decoder, d, pix_dim):
    q, qi, pixels, pi, pxy, qxy = _case(decoder, d, pix_dim)
    a = inter_scene_loss(q, qi, pixels, pi, decoder, pxy, qxy, loss=loss, chunk_size=37)
    (ga,) = torch.autograd.grad(2.5 * a, q)
    b = inter_scene_loss_naive(q, qi, pixels, pi, decoder, pxy, qxy, loss=loss)
    (gb,) = torch.autograd.grad(2.5 * b, q)
    assert abs(a.item() - b.item()) < 1e-10
    assert (ga - gb).abs().max().item() < 1e-10


def test_float32_chunked_equals_naive_within_1e5():
    q, qi, pixels, pi, pxy, qxy = _case(DotProductDecoder(), 32, 32, p=5000)
    q = q.detach().float().requires_grad_()
    a = inter_scene_loss(q, qi, pixels.float(), pi, DotProductDecoder(), chunk_size=999)
    (ga,) = torch.autograd.grad(a, q)
    b = inter_scene_loss_naive(q, qi, pixels.float(), pi, DotProductDecoder())
    (gb,) = torch.autograd.grad(b, q)
    assert abs(a.item() - b.item()) < 1e-5 and (ga - gb).abs().max().item() < 1e-5


def test_pairs_from_the_same_image_are_excluded_by_hand():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    pixels = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 1.0]], dtype=torch.float64)
    # Pixel 0 is from the query's own image: only logits 0 and -1 count.
    loss = inter_scene_loss(q, torch.tensor([7]), pixels, torch.tensor([7, 8, 9]), DotProductDecoder(), loss="bce")
    assert loss.item() == pytest.approx((math.log(2) + math.log1p(math.exp(-1))) / 2, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, q)
    # d softplus(x)/dx = sigmoid(x); logit_1 = q . (0, 5) = 0, logit_2 = q . (-1, 1) = -1
    s0, s1 = 0.5, 1 / (1 + math.e)
    expected = (s0 * torch.tensor([0.0, 5.0]) + s1 * torch.tensor([-1.0, 1.0])) / 2
    torch.testing.assert_close(grad, expected.double()[None])


def test_no_valid_pair_gives_connected_zero():
    q = torch.randn(3, 4, requires_grad=True)
    ids = torch.tensor([1, 1, 1])
    for pixels, pids in [
        (torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),  # empty memory and batch
        (torch.randn(5, 4), torch.ones(5, dtype=torch.long)),
    ]:  # single image, minibatch
        loss = inter_scene_loss(q, ids, pixels, pids, DotProductDecoder())
        assert loss.item() == 0.0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, q)
        assert torch.equal(g, torch.zeros_like(q))
    empty_q = torch.zeros(0, 4, requires_grad=True)  # a batch with no matched query
    loss = inter_scene_loss(empty_q, ids[:0], torch.randn(5, 4), torch.arange(5), DotProductDecoder())
    assert loss.item() == 0.0 and loss.requires_grad


def test_negatives_modes():
    batch = PixelSamples(torch.ones(2, 3), torch.zeros(2, 2), torch.tensor([1, 2]))
    mem = PixelMemory(capacity=10, dim=3)
    mem.enqueue(PixelSamples(torch.full((4, 3), 2.0), torch.zeros(4, 2), torch.tensor([5, 6, 7, 8])))
    assert len(inter_scene_negatives(batch, mem, "memory")) == 6
    assert len(inter_scene_negatives(batch, mem, "minibatch")) == 2
    with pytest.raises(ValueError, match="'queue'"):
        inter_scene_negatives(batch, mem, "queue")


def test_a_decoder_with_parameters_is_refused_by_the_chunked_path():
    class Learned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, queries, pixels, pixel_xy=None, query_xy=None):
            return self.scale * queries @ pixels.t()

    q = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ValueError, match="Learned has parameters of its own"):
        inter_scene_loss(q, torch.tensor([0, 1]), torch.randn(5, 4), torch.tensor([2] * 5), Learned())
    frozen = Learned().requires_grad_(False)  # constants are fine: nothing is left untrained
    value = inter_scene_loss(q, torch.tensor([0, 1]), torch.randn(5, 4), torch.tensor([2] * 5), frozen)
    assert torch.isfinite(value)
