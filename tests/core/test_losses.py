import math

import pytest
import torch

from iuq.core.losses import bce_mask_loss, dice_loss, elementwise_toward_zero, toward_zero_with_grad


def _sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("x", [-3.0, 0.0, 2.0])
def test_elementwise_losses_toward_zero_by_hand(x):
    t = torch.tensor([x], dtype=torch.float64)
    p, softplus = _sig(x), math.log1p(math.exp(x))
    assert elementwise_toward_zero(t, "focal", 0.1, 2.5).item() == pytest.approx(0.9 * p**2.5 * softplus, rel=1e-12)
    assert elementwise_toward_zero(t, "bce").item() == pytest.approx(softplus, rel=1e-12)
    assert elementwise_toward_zero(t, "l1").item() == pytest.approx(p, rel=1e-12)
    assert elementwise_toward_zero(t, "l2").item() == pytest.approx(p * p, rel=1e-12)


def test_focal_at_zero_logit_is_a_known_number():
    # 0.9 * 0.5 ** 2.5 * ln 2
    assert elementwise_toward_zero(torch.zeros(1), "focal").item() == pytest.approx(0.1102790, abs=1e-7)


@pytest.mark.parametrize("loss", ["focal", "bce", "l1", "l2"])
def test_closed_form_slope_is_autograd_of_the_loss(loss):
    x = torch.tensor([-40.0, -8.0, -1.5, 0.0, 0.3, 2.0, 9.0, 25.0], dtype=torch.float64, requires_grad=True)
    reference = elementwise_toward_zero(x, loss, 0.25, 2.0)
    (slope_ref,) = torch.autograd.grad(reference.sum(), x)
    value, slope = toward_zero_with_grad(x.detach(), loss, 0.25, 2.0)
    torch.testing.assert_close(value, reference.detach(), rtol=1e-12, atol=1e-30)
    torch.testing.assert_close(slope, slope_ref, rtol=1e-12, atol=1e-30)


def test_focal_slope_at_zero_logit_by_hand():
    # (1 - a) p^g (p + g (1 - p) ln 2) at p = 1/2, a = 0.1, g = 2.5
    _, slope = toward_zero_with_grad(torch.zeros(1, dtype=torch.float64), "focal", 0.1, 2.5)
    assert slope.item() == pytest.approx(0.9 * 0.5**2.5 * (0.5 + 2.5 * 0.5 * math.log(2)), rel=1e-12)


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="'hinge'"):
        elementwise_toward_zero(torch.zeros(1), "hinge")


def test_dice_and_bce_mask_losses_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    # probs all 0.5: numerator 2 * 1 = 2, denominator 2 + 2 = 4 -> 1 - 3/5
    assert dice_loss(logits, targets).item() == pytest.approx(0.4)
    assert bce_mask_loss(logits, targets).item() == pytest.approx(math.log(2))
    # normalised by num_masks
    assert dice_loss(logits.repeat(2, 1), targets.repeat(2, 1), num_masks=4).item() == pytest.approx(0.2)
