"""Per-element and per-mask losses as pure functions.

Shapes: Q masks (or queries), P pixels. `*_toward_zero` are the element-wise losses of Eq. 5,
whose target is the all-zero matrix; the mask losses are those of the base segmenters (Eq. 3),
reused as L_equi (Eq. 8).

Every loss takes its logits to fp32 first. Under bf16 autocast the logits arrive in bf16, and a
focal weight (1 - p)^gamma or a dice sum computed in bf16 is coarse: 1 - p rounds to 1 for p below
about 0.002, and at CondInst's initial p = 0.01 the easy-negative focal loss is off by about a third.
On fp32 (or fp64) logits the cast is a no-op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 when it is a narrower float (bf16, fp16); fp32 and fp64 pass unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def focal_toward_zero(logits: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """logits [...] -> per-element focal loss [...] against target 0.

    With target 0 focal loss is (1 - alpha) * sigmoid(x)^gamma * softplus(x).
    """
    logits = upcast(logits)
    return sigmoid_focal_loss(logits, torch.zeros_like(logits), alpha=alpha, gamma=gamma, reduction="none")


def softplus_exact(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) = binary cross-entropy of x against 0, without F.softplus's cut-over to x above
    20 (whose derivative is then 1, not sigmoid(x)): the focal loss's own form, and one derivative
    everywhere for the closed form of `toward_zero_with_grad`."""
    return F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")


def bce_toward_zero(logits: torch.Tensor) -> torch.Tensor:
    """logits [...] -> per-element binary cross-entropy against 0, i.e. softplus(x)."""
    return softplus_exact(upcast(logits))


def l1_toward_zero(logits: torch.Tensor) -> torch.Tensor:
    """logits [...] -> |sigmoid(x) - 0|."""
    return upcast(logits).sigmoid()


def l2_toward_zero(logits: torch.Tensor) -> torch.Tensor:
    """logits [...] -> (sigmoid(x) - 0)^2."""
    return upcast(logits).sigmoid().square()


def elementwise_toward_zero(logits: torch.Tensor, loss: str, alpha: float = 0.1, gamma: float = 2.5) -> torch.Tensor:
    """Dispatch for Table 4a: loss in {"focal", "bce", "l1", "l2"}."""
    if loss == "focal":
        return focal_toward_zero(logits, alpha, gamma)
    if loss == "bce":
        return bce_toward_zero(logits)
    if loss == "l1":
        return l1_toward_zero(logits)
    if loss == "l2":
        return l2_toward_zero(logits)
    raise ValueError(f"unknown inter-scene loss {loss!r}; choose one of 'focal', 'bce', 'l1', 'l2'")


def toward_zero_with_grad(
    logits: torch.Tensor, loss: str, alpha: float = 0.1, gamma: float = 2.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [...] -> (per-element loss toward 0, its derivative in the logits), both [...] in fp32.

    L_inter's chunks need the value and the derivative of a loss over [Q, chunk] pairs; autograd
    through torchvision's focal loss runs about 8 forward and 15 backward element-wise passes over
    that matrix, the closed form below 6 (a third of the time for dot-product queries on the CPU).
    With p = sigmoid(x) and softplus(x) = -log(1 - p):
        focal  (1 - a) p^g softplus(x)   d/dx = (1 - a) p^g (p + g (1 - p) softplus(x))
        bce    softplus(x)               d/dx = p
        l1     p                         d/dx = p (1 - p)
        l2     p^2                       d/dx = 2 p^2 (1 - p)
    The values equal `elementwise_toward_zero`'s to rounding (tested against it and its autograd).
    """
    x = upcast(logits)
    p = torch.sigmoid(x)
    if loss == "focal":
        softplus = softplus_exact(x)
        weight = p.pow(gamma).mul_(1 - alpha)
        return weight * softplus, (1 - p).mul_(softplus).mul_(gamma).add_(p).mul_(weight)
    if loss == "bce":
        return softplus_exact(x), p
    if loss == "l1":
        return p, p * (1 - p)
    if loss == "l2":
        square = p * p
        return square, square.mul(1 - p).mul_(2)
    raise ValueError(f"unknown inter-scene loss {loss!r}; choose one of 'focal', 'bce', 'l1', 'l2'")


DICE_FORMS = ("linear_plus1", "squared")


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float | None = None,
    form: str = "linear_plus1",
    eps: float = 1e-5,
) -> torch.Tensor:
    """logits [Q, P], targets [Q, P] in {0, 1} -> scalar: sum over masks of 1 - dice, / num_masks.

    form "linear_plus1" (Mask2Former, HF): 1 - (2 sum(pt) + 1) / (sum(p) + sum(t) + 1); an empty
        target still pulls every pixel toward 0. `eps` is not used.
    form "squared" (CondInst and SOLOv2): 1 - 2 sum(pt) / (sum(p^2) + sum(t^2) + eps); an empty target
        gives a loss of 1 whatever the prediction, so no gradient.
    """
    if form not in DICE_FORMS:
        raise ValueError(f"unknown dice form {form!r}; use one of {DICE_FORMS}")
    probs = upcast(logits).sigmoid().flatten(1)  # [Q, P]
    targets = targets.flatten(1).to(probs.dtype)
    intersection = 2 * (probs * targets).sum(-1)  # [Q]
    if form == "squared":
        loss = 1 - intersection / (probs.square().sum(-1) + targets.square().sum(-1) + eps)
    else:
        loss = 1 - (intersection + 1) / (probs.sum(-1) + targets.sum(-1) + 1)
    return loss.sum() / _num(num_masks, logits)


def bce_mask_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
    """logits [Q, P], targets [Q, P] -> scalar: per-mask mean BCE, summed, / num_masks."""
    logits = upcast(logits).flatten(1)
    loss = F.binary_cross_entropy_with_logits(logits, targets.flatten(1).to(logits.dtype), reduction="none")
    return loss.mean(1).sum() / _num(num_masks, logits)


def bce_dice_mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float | None = None,
    bce_weight: float = 5.0,
    dice_weight: float = 5.0,
) -> torch.Tensor:
    """Mask2Former's mask loss: 5 * BCE + 5 * dice (its default weights)."""
    return bce_weight * bce_mask_loss(logits, targets, num_masks) + dice_weight * dice_loss(logits, targets, num_masks)


def sigmoid_focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float, reduction: str = "sum"):
    """torchvision's sigmoid focal loss on fp32 logits (the classification losses of the dense models)."""
    logits = upcast(logits)
    return sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction=reduction)


def _num(num_masks: float | None, logits: torch.Tensor) -> float:
    return max(float(num_masks if num_masks is not None else logits.shape[0]), 1.0)
