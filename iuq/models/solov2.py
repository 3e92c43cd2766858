"""SOLOv2 (Wang et al., NeurIPS 2020) on torch/torchvision ops, with the original defaults.

    image -> backbone -> FPN P2..P6 -> per level, resized to an S x S grid (S = 40, 36, 24, 16, 12):
                 category branch: [N, C, S, S] class logits
                 kernel branch (CoordConv input): [N, E, S, S] a 1x1 mask kernel per cell
          -> unified mask-feature branch (P2..P5 to stride 4, P5 with coordinates): [N, E, H/4, W/4]
    a cell's mask = its kernel . mask features (a dynamic 1x1 conv), at stride 4

Assignment (`solo_targets`): an instance belongs to the levels whose scale range holds
sqrt(box w x box h); on each, the cells within its centre region (the centre of mass of its mask,
half-extents sigma/2 of the box, at most one cell from the centre cell) are its positives. Where
two instances claim a cell, the smaller one keeps it.

For iuq: the queries are the positive cells' kernels, the pixel embeddings the unified mask
features, the decoder `DotProductDecoder` (a 1x1 dynamic conv), L_equi the dice form (weight 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from iuq.core.decoders import DotProductDecoder
from iuq.core.losses import dice_loss
from iuq.core.sampling import downsample_masks
from iuq.models.dense import (
    DenseSegmenter,
    conv_norm_relu,
    per_view_losses,
    prior_bias,
    tower,
)
from iuq.models.fcos import mask_centres
from iuq.models.interface import SegmenterOutput
from iuq.models.matrix_nms import matrix_nms
from iuq.models.paste import low_res_prediction
from iuq.models.pyramid import Pyramid, build_backbone


@dataclass
class SOLOv2Config:
    """SOLOv2's head (`model.solov2`); defaults are the paper's R50 recipe.

    fpn_channels: FPN width. head_channels, head_convs: the category and kernel towers.
    kernel_channels: E, channels of the unified mask features = length of each 1x1 kernel.
    mask_feature_channels: width inside the mask-feature branch.
    grids: S per level P2..P6. scale_ranges: per level [lo, hi] of sqrt(box area) in input pixels.
    sigma: centre region's half-extent, as a fraction of half the box.
    focal_alpha, focal_gamma: category focal loss. dice_weight: weight of the dice mask loss.
    score_threshold, nms_pre, update_threshold, nms_sigma, mask_threshold: inference: category
        score to be a candidate, candidates kept for Matrix NMS (gaussian, sigma), the decayed score
        to stay, and the mask probability threshold.
    """

    fpn_channels: int = 256
    head_channels: int = 512
    head_convs: int = 4
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
        if len(self.grids) != 5 or len(self.scale_ranges) != 5:
            raise ValueError("model.solov2.grids and model.solov2.scale_ranges: one entry per level P2..P6")
        for i, r in enumerate(self.scale_ranges):
            if len(r) != 2 or not r[0] <= r[1]:
                raise ValueError(f"model.solov2.scale_ranges[{i}]: expected [lo, hi] with lo <= hi, got {r}")
        for name in ("fpn_channels", "head_channels", "kernel_channels", "mask_feature_channels"):
            if getattr(self, name) % 32:
                raise ValueError(
                    f"model.solov2.{name}: must be a multiple of 32 (GroupNorm), got {getattr(self, name)}"
                )


def solo_targets(
    boxes: torch.Tensor,
    masks: torch.Tensor,
    canvas: tuple[int, int],
    grids: list[int],
    ranges: list[list[float]],
    sigma: float = 0.2,
) -> list[torch.Tensor]:
    """One image's assignment: per level [S*S] instance index of each cell (row-major), -1 if none.

    boxes [K, 4] xyxy and masks [K, H, W] on the padded canvas (H, W) = `canvas`."""
    h, w = canvas
    device = boxes.device
    centres = mask_centres(masks, boxes)  # [K, 2]
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()  # [K]
    order = torch.argsort(size, descending=True).tolist()  # smaller instances assigned last: they win
    out = []
    for s, (lo, hi) in zip(grids, ranges, strict=True):
        cells = torch.full((s, s), -1, dtype=torch.long, device=device)
        for k in order:
            if not lo <= float(size[k]) <= hi:
                continue
            cx, cy = float(centres[k, 0]), float(centres[k, 1])
            half_w = 0.5 * sigma * float(boxes[k, 2] - boxes[k, 0])
            half_h = 0.5 * sigma * float(boxes[k, 3] - boxes[k, 1])
            col, row = int(cx / w * s), int(cy / h * s)  # the centre cell
            top = max(int((cy - half_h) / h * s), row - 1, 0)
            bottom = min(int((cy + half_h) / h * s), row + 1, s - 1)
            left = max(int((cx - half_w) / w * s), col - 1, 0)
            right = min(int((cx + half_w) / w * s), col + 1, s - 1)
            cells[top : bottom + 1, left : right + 1] = k
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


class MaskFeatureBranch(nn.Module):
    """P2..P5 -> [N, E, H/4, W/4]: level i passes i (conv, x2 upsample) stages (P2: one conv), P5 with
    two coordinate channels; the sum goes through a 1x1 conv to E channels."""

    def __init__(self, in_channels: int, channels: int, out_channels: int):
        super().__init__()
        self.levels = nn.ModuleList()
        for i in range(4):
            stages = [conv_norm_relu(in_channels + (2 if i == 3 else 0), channels)]
            stages += [conv_norm_relu(channels, channels) for _ in range(max(i - 1, 0))]
            self.levels.append(nn.ModuleList(stages))
        self.out = nn.Sequential(
            nn.Conv2d(channels, out_channels, 1, bias=False), nn.GroupNorm(32, out_channels), nn.ReLU(inplace=True)
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        total = None
        for i, (stages, x) in enumerate(zip(self.levels, features[:4], strict=True)):
            if i == 3:
                x = torch.cat([x, coordinates(x)], 1)
            for stage in stages:
                x = stage(x)
                if i > 0:
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = F.interpolate(x, size=features[0].shape[-2:], mode="bilinear", align_corners=False) if i else x
            total = x if total is None else total + x
        return self.out(total)


class SOLOv2(DenseSegmenter):
    """SOLOv2 behind iuq's base-model interface (`iuq.models.interface`, docs/design.md). Args as `CondInst`."""

    stride = 4  # unified mask features
    head_strides = (8, 8, 16, 32, 32)  # P2 is read at P3's size and P6 at P5's, as in SOLOv2

    def __init__(self, model_cfg, num_classes: int, load_weights: bool = True):
        super().__init__()
        c = model_cfg.solov2
        self.cfg, self.num_classes, self.model_cfg = c, num_classes, model_cfg
        self.backbone = build_backbone(model_cfg, load_weights)
        self.pyramid = Pyramid(self.backbone.channels, c.fpn_channels, "p2-p6")
        if c.head_convs < 1:
            raise ValueError("model.solov2.head_convs: must be >= 1")
        self.cate_tower = tower(c.fpn_channels, c.head_channels, c.head_convs)
        self.kernel_tower = tower(c.fpn_channels + 2, c.head_channels, c.head_convs)
        self.cate_out = nn.Conv2d(c.head_channels, num_classes, 3, padding=1)
        self.kernel_out = nn.Conv2d(c.head_channels, c.kernel_channels, 3, padding=1)
        self.mask_features = MaskFeatureBranch(c.fpn_channels, c.mask_feature_channels, c.kernel_channels)
        self.decoder = DotProductDecoder()
        heads = [self.cate_tower, self.kernel_tower, self.cate_out, self.kernel_out, self.mask_features]
        for layer in (m for head in heads for m in head.modules()):
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        nn.init.constant_(self.cate_out.bias, prior_bias(0.01))
        self.register_buffer("mean", torch.tensor(model_cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(model_cfg.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def mask_loss_weight(self) -> float:
        return self.cfg.dice_weight

    @property
    def pixel_dim(self) -> int:
        return self.cfg.kernel_channels

    equi_upsample = 1  # the base loss is at the mask features' stride (4)

    def mask_loss(self, logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
        """SOLOv2's mask loss, dice x 3, summed over masks, / num_masks, for the base loss and L_equi.
        The dice is SOLO's squared form, which adds 0.001 to each of sum(p^2) and sum(t^2)."""
        return self.cfg.dice_weight * dice_loss(logits, targets, num_masks, form="squared", eps=0.002)

    def _heads(self, images, pixel_mask) -> dict:
        feats = self.pyramid(self.backbone(self.normalise(images, pixel_mask)))  # P2..P6
        read = [
            F.interpolate(feats[0], size=feats[1].shape[-2:], mode="bilinear", align_corners=False),
            feats[1],
            feats[2],
            feats[3],
            F.interpolate(feats[4], size=feats[3].shape[-2:], mode="bilinear", align_corners=False),
        ]
        cate, kernels = [], []
        for x, s in zip(read, self.cfg.grids, strict=True):
            x = torch.cat([x, coordinates(x)], 1)
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)  # [N, C+2, S, S]
            kernels.append(self.kernel_out(self.kernel_tower(x)).flatten(2))  # [N, E, S*S]
            cate.append(self.cate_out(self.cate_tower(x[:, :-2])).flatten(2))  # [N, C, S*S]
        return {
            "cate": torch.cat(cate, 2).transpose(1, 2),  # [N, T, C], T = sum S^2
            "kernels": torch.cat(kernels, 2).transpose(1, 2),  # [N, T, E]
            "mask_feats": self.mask_features(feats[:4]),  # [N, E, H/4, W/4]
            "cell_stride": torch.cat(
                [
                    torch.full((s * s,), st, device=images.device)
                    for s, st in zip(self.cfg.grids, self.head_strides, strict=True)
                ]
            ),  # fmt: skip
        }

    def decode(self, mask_feats: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """One image's mask features [E, h, w] and kernels [Q, E] -> logits [Q, h, w]."""
        e, h, w = mask_feats.shape
        return self.decoder(kernels, mask_feats.flatten(1).t()).reshape(-1, h, w)

    def forward(
        self,
        images: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        targets: list[dict] | None = None,
        views: int = 1,
        view_loss: tuple[bool, ...] | None = None,
    ) -> SegmenterOutput:
        """As `CondInst.forward`."""
        n = images.shape[0]
        if n % views:
            raise ValueError(f"a batch of {n} images does not split into {views} views")
        heads = self._heads(images, pixel_mask)
        mask_feats = heads["mask_feats"]
        if targets is None:
            return SegmenterOutput(None, {}, None, mask_feats, self.stride, head=heads)
        view_loss = tuple(view_loss) if view_loss is not None else (True,) * views
        t_cells = heads["cate"].shape[1]
        canvas = tuple(images.shape[-2:])
        cells, rows, gts = [], [], []
        for i, t in enumerate(targets):
            boxes = t["boxes"].to(images.device, torch.float32)
            c = torch.cat(
                solo_targets(boxes, t["masks"], canvas, self.cfg.grids, self.cfg.scale_ranges, self.cfg.sigma)
            )
            cells.append(c)  # [T]
            pos = (c >= 0).nonzero()[:, 0]
            rows.append(i * t_cells + pos)
            gts.append(c[pos])
        query_states = heads["kernels"].reshape(-1, heads["kernels"].shape[-1])[torch.cat(rows)]  # [sum Q_i, E]
        queries = list(query_states.split([len(g) for g in gts]))

        def losses_of_view(part):
            pick = [[x[i] for i in part] for x in (targets, cells, queries, gts)]
            return self._losses(heads, *pick, part)

        loss, terms, losses = per_view_losses(views, n // views, view_loss, losses_of_view)
        return SegmenterOutput(loss, terms, losses, mask_feats, self.stride, queries, gts, query_states, head=heads)

    def _losses(self, heads, targets, cells, queries, gts, part) -> dict[str, torch.Tensor]:
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
        loss_cate = sigmoid_focal_loss(
            logits, onehot, alpha=self.cfg.focal_alpha, gamma=self.cfg.focal_gamma, reduction="sum"
        ) / (num_pos + 1)
        mask_feats = heads["mask_feats"]
        total = mask_feats.sum() * 0 + sum(q.sum() * 0 for q in queries)
        count = 0
        for i, q, g, t in zip(part, queries, gts, targets, strict=True):
            if q.shape[0] == 0:
                continue
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
            keep = area > heads["cell_stride"][cell]  # drop masks smaller than their level's stride
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
