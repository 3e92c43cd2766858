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
import torch.nn.functional as F

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
    upsample: int = 1,
    query_groups: list[torch.Tensor] | None = None,
    stopgrad: str = "none",
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
        upsample: the base loss's mask grid is this many times finer than the embeddings' (CondInst:
            2, stride 8 -> 4): the logits are upsampled bilinearly to it and the targets taken there,
            by the base loss's rule (majority vote per cell).
        query_groups: B tensors [Q_i], the instance each query is matched to: the queries of one
            instance are averaged first (`iuq.query_reduction: instance`), and `num_masks` then counts
            instances. None: every query counts once.
        stopgrad: "none", "features" (g(f(I)) is a constant) or "queries" (q^g is a constant).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown equivariance variant {variant!r}; use one of {VARIANTS}")
    if stopgrad not in ("none", "features", "queries"):
        raise ValueError(f"unknown equivariance stop-gradient {stopgrad!r}; use 'none', 'features' or 'queries'")
    zero = pixel_embeddings.sum() * 0 + sum(q.sum() * 0 for q in queries_g)
    if variant == "augmentation":
        return zero
    if stopgrad == "features":
        pixel_embeddings = pixel_embeddings.detach()
    elif stopgrad == "queries":
        queries_g = [q.detach() for q in queries_g]
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
    if num_masks is not None:
        norm = num_masks
    elif query_groups is not None:
        norm = max(sum(int(torch.unique(x).numel()) for x in query_groups), 1)
    else:
        norm = total_q
    xy = grid_xy(h, w, pixel_embeddings.device)  # [h*w, 2]
    out_size = (h * upsample, w * upsample)
    loss = zero
    for i in range(b):
        if queries_g[i].shape[0] == 0:
            continue
        pixels = g_of_f[i].flatten(1).t()  # [h*w, D]
        qxy = query_xy_g[i] if query_xy_g is not None else None
        logits = decoder(queries_g[i], pixels, xy, qxy).reshape(-1, h, w)  # [Q_i, h, w]
        if upsample != 1:
            logits = F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=False)[0]
        targets = downsample_masks(target_masks_g[i], out_size).flatten(1)  # [Q_i, h'*w']
        logits = logits.flatten(1)
        if query_groups is None:
            loss = loss + mask_loss(logits, targets, norm)
            continue
        groups = query_groups[i].to(logits.device)
        for k in torch.unique(groups).tolist():  # an instance: the mean over its queries
            rows = (groups == k).nonzero()[:, 0]
            loss = loss + mask_loss(logits[rows], targets[rows], norm * rows.numel())
    return loss
