"""What the SOLO family (SOLOv2, SOTR) shares: grid assignment, the unified mask features, the
losses and the inference.

    image -> backbone -> FPN P2..P6 -> per level an S x S grid (S = 40, 36, 24, 16, 12) of
                 category logits [N, C, S, S] and 1x1 mask kernels [N, E, S, S] (the subclass's head)
          -> unified mask-feature branch (P2..P5 to stride 4): [N, E, H/4, W/4]
    a cell's mask = its kernel . mask features (a dynamic 1x1 conv), at stride 4

Assignment (`solo_targets`): an instance belongs to the levels whose scale range holds
sqrt(box w x box h); on each, the cells within its centre region (the centre of mass of its mask,
half-extents sigma/2 of the box, at most one cell from the centre cell) are its positives. Where
two instances claim a cell, the smaller one keeps it. Losses: focal on the categories / (positives
+ 1), and 3 x SOLO's squared dice on the positives' masks, averaged over positives. Inference:
2x2 local maxima above a score, scored by class x maskness, Matrix NMS.

For iuq: the queries are the positive cells' kernels, the pixel embeddings the unified mask
features, the decoder `DotProductDecoder` (a 1x1 dynamic conv), L_equi the same dice form (x 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from iuq.core.decoders import DotProductDecoder
from iuq.core.losses import dice_loss, sigmoid_focal
from iuq.core.sampling import downsample_masks
from iuq.models.dense import Assignment, DenseSegmenter, conv_norm_relu
from iuq.models.fcos import mask_centres
from iuq.models.matrix_nms import matrix_nms
from iuq.models.paste import low_res_prediction
from iuq.models.pyramid import Pyramid, build_backbone


@dataclass
class SOLOConfig:
    """What SOLOv2's and SOTR's heads share; defaults are the R50 recipes of both.

    fpn_channels: FPN width. kernel_channels: E, channels of the unified mask features = length of
    each 1x1 kernel. mask_feature_channels: width inside the mask-feature branch.
    grids: S per level P2..P6. scale_ranges: per level [lo, hi] of sqrt(box area) in input pixels.
    sigma: centre region's half-extent, as a fraction of half the box.
    focal_alpha, focal_gamma: category focal loss. dice_weight: weight of the dice mask loss.
    score_threshold, nms_pre, update_threshold, nms_sigma, mask_threshold: inference: category
        score to be a candidate, candidates kept for Matrix NMS (gaussian, sigma), the decayed score
        to stay, and the mask probability threshold.
    """

    section: ClassVar[str] = "solo"
    fpn_channels: int = 256
    kernel_channels: int = 256
    mask_feature_channels: int = 128
    grids: list[int] = field(default_factory=lambda: [40, 36, 24, 16, 12])
    scale_ranges: list[list[float]] = field(
        default_factory=lambda: [[1.0, 96.0], [48.0, 192.0], [96.0, 384.0], [192.0, 768.0], [384.0, 2048.0]]
    )
    sigma: float = 0.2
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_weight: float = 3.0
    score_threshold: float = 0.1
    nms_pre: int = 500
    update_threshold: float = 0.05
    nms_sigma: float = 2.0
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        key = f"model.{self.section}"
        if len(self.grids) != 5 or len(self.scale_ranges) != 5:
            raise ValueError(f"{key}.grids and {key}.scale_ranges: one entry per level P2..P6")
        for i, r in enumerate(self.scale_ranges):
            if len(r) != 2 or not r[0] <= r[1]:
                raise ValueError(f"{key}.scale_ranges[{i}]: expected [lo, hi] with lo <= hi, got {r}")
        for name in self.group_norm_fields():
            if getattr(self, name) % 32:
                raise ValueError(f"{key}.{name}: must be a multiple of 32 (GroupNorm), got {getattr(self, name)}")

    def group_norm_fields(self) -> tuple[str, ...]:
        return ("fpn_channels", "kernel_channels", "mask_feature_channels")


def solo_targets(
    boxes: torch.Tensor,
    masks: torch.Tensor,
    canvas: tuple[int, int],
    grids: list[int],
    ranges: list[list[float]],
    sigma: float = 0.2,
) -> list[torch.Tensor]:
    """One image's assignment: per level [S*S] instance index of each cell (row-major), -1 if none.

    boxes [K, 4] xyxy and masks [K, H, W] on the padded canvas (H, W) = `canvas`.

    Each instance in a level's scale range claims the cells of its centre region (sigma x its box
    around the mask's centre, at most one cell beyond the centre cell); larger instances are painted
    first, so where regions overlap the smaller one keeps the cell. Built with tensor ops on the
    boxes' device, without reading anything back per instance; the region bounds are taken in fp64,
    as Python floats would take them.
    """
    h, w = canvas
    device = boxes.device
    k = boxes.shape[0]
    if k == 0:
        return [torch.full((s * s,), -1, dtype=torch.long, device=device) for s in grids]
    centres = mask_centres(masks, boxes).double()  # [K, 2]
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]  # [K]
    size = (widths * heights).sqrt()  # [K]
    order = torch.argsort(size, descending=True)  # painting order: smaller instances last, they win
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=device)  # [K] position of each instance in that order
    cx, cy = centres[:, 0], centres[:, 1]
    half_w, half_h = 0.5 * sigma * widths.double(), 0.5 * sigma * heights.double()
    out = []
    for s, (lo, hi) in zip(grids, ranges, strict=True):
        inside = (size.double() >= lo) & (size.double() <= hi)  # [K]
        col, row = (cx / w * s).trunc().long(), (cy / h * s).trunc().long()  # the centre cells
        top = torch.maximum(((cy - half_h) / h * s).trunc().long(), row - 1).clamp(min=0)
        bottom = torch.minimum(((cy + half_h) / h * s).trunc().long(), row + 1).clamp(max=s - 1)
        left = torch.maximum(((cx - half_w) / w * s).trunc().long(), col - 1).clamp(min=0)
        right = torch.minimum(((cx + half_w) / w * s).trunc().long(), col + 1).clamp(max=s - 1)
        ys = torch.arange(s, device=device)[None, :, None]
        xs = torch.arange(s, device=device)[None, None, :]
        covers = (
            inside[:, None, None]
            & (ys >= top[:, None, None]) & (ys <= bottom[:, None, None])
            & (xs >= left[:, None, None]) & (xs <= right[:, None, None])
        )  # [K, S, S]  # fmt: skip
        last = torch.where(covers, rank[:, None, None], -1).amax(0)  # [S, S] the last painter of each cell
        cells = torch.where(last >= 0, order[last.clamp(min=0)], -1)
        out.append(cells.flatten())
    return out


def coordinates(x: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, 2, h, w] (x, y) in [-1, 1] (CoordConv's extra channels)."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy])[None].expand(n, -1, -1, -1)


def points_nms(heat: torch.Tensor) -> torch.Tensor:
    """[C, S, S] scores -> the same with every cell that is not a 2x2 local maximum set to 0."""
    peak = F.max_pool2d(heat[None], kernel_size=2, stride=1, padding=1)[0, :, :-1, :-1]
    return heat * (peak == heat)


def grid_inputs(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """P2..P6 -> the maps the grids are read from: P2 at P3's size and P6 at P5's (SOLO's `split_feats`)."""
    return [
        F.interpolate(feats[0], size=feats[1].shape[-2:], mode="bilinear", align_corners=False),
        feats[1],
        feats[2],
        feats[3],
        F.interpolate(feats[4], size=feats[3].shape[-2:], mode="bilinear", align_corners=False),
    ]


class MaskFeatureBranch(nn.Module):
    """P2..P5 -> [N, E, H/4, W/4]: level i passes i (conv, x2 upsample) stages (P2: one conv), P5 with
    two coordinate channels when `coords` (SOLOv2; SOTR's branch has none, its P5 is the transformed
    one); the sum goes through a 1x1 conv to E channels."""

    def __init__(self, in_channels: int, channels: int, out_channels: int, coords: bool = True):
        super().__init__()
        self.coords = coords
        self.levels = nn.ModuleList()
        for i in range(4):
            stages = [conv_norm_relu(in_channels + (2 if i == 3 and coords else 0), channels)]
            stages += [conv_norm_relu(channels, channels) for _ in range(max(i - 1, 0))]
            self.levels.append(nn.ModuleList(stages))
        self.out = nn.Sequential(
            nn.Conv2d(channels, out_channels, 1, bias=False), nn.GroupNorm(32, out_channels), nn.ReLU(inplace=True)
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        total = None
        for i, (stages, x) in enumerate(zip(self.levels, features[:4], strict=True)):
            if i == 3 and self.coords:
                x = torch.cat([x, coordinates(x)], 1)
            for stage in stages:
                x = stage(x)
                if i > 0:
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = F.interpolate(x, size=features[0].shape[-2:], mode="bilinear", align_corners=False) if i else x
            total = x if total is None else total + x
        return self.out(total)


class SOLOFamily(DenseSegmenter):
    """The SOLO-family half of the base-model interface (`iuq.models.interface`): this builds the
    backbone, the FPN P2..P6 and the dot-product decoder; a subclass builds its head, and its
    `_heads(images, pixel_mask)` returns `cate` [N, T, C] and `kernels` [N, T, E] over the T = sum S^2
    cells (levels in order, row-major), `mask_feats` [N, E, H/4, W/4] and `canvas` (H, W)."""

    stride = 4  # unified mask features
    head_strides = (8, 8, 16, 32, 32)  # P2 is read at P3's size and P6 at P5's, as in SOLOv2 and SOTR
    equi_upsample = 1  # the base loss is at the mask features' stride (4)

    def __init__(self, model_cfg, cfg: SOLOConfig, num_classes: int, load_weights: bool):
        super().__init__()
        self.cfg, self.num_classes, self.model_cfg = cfg, num_classes, model_cfg
        self.backbone = build_backbone(model_cfg, load_weights)
        self.pyramid = Pyramid(self.backbone.channels, cfg.fpn_channels, "p2-p6")
        self.decoder = DotProductDecoder()
        self.register_normalisation(model_cfg)

    def _heads(self, images: torch.Tensor, pixel_mask: torch.Tensor | None) -> dict:
        raise NotImplementedError

    @property
    def mask_loss_weight(self) -> float:
        return self.cfg.dice_weight

    @property
    def pixel_dim(self) -> int:
        return self.cfg.kernel_channels

    def cell_strides(self, device) -> torch.Tensor:
        """[T] the stride of each cell's level (inference drops masks smaller than it)."""
        return torch.cat(
            [torch.full((s * s,), st, device=device) for s, st in zip(self.cfg.grids, self.head_strides, strict=True)]
        )

    def mask_loss(self, logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
        """The SOLO family's mask loss, dice x 3, summed over masks, / num_masks, for the base loss and L_equi.
        The dice is SOLO's squared form, which adds 0.001 to each of sum(p^2) and sum(t^2)."""
        return self.cfg.dice_weight * dice_loss(logits, targets, num_masks, form="squared", eps=0.002)

    def decode(self, mask_feats: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """One image's mask features [E, h, w] and kernels [Q, E] -> logits [Q, h, w]."""
        e, h, w = mask_feats.shape
        return self.decoder(kernels, mask_feats.flatten(1).t()).reshape(-1, h, w)

    query_key = "kernels"  # each cell's 1x1 mask kernel

    def _assign(self, heads: dict, target: dict) -> Assignment:
        """`solo_targets` of one image on the canvas of the batch."""
        boxes = target["boxes"].to(heads["kernels"].device, torch.float32)
        canvas = heads["canvas"]
        cells = torch.cat(
            solo_targets(boxes, target["masks"], canvas, self.cfg.grids, self.cfg.scale_ranges, self.cfg.sigma)
        )  # [T]
        pos = (cells >= 0).nonzero()[:, 0]
        return Assignment(pos, cells[pos], cells)

    def _losses(self, heads, targets, assigned, queries, part) -> dict[str, torch.Tensor]:
        cells = [a.detail for a in assigned]
        labels = torch.cat([
            torch.where(c >= 0, t["labels"].to(c.device)[c.clamp(min=0)], -1) if len(t["labels"])
            else torch.full_like(c, -1)
            for c, t in zip(cells, targets, strict=True)
        ])  # fmt: skip
        logits = heads["cate"][part].flatten(0, 1)  # [B*T, C]
        pos = labels >= 0
        onehot = torch.zeros_like(logits)
        onehot[pos, labels[pos]] = 1
        num_pos = int(pos.sum())
        loss_cate = sigmoid_focal(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma) / (num_pos + 1)
        mask_feats = heads["mask_feats"]
        total = mask_feats.sum() * 0 + sum(q.sum() * 0 for q in queries)
        count = 0
        for i, q, a, t in zip(part, queries, assigned, targets, strict=True):
            if q.shape[0] == 0:
                continue
            g = a.instances
            pred = self.decode(mask_feats[i], q)  # [Q, h4, w4]
            target = downsample_masks(t["masks"][g.to(t["masks"].device)], pred.shape[-2:])
            total = total + self.mask_loss(pred, target, 1.0)
            count += q.shape[0]
        return {"loss_cate": loss_cate, "loss_mask": total / max(count, 1)}

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_instances(
        self, images: torch.Tensor, pixel_mask: torch.Tensor | None, sizes, orig_sizes, top_k: int = 100
    ) -> list[dict]:
        """Per image a prediction of `iuq.models.paste` (`scores` [N], `labels` [N], masks at stride 4): cells
        that are 2x2 local maxima above `score_threshold`, scored by class x maskness, the best
        `nms_pre`, Matrix NMS, those still above `update_threshold`, the best `top_k`."""
        c = self.cfg
        heads = self._heads(images, pixel_mask)
        cell_strides = self.cell_strides(images.device)
        results = []
        for i in range(images.shape[0]):
            probs, start = [], 0
            for s in c.grids:  # local maxima per level grid
                heat = heads["cate"][i, start : start + s * s].sigmoid().t().reshape(-1, s, s)
                probs.append(points_nms(heat).flatten(1).t())  # [S*S, C]
                start += s * s
            probs = torch.cat(probs)  # [T, C]
            cell, labels = (probs > c.score_threshold).nonzero(as_tuple=True)
            scores = probs[cell, labels]
            logits = self.decode(heads["mask_feats"][i], heads["kernels"][i, cell])  # [n, h4, w4]
            mask_p = logits.sigmoid()
            seg = mask_p > c.mask_threshold
            area = seg.flatten(1).sum(1).float()
            keep = area > cell_strides[cell]  # drop masks smaller than their level's stride
            maskness = (mask_p * seg).flatten(1).sum(1) / area.clamp(min=1)
            scores = (scores * maskness)[keep]
            logits, seg, labels = logits[keep], seg[keep], labels[keep]
            scores, order = scores.sort(descending=True)
            order = order[: c.nms_pre]
            scores, logits, seg, labels = scores[: c.nms_pre], logits[order], seg[order], labels[order]
            scores = matrix_nms(seg, labels, scores, "gaussian", c.nms_sigma)
            keep = scores >= c.update_threshold
            scores, logits, labels = scores[keep], logits[keep], labels[keep]
            scores, order = scores.sort(descending=True)
            order = order[:top_k]
            results.append(
                low_res_prediction(
                    logits[order], scores[:top_k], labels[order], self.stride, sizes[i], orig_sizes[i], c.mask_threshold
                )
            )
        return results
