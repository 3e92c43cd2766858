"""Transformation equivariance, Eq. 8 (and the variants of Table 4d).

For each image I and its transformed view g(I), the matched queries of the *transformed* view
q^g_n are decoded on the transformed pixel embeddings of the *original* view, g(f(I)), and
supervised with the transformed ground truth g(M):

    L_equi = mask_loss(<q^g_n, g(f(I))>, g(M_sigma(n)))

The gradient reaches both the queries and f(I) through the (differentiable) resampling g. The
caller multiplies the result by lambda (3 in the paper, `IUQConfig.equi_weight`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from iuq.core.sampling import downsample_masks, grid_xy
from iuq.core.transforms import BatchTransform

VARIANTS = ("full", "feature", "augmentation")


def equivariance_loss(
    queries_g: list[torch.Tensor],
    target_masks_g: list[torch.Tensor],
    pixel_embeddings: torch.Tensor,
    g: BatchTransform,
    decoder,
    mask_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
    variant: str = "full",
    pixel_embeddings_g: torch.Tensor | None = None,
    valid_g: torch.Tensor | None = None,
    query_xy_g: list[torch.Tensor] | None = None,
    num_masks: float | None = None,
) -> torch.Tensor:
    """Equivariance objective of one batch.

    Args:
        queries_g: B tensors [Q_i, d], matched queries of g(I_i) (with grad).
        target_masks_g: B tensors [Q_i, H, W] bool, g(M) of each query's matched instance at
            image resolution (the targets the base loss used on the g-view).
        pixel_embeddings: [B, D, h, w] f(I) of the original views (with grad).
        g: the transforms that made the g-views.
        decoder: <q, I> on flat pixels.
        mask_loss: the base model's mask loss, (logits [Q, P], targets [Q, P], num_masks) -> scalar.
        variant: "full" (Eq. 8), "feature" (Eq. 6 only: mean squared error between f(g(I)) and
            g(f(I)) over valid pixels; needs `pixel_embeddings_g` [B, D, h, w]) or "augmentation"
            (no equivariance term: the g-views are only extra samples; returns a connected zero).
        valid_g: [B, h, w] bool valid (non-padding) cells of the g-view embeddings, for "feature".
        query_xy_g: B tensors [Q_i, 2 or 3] for decoders that use coordinates.
        num_masks: normaliser of the mask loss (default: total number of queries, at least 1).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown equivariance variant {variant!r}; use one of {VARIANTS}")
    zero = pixel_embeddings.sum() * 0 + sum(q.sum() * 0 for q in queries_g)
    if variant == "augmentation":
        return zero
    b, d, h, w = pixel_embeddings.shape
    g_of_f = g.apply(pixel_embeddings)  # [B, D, h, w] = g(f(I))
    if variant == "feature":
        if pixel_embeddings_g is None:
            raise ValueError("the 'feature' equivariance variant needs pixel_embeddings_g = f(g(I))")
        sq = (pixel_embeddings_g - g_of_f).square().mean(1)  # [B, h, w]
        if valid_g is None:
            return sq.mean()
        return (sq * valid_g).sum() / valid_g.sum().clamp(min=1)
    total_q = sum(q.shape[0] for q in queries_g)
    if total_q == 0:
        return zero
    norm = num_masks if num_masks is not None else total_q
    xy = grid_xy(h, w, pixel_embeddings.device)  # [h*w, 2]
    loss = zero
    for i in range(b):
        if queries_g[i].shape[0] == 0:
            continue
        pixels = g_of_f[i].flatten(1).t()  # [h*w, D]
        qxy = query_xy_g[i] if query_xy_g is not None else None
        logits = decoder(queries_g[i], pixels, xy, qxy)  # [Q_i, h*w]
        targets = downsample_masks(target_masks_g[i], (h, w)).flatten(1)  # [Q_i, h*w]
        loss = loss + mask_loss(logits, targets, norm)
    return loss
