"""SOLOv2 (Wang et al., NeurIPS 2020) on torch/torchvision ops, with the original defaults.

    per level P2..P6, resized to its S x S grid with two coordinate channels (CoordConv):
        category tower -> [N, C, S, S] class logits
        kernel tower   -> [N, E, S, S] a 1x1 mask kernel per cell
    unified mask-feature branch: P2..P5 to stride 4, P5 with coordinates: [N, E, H/4, W/4]

Assignment, losses, inference and the IUQ hookup are the SOLO family's (`iuq.models.solo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from iuq.models.dense import init_convs, prior_bias, tower
from iuq.models.solo import MaskFeatureBranch, SOLOConfig, SOLOFamily, coordinates, grid_inputs


@dataclass
class SOLOv2Config(SOLOConfig):
    """SOLOv2's head (`model.solov2`): the SOLO family's fields (`SOLOConfig`) and the towers.

    head_channels, head_convs: width and depth of the category and kernel towers (512, 4 in the
    R50 recipe).
    """

    section: ClassVar[str] = "solov2"
    head_channels: int = 512
    head_convs: int = 4

    def group_norm_fields(self) -> tuple[str, ...]:
        return (*super().group_norm_fields(), "head_channels")


class SOLOv2(SOLOFamily):
    """SOLOv2 behind iuq's base-model interface (`iuq.models.interface`, docs/design.md). Args as `CondInst`."""

    def __init__(self, model_cfg, num_classes: int, load_weights: bool = True):
        super().__init__(model_cfg, model_cfg.solov2, num_classes, load_weights)
        c = self.cfg
        if c.head_convs < 1:
            raise ValueError("model.solov2.head_convs: must be >= 1")
        self.cate_tower = tower(c.fpn_channels, c.head_channels, c.head_convs)
        self.kernel_tower = tower(c.fpn_channels + 2, c.head_channels, c.head_convs)
        self.cate_out = nn.Conv2d(c.head_channels, num_classes, 3, padding=1)
        self.kernel_out = nn.Conv2d(c.head_channels, c.kernel_channels, 3, padding=1)
        self.mask_features = MaskFeatureBranch(c.fpn_channels, c.mask_feature_channels, c.kernel_channels)
        init_convs([self.cate_tower, self.kernel_tower, self.cate_out, self.kernel_out, self.mask_features])
        nn.init.constant_(self.cate_out.bias, prior_bias(0.01))

    def _heads(self, images, pixel_mask) -> dict:
        feats = self.pyramid(self.backbone(self.normalise(images, pixel_mask)))  # P2..P6
        cate, kernels = [], []
        for x, s in zip(grid_inputs(feats), self.cfg.grids, strict=True):
            x = torch.cat([x, coordinates(x)], 1)
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)  # [N, C+2, S, S]
            kernels.append(self.kernel_out(self.kernel_tower(x)).flatten(2))  # [N, E, S*S]
            cate.append(self.cate_out(self.cate_tower(x[:, :-2])).flatten(2))  # [N, C, S*S]
        return {
            "cate": torch.cat(cate, 2).transpose(1, 2),  # [N, T, C], T = sum S^2
            "kernels": torch.cat(kernels, 2).transpose(1, 2),  # [N, T, E]
            "canvas": tuple(images.shape[-2:]),  # the padded batch's (H, W), where targets live
            "mask_feats": self.mask_features(feats[:4]),  # [N, E, H/4, W/4]
        }
