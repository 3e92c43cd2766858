"""Mixed precision keeps the losses exact: under CPU bf16 (and fp16) autocast every loss, L_inter and
L_equi equal their fp32 values to a stated tolerance. The inputs are rounded to bf16 once, so what is
measured is the error of the computation, not of the inputs."""

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from iuq.core.config import IUQConfig
from iuq.core.criterion import IUQCriterion
from iuq.core.decoders import DotProductDecoder, DynamicConvDecoder
from iuq.core.equivariance import equivariance_loss
from iuq.core.inter_scene import inter_scene_loss, inter_scene_loss_naive
from iuq.core.losses import bce_dice_mask_loss, dice_loss, focal_toward_zero, sigmoid_focal
from iuq.core.sampling import PixelSamples
from iuq.core.transforms import BatchTransform
from iuq.models.fcos import fcos_losses

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def _rounded(*shape, seed=0, scale=1.0, shift=0.0):
    """Random values already representable in bf16 (as fp32 tensors)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).bfloat16().float()


def test_focal_on_bf16_logits_is_exact_and_torchvisions_bf16_focal_is_not():
    # CondInst's and SOLOv2's classification logits start at p = 0.01 (prior bias); target 0.
    x = torch.full((64,), math.log(0.01 / 0.99)).bfloat16()
    zeros = torch.zeros(64)
    reference = sigmoid_focal_loss(x.double(), zeros.double(), alpha=0.25, gamma=2.0, reduction="sum")
    # (1 - alpha) * p^2 * -log(1 - p) per element, with p = sigmoid of the bf16 logit
    p = torch.sigmoid(x.double())
    assert reference.item() == pytest.approx(float((0.75 * p**2 * -torch.log1p(-p)).sum()), rel=1e-12)
    ours = sigmoid_focal(x, zeros, 0.25, 2.0)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(reference.item(), rel=1e-4)  # fp32's own 1 - p_t: ~1e-5
    # torchvision's loss computed in bf16: 1 - p_t rounds in bf16 and the loss is far off (here it is 0).
    bf16 = sigmoid_focal_loss(x, zeros.bfloat16(), alpha=0.25, gamma=2.0, reduction="sum").double()
    assert abs(bf16.item() / reference.item() - 1) > 0.3


def test_inter_focal_toward_zero_on_bf16_logits_is_exact():
    x = _rounded(1000, seed=1, scale=3.0, shift=-4.0).bfloat16()
    ours = focal_toward_zero(x, alpha=0.1, gamma=2.5)
    reference = sigmoid_focal_loss(x.double(), torch.zeros(1000, dtype=torch.float64), alpha=0.1, gamma=2.5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-12)  # fp32's own error


def test_mask_losses_on_bf16_logits_equal_fp32():
    logits = _rounded(5, 400, seed=2, scale=4.0)
    targets = torch.rand(5, 400, generator=torch.Generator().manual_seed(3)) > 0.6
    for loss in (
        lambda lg: dice_loss(lg, targets, 5.0, form="squared", eps=1e-5),
        lambda lg: dice_loss(lg, targets, 5.0),
        lambda lg: bce_dice_mask_loss(lg, targets, 5.0),
    ):
        assert loss(logits.bfloat16()).item() == pytest.approx(loss(logits).item(), rel=1e-6)


def test_fcos_losses_under_bf16_equal_fp32():
    g = torch.Generator().manual_seed(4)
    n = 50
    cls = _rounded(n, 3, seed=5)
    reg_pred = (torch.rand(n, 4, generator=g) * 200 + 1).bfloat16().float()
    ctr = _rounded(n, seed=6)
    labels = torch.randint(-1, 3, (n,), generator=g)
    reg_t = torch.rand(n, 4, generator=g) * 200 + 1
    xy = torch.rand(n, 2, generator=g) * 256
    full = fcos_losses(cls, reg_pred, ctr, labels, reg_t, xy, 10.0, 5.0)
    half = fcos_losses(cls.bfloat16(), reg_pred.bfloat16(), ctr.bfloat16(), labels, reg_t, xy, 10.0, 5.0)
    for name, value in full.items():
        assert half[name].dtype == torch.float32
        assert half[name].item() == pytest.approx(value.item(), rel=1e-5), name


def test_condinst_relative_coordinates_do_not_cancel_under_bf16():
    """Layer 1 of the dynamic head (the one that reads the relative coordinates) is exact under bf16
    autocast. A query at the centre of a 256-cell row with a size of interest of 4 cells: the
    per-query constant (w . q_xy / soi) and the pixel term (w . p_xy / soi) are ~32 w and nearly
    equal beside the query, where bf16 (spacing 0.125 at 32) would keep a bit or two of their difference."""
    dec = DynamicConvDecoder(soi=1.0, widths=(1,))  # layer 1 alone
    params = _rounded(4, dec.num_query_params(), seed=7)
    pixels = torch.zeros(256, 8)  # the coordinates' part of the logits alone
    xs = (torch.arange(256) + 0.5) / 256  # one row of cells, normalised
    pixel_xy = torch.stack([xs, torch.full_like(xs, 0.5)], 1)
    query_xy = torch.tensor([[0.5, 0.5, 1 / 64]]).repeat(4, 1)
    reference = dec(params, pixels, pixel_xy, query_xy)  # [4, 256]
    with BF16:
        ours = dec(params, pixels, pixel_xy, query_xy)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    # The same layer computed in bf16, beside the query (|rel| <= 1): off by a sizeable part of the logit.
    w1, b1 = (t[:, 0] for t in dec.split_params(params.bfloat16())[0])  # [4, 10], [4]
    soi = torch.tensor(1 / 64).bfloat16()
    const = b1 + (w1[:, :2] / soi * query_xy[:, :2].bfloat16()).sum(-1)  # [4]
    z = torch.cat([pixel_xy, pixels], 1).bfloat16()  # [256, 10]
    naive = const[:, None] + (z @ torch.cat([-w1[:, :2] / soi, w1[:, 2:]], 1).t()).t()  # [4, 256]
    near = slice(124, 132)
    local = reference[:, near].abs().max().item()
    assert (naive[:, near].float() - reference[:, near]).abs().max().item() > 0.05 * local


def test_resampling_grid_stays_fp32_under_bf16():
    x = _rounded(2, 3, 256, 256, seed=9)
    g = BatchTransform(torch.tensor([[0.7, 0.7], [-0.61, 0.61]]), torch.tensor([[0.13, 0.2], [0.9, 0.05]]))
    reference = g.apply(x)
    out = g.apply(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference.bfloat16(), rtol=0, atol=0)  # only the output is rounded


@pytest.mark.parametrize("decoder,d,pix_dim", [(DotProductDecoder(), 32, 32), (DynamicConvDecoder(soi=0.3), 169, 8)])
def test_inter_scene_under_bf16_autocast_within_2_percent(decoder, d, pix_dim):
    g = torch.Generator().manual_seed(10)
    q = (torch.randn(12, d, generator=g) * 0.3).bfloat16().float().requires_grad_()
    qi = torch.arange(12) // 3
    pixels = _rounded(3000, pix_dim, seed=11)
    pi = torch.randint(0, 8, (3000,), generator=g)
    pxy, qxy = torch.rand(3000, 2, generator=g), torch.rand(12, 2, generator=g)
    reference = inter_scene_loss_naive(q, qi, pixels, pi, decoder, pxy, qxy)
    (g_ref,) = torch.autograd.grad(reference, q)
    with BF16:
        ours = inter_scene_loss(q, qi, pixels, pi, decoder, pxy, qxy, chunk_size=700)
    (g_ours,) = torch.autograd.grad(ours, q)
    # The logits' matrix products run in bf16 (the point of autocast); the loss itself in fp32.
    assert ours.item() == pytest.approx(reference.item(), rel=0.02)
    assert (g_ours - g_ref).norm().item() < 0.02 * g_ref.norm().item()


def test_inter_scene_under_fp16_autocast_keeps_gradients_a_scaler_would_need():
    """Logits around -9: per-pair focal gradients of ~1e-12 underflow fp16 (smallest ~6e-8) in an
    inner autograd.grad that no GradScaler scales; the chunks then run in fp32 and keep them."""
    g = torch.Generator().manual_seed(12)
    q = (torch.randn(8, 16, generator=g) * 0.05).requires_grad_()
    qi = torch.arange(8) // 2
    pixels = torch.randn(2000, 16, generator=g) * 0.05
    pixels[:, 0] = 3.0
    q_shift = q.detach().clone()
    q_shift[:, 0] = -3.0  # logit ~ -9 for every pair
    q2 = q_shift.requires_grad_()
    pi = torch.randint(0, 6, (2000,), generator=g)
    reference = inter_scene_loss_naive(q2.double(), qi, pixels.double(), pi, DotProductDecoder())
    (g_ref,) = torch.autograd.grad(reference, q2)
    with torch.autocast("cpu", dtype=torch.float16):
        ours = inter_scene_loss(q2, qi, pixels, pi, DotProductDecoder(), chunk_size=500)
    (g_ours,) = torch.autograd.grad(ours, q2)
    assert g_ref.abs().max().item() < 1e-9  # far below fp16's smallest subnormal
    torch.testing.assert_close(g_ours.double(), g_ref.double(), rtol=1e-4, atol=1e-16)


def test_equivariance_loss_under_bf16_autocast_within_2_percent():
    g = torch.Generator().manual_seed(13)
    emb = _rounded(2, 16, 24, 24, seed=14)
    queries = [(torch.randn(3, 16, generator=g) * 0.5).requires_grad_() for _ in range(2)]
    masks = [torch.rand(3, 24, 24, generator=g) > 0.5 for _ in range(2)]
    t = BatchTransform(torch.tensor([[0.8, 0.8], [-0.7, 0.7]]), torch.tensor([[0.1, 0.05], [0.85, 0.2]]))

    def loss():
        return equivariance_loss(queries, masks, emb, t, DotProductDecoder(), dice_loss, variant="full")

    reference = loss()
    with BF16:
        ours = loss()
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(reference.item(), rel=0.02)


def test_bf16_memory_halves_storage_and_gives_the_loss_of_its_rounded_entries():
    cfg = IUQConfig(memory_capacity=64, memory_dtype="bfloat16", equi=False)
    crit = IUQCriterion(cfg, DotProductDecoder(), pixel_dim=8, mask_loss=dice_loss)
    assert crit.memory.embeddings.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(15)
    entries = torch.randn(40, 8, generator=g)
    crit.memory.enqueue(PixelSamples(entries, torch.rand(40, 2, generator=g), torch.arange(40) % 5 + 10))
    q = torch.randn(4, 8, generator=g).requires_grad_()
    mem = crit.memory.contents()
    ours = inter_scene_loss(q, torch.tensor([0, 0, 1, 1]), mem.embeddings, mem.image_ids, DotProductDecoder())
    rounded = inter_scene_loss_naive(
        q, torch.tensor([0, 0, 1, 1]), entries.bfloat16().float(), mem.image_ids, DotProductDecoder()
    )
    assert ours.item() == pytest.approx(rounded.item(), rel=1e-6)
    with pytest.raises(ValueError, match="iuq.memory_dtype"):
        IUQConfig(memory_dtype="float16")


def test_dot_decoder_on_a_bf16_memory_with_and_without_autocast():
    q, p = _rounded(4, 16, seed=16), _rounded(30, 16, seed=17).bfloat16()
    torch.testing.assert_close(DotProductDecoder()(q, p), q @ p.float().t(), rtol=0, atol=0)  # fp32 run
    with BF16:
        out = DotProductDecoder()(q, p)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, q.bfloat16() @ p.t(), rtol=0, atol=0)
