"""SOTR (Guo et al., ICCV 2021) on torch ops, after the released code's defaults (easton-cau/SOTR).

    image -> backbone -> FPN P2..P6
    per level, the map resized to its S x S grid -> one twin transformer shared by every level
        -> linear layers: category logits [N, C, S, S] and a 1x1 mask kernel per cell [N, E, S, S]
    the same transformer on the whole P5 -> the unified mask-feature branch reads P2, P3, P4 and
        the transformed P5 (no coordinate channels) -> [N, E, H/4, W/4]
    a cell's mask = its kernel . mask features, at stride 4

The twin transformer (`TwinTransformer`): `depth` blocks, each
    x <- x + g1 * column_attention(x) + g2 * row_attention(x)
    x <- x + g3 * ff1(x) + g4 * ff2(x),        ff = conv3x3 -> LeakyReLU -> conv3x3
with ReZero gates g (scalars that start at 0, so the transformer starts as the identity) and no
normalisation layer. Row attention is multi-head self-attention among the cells of one row, column
attention among the cells of one column. The released default adds no positional embedding; nor
does this one.

Assignment, losses (3 x squared dice, focal / (positives + 1)), Matrix NMS inference and the IUQ
hookup (queries = kernels of the positive cells, pixel embeddings = the mask features, a dot-product
decoder) are the SOLO family's (`iuq.models.solo`).

Deviations from the released code, each deliberate:
- The released forward concatenates the input with itself along the width and averages the two
  halves at the end (a remnant of its reversible-network option). Attention over duplicated keys
  equals attention over the originals, so the only effect is at the seam, where the 3x3 convs of
  the feed-forward see the other copy's edge instead of zero padding; we run the map once.
- Attention is `torch.nn.functional.scaled_dot_product_attention` (the released code spells out
  softmax(q k^T / sqrt(e)) v; same function, fused kernel).
- The FPN is torchvision's `FeaturePyramidNetwork` with P6 by subsampling P5 (detectron2's), and the
  backbone any of `iuq.models.pyramid`'s.
- The stride-4 mask targets are a majority vote of the full-resolution mask per cell
  (`downsample_masks`, as for SOLOv2); the released code rescales the bitmaps with mmcv's
  `imrescale`.
- The focal loss's normaliser (positives + 1) and the dice mean over positives are taken per view
  of IUQ's batch (`iuq.models.dense`); with IUQ off there is one view and they are the released ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from iuq.models.dense import init_convs, prior_bias
from iuq.models.solo import MaskFeatureBranch, SOLOConfig, SOLOFamily, grid_inputs


@dataclass
class SOTRConfig(SOLOConfig):
    """SOTR's head (`model.sotr`): the SOLO family's fields (`SOLOConfig`, whose `fpn_channels` is also
    the transformer's width) and the twin transformer's.

    depth: twin blocks (12 in the R50 recipe). heads: attention heads (8); must divide fpn_channels.
    """

    section: ClassVar[str] = "sotr"
    depth: int = 12
    heads: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 1:
            raise ValueError(f"model.sotr.depth: must be >= 1, got {self.depth}")
        if self.heads < 1 or self.fpn_channels % self.heads:
            raise ValueError(
                f"model.sotr.heads: must divide model.sotr.fpn_channels ({self.fpn_channels}), got {self.heads}"
            )


class AxialAttention(nn.Module):
    """Multi-head self-attention along one axis of a map: [N, D, H, W] -> [N, D, H, W].

    axis "row": each row's W cells attend to each other; "column": each column's H cells. Queries,
    keys and values are bias-free linear maps, the output map has a bias (as the released code)."""

    def __init__(self, dim: int, heads: int, axis: str):
        super().__init__()
        if axis not in ("row", "column"):
            raise ValueError(f"axis: 'row' or 'column', got {axis!r}")
        self.heads, self.axis = heads, axis
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d, h, w = x.shape
        # Sequences on the last-but-one axis: rows -> [N, H, W, D], columns -> [N, W, H, D].
        seq = x.permute(0, 2, 3, 1) if self.axis == "row" else x.permute(0, 3, 2, 1)
        outer, length = seq.shape[1], seq.shape[2]
        seq = seq.reshape(n * outer, length, d)  # [B, L, D]
        q = self.to_q(seq)
        k, v = self.to_kv(seq).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, d // self.heads)).transpose(1, 2) for t in (q, k, v))  # [B, h, L, e]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B, L, D]
        out = self.to_out(out).reshape(n, outer, length, d)
        return out.permute(0, 3, 1, 2) if self.axis == "row" else out.permute(0, 3, 2, 1)


class ReZero(nn.Module):
    """fn(x) times a learnt scalar that starts at 0 (Bachlechner et al., 2020)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) * self.gate


def feed_forward(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1), nn.LeakyReLU(inplace=True), nn.Conv2d(dim, dim, 3, padding=1)
    )


class TwinBlock(nn.Module):
    """Column and row attention in parallel, then two feed-forward branches in parallel, each gated."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.column = ReZero(AxialAttention(dim, heads, "column"))
        self.row = ReZero(AxialAttention(dim, heads, "row"))
        self.ff1 = ReZero(feed_forward(dim))
        self.ff2 = ReZero(feed_forward(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.column(x) + self.row(x)
        return x + self.ff1(x) + self.ff2(x)


class TwinTransformer(nn.Module):
    """[N, D, H, W] -> [N, D, H, W] through `depth` twin blocks."""

    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        self.blocks = nn.Sequential(*[TwinBlock(dim, heads) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class SOTR(SOLOFamily):
    """SOTR behind iuq's base-model interface (`iuq.models.interface`, docs/design.md). Args as `CondInst`."""

    def __init__(self, model_cfg, num_classes: int, load_weights: bool = True):
        super().__init__(model_cfg, model_cfg.sotr, num_classes, load_weights)
        c = self.cfg
        self.transformer = TwinTransformer(c.fpn_channels, c.depth, c.heads)
        self.cate_out = nn.Linear(c.fpn_channels, num_classes)
        self.kernel_out = nn.Linear(c.fpn_channels, c.kernel_channels)
        self.mask_features = MaskFeatureBranch(c.fpn_channels, c.mask_feature_channels, c.kernel_channels, coords=False)
        init_convs([self.mask_features])  # the transformer and the linear layers keep torch's init
        nn.init.constant_(self.cate_out.bias, prior_bias(0.01))

    def _heads(self, images, pixel_mask) -> dict:
        feats = self.pyramid(self.backbone(self.normalise(images, pixel_mask)))  # P2..P6
        cate, kernels = [], []
        for x, s in zip(grid_inputs(feats), self.cfg.grids, strict=True):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)  # [N, D, S, S]
            cells = self.transformer(x).flatten(2).transpose(1, 2)  # [N, S*S, D]
            cate.append(self.cate_out(cells))  # [N, S*S, C]
            kernels.append(self.kernel_out(cells))  # [N, S*S, E]
        mask_in = [feats[0], feats[1], feats[2], self.transformer(feats[3])]
        return {
            "cate": torch.cat(cate, 1),  # [N, T, C], T = sum S^2
            "kernels": torch.cat(kernels, 1),  # [N, T, E]
            "canvas": tuple(images.shape[-2:]),  # the padded batch's (H, W), where targets live
            "mask_feats": self.mask_features(mask_in),  # [N, E, H/4, W/4]
        }
