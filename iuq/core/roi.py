"""IUQ for segmenters whose masks come from RoI features (QueryInst): the second decoder kind.

A pixel decoder (`iuq.core.decoders`) dots a query with flat pixels; an RoI mask head instead reads
a box's pooled features [C, S, S] and the query that generates its dynamic convolution, and it has
parameters of its own. The method keeps its meaning with boxes in place of pixels:

    L_inter (Eq. 5): q_n decoded on RoIs of *other* images' instances (their ground-truth boxes),
        every output pixel of q_n's class channel pushed toward 0. The memory is a queue of pooled
        RoI features (`PixelMemory` with one row per RoI, C*S*S wide).
    L_equi (Eq. 8): q_n^g (matched in the g-view, decoded there on its box b^g) decoded on the RoI
        g^-1(b^g) of f(I), the RoI grid mirrored when g flips, supervised with g(M) on b^g: the RoI
        of g(f(I)) at b^g, pooled from f(I) directly, so no feature map is resampled.

The head has parameters and BatchNorm: L_inter's pairs are decoded with the BatchNorm layers
normalising by their running statistics (a pair's logits do not depend on which other pairs share
its chunk, and negative pairs do not move the statistics the base loss keeps), each chunk under
activation checkpointing, so memory holds one chunk of pairs whatever the memory's size.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.utils.checkpoint import checkpoint
from torchvision.ops import roi_align

from iuq.core.losses import elementwise_toward_zero
from iuq.core.transforms import BatchTransform

# mmdetection's SingleRoIExtractor: a box of side sqrt(wh) reads level floor(log2(side / 56)),
# clamped to the pyramid (torchvision's LevelMapper is the same rule, but its MultiScaleRoIAlign
# pools with aligned=False; QueryInst pools with aligned=True).
FINEST_SCALE = 56.0


def roi_levels(boxes: torch.Tensor, num_levels: int) -> torch.Tensor:
    """boxes [R, 4] xyxy in input pixels -> [R] the pyramid level (0 = finest) each is pooled from."""
    side = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    return torch.floor(torch.log2(side / FINEST_SCALE + 1e-6)).clamp(0, num_levels - 1).long()


def pool_rois(
    levels: list[torch.Tensor],
    strides: list[int],
    boxes: torch.Tensor,
    image_index: torch.Tensor,
    size: int,
    level_boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoIAlign (aligned, sampling ratio 2) of boxes [R, 4] (input pixels) on the images `image_index`
    [R] of pyramid `levels` ([N, C, h_l, w_l], finest first, at `strides`) -> [R, C, size, size].
    `level_boxes` (default `boxes`) decides each box's level."""
    c = levels[0].shape[1]
    out = levels[0].new_zeros((boxes.shape[0], c, size, size))
    if boxes.shape[0] == 0:
        return out
    which = roi_levels(boxes if level_boxes is None else level_boxes, len(levels))
    rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], 1)  # [R, 5]
    for lvl, (feat, stride) in enumerate(zip(levels, strides, strict=True)):
        at = (which == lvl).nonzero()[:, 0]
        if at.numel():
            pooled = roi_align(feat, rois[at].to(feat.dtype), size, 1.0 / stride, sampling_ratio=2, aligned=True)
            out = out.index_put((at,), pooled.to(out.dtype))
    return out


def inverse_boxes(g: BatchTransform, boxes: torch.Tensor, index: torch.Tensor, canvas: tuple[int, int]):
    """g-view boxes [R, 4] (pixels of the (H, W) canvas) of images `index` [R] -> (the boxes g^-1(b)
    in the original view [R, 4], xyxy with x1 <= x2, and [R] bool: whether g mirrors x there)."""
    h, w = canvas
    norm = boxes.new_tensor([w, h, w, h])
    scale, offset = g.scale[index].to(boxes.dtype), g.offset[index].to(boxes.dtype)  # [R, 2]
    p1 = (boxes[:, :2] / norm[:2]) * scale + offset  # source = scale * output + offset
    p2 = (boxes[:, 2:] / norm[:2]) * scale + offset
    out = torch.cat([torch.minimum(p1, p2), torch.maximum(p1, p2)], 1) * norm
    return out, scale[:, 0] < 0


def equivariance_rois(
    levels: list[torch.Tensor],
    strides: list[int],
    g: BatchTransform,
    boxes_g: torch.Tensor,
    index: torch.Tensor,
    canvas: tuple[int, int],
    size: int,
) -> torch.Tensor:
    """The RoI of g(f(I)) at each g-view box boxes_g [R, 4] of image `index` [R], pooled from the
    original view's `levels` at g^-1(b) and mirrored where g flips: [R, C, size, size]."""
    src, flipped = inverse_boxes(g, boxes_g, index, canvas)
    feats = pool_rois(levels, strides, src, index, size)
    return torch.where(flipped[:, None, None, None], feats.flip(-1), feats)


def roi_mask_targets(masks: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """masks [R, H, W] bool, each instance's full mask, boxes [R, 4] -> [R, size, size] bool: the mask
    cropped to the box and resized, averaged by RoIAlign and thresholded at 0.5 (mmdetection's
    `BitmapMasks.crop_and_resize`)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, size, size))
    rois = torch.cat([torch.arange(masks.shape[0], device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    pooled = roi_align(masks[:, None].float(), rois.float().to(masks.device), size, 1.0, sampling_ratio=0, aligned=True)
    return pooled[:, 0] >= 0.5


class RoIDecoder(Protocol):
    """(queries [n, d], RoI features [n, C, S, S], classes [n]) -> mask logits [n, M, M] on each
    query's class channel; `mask_size` is M.

    norm: how the head's normalisation layers treat the call. None (L_equi, a batch of positives
    like the base loss's): as in training. Otherwise (L_inter) the model's own record of how this
    step's base mask loss normalised its RoIs (QueryInst: its output head's `roi_norm`), so that
    other images' RoIs are decoded under the same normalisation as the base loss, with gradient
    through it, and running statistics stay the base loss's."""

    mask_size: int

    def __call__(
        self, queries: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, norm: object = None
    ) -> torch.Tensor: ...


def roi_pairs(
    query_ids: torch.Tensor, roi_ids: torch.Tensor, per_query: int | None, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query index, RoI index) of the pairs L_inter decodes: every RoI of another image, or at most
    `per_query` of them drawn uniformly without replacement for each query."""
    valid = query_ids[:, None] != roi_ids[None, :]  # [N, R]
    if per_query is not None and per_query < roi_ids.shape[0]:
        keys = torch.rand(valid.shape, generator=generator, device=generator.device if generator else valid.device)
        keys = keys.to(valid.device)
        keys = torch.where(valid, keys, torch.full_like(keys, 2.0))  # invalid pairs sort last
        order = keys.argsort(1)[:, :per_query]  # [N, k]
        keep = torch.gather(valid, 1, order)
        q = torch.arange(query_ids.shape[0], device=valid.device)[:, None].expand_as(order)
        return q[keep], order[keep]
    q, r = valid.nonzero(as_tuple=True)
    return q, r


def roi_inter_scene_loss(
    queries: torch.Tensor,
    query_ids: torch.Tensor,
    query_labels: torch.Tensor,
    rois: torch.Tensor,
    roi_ids: torch.Tensor,
    decoder: RoIDecoder,
    loss: str = "focal",
    alpha: float = 0.25,
    gamma: float = 2.0,
    chunk_pairs: int = 256,
    per_query: int | None = None,
    generator: torch.Generator | None = None,
    query_stages: torch.Tensor | None = None,
    *,
    norm: object,
) -> torch.Tensor:
    """Eq. 5 for an RoI mask head: the mean over pairs (q_n, RoI of another image) and over the M x M
    output pixels of q_n's class channel of the loss toward 0.

    queries [N, d] (with grad), query_ids [N] source image ids, query_labels [N] classes; rois
    [R, C, S, S] pooled features of other instances, roi_ids [R]. Pairs are decoded `chunk_pairs` at
    a time, under activation checkpointing when there is more than one chunk (the decoder's
    parameters get their gradient too). query_stages [N]: the stage whose head decodes each query
    (a decoder with stages; None: its default head). norm: the decoder's L_inter normalisation
    (`RoIDecoder`), not None.
    """
    if norm is None:
        raise ValueError(
            "roi_inter_scene_loss: norm is None, which would decode other images' RoIs in training mode "
            "(BatchNorm statistics of the pairs, running statistics updated by L_inter); pass the model "
            "output's head['roi_norm']"
        )
    q_idx, r_idx = roi_pairs(query_ids, roi_ids, per_query, generator)
    zero = queries.sum() * 0
    if q_idx.numel() == 0:
        return zero

    def chunk_loss(q: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, stages) -> torch.Tensor:
        extra = {} if stages is None else {"stages": stages}
        logits = decoder(q, feats, labels, norm=norm, **extra)  # [n, M, M]
        return elementwise_toward_zero(logits.float(), loss, alpha, gamma).sum()

    total, count = zero, 0
    for start in range(0, q_idx.numel(), chunk_pairs):
        qi, ri = q_idx[start : start + chunk_pairs], r_idx[start : start + chunk_pairs]
        feats = rois[ri.to(rois.device)].to(queries.dtype)
        stages = None if query_stages is None else query_stages[qi]
        if q_idx.numel() <= chunk_pairs:  # one chunk: nothing to save by recomputing it
            part = chunk_loss(queries[qi], feats, query_labels[qi], stages)
        else:
            part = checkpoint(chunk_loss, queries[qi], feats, query_labels[qi], stages, use_reentrant=False)
        total = total + part
        count += qi.numel()
    return total / (count * decoder.mask_size**2)


def roi_inter_scene_loss_naive(queries, query_ids, query_labels, rois, roi_ids, decoder, loss="focal",
                               alpha=0.25, gamma=2.0, query_stages=None, *, norm) -> torch.Tensor:  # fmt: skip
    """Every pair at once with plain autograd: the reference the chunked loss is tested against."""
    q, r = (query_ids[:, None] != roi_ids[None, :]).nonzero(as_tuple=True)
    extra = {} if query_stages is None else {"stages": query_stages[q]}
    logits = decoder(queries[q], rois[r].to(queries.dtype), query_labels[q], norm=norm, **extra)
    return elementwise_toward_zero(logits.float(), loss, alpha, gamma).mean()
