"""CondInst (Tian, Shen & Chen, ECCV 2020) with AdelaiDet's defaults, on torch/torchvision ops.

    image -> backbone -> FPN P3..P7 -> FCOS head per level: classes, box distances, centerness,
                                        and 169 dynamic mask parameters per location (controller)
                      -> mask branch (P3 + P4 + P5 at stride 8) -> 8-channel mask features
    a positive location's mask = dynamic head(its 169 parameters, [relative coords, mask features])
                                 at stride 8, upsampled to stride 4

The dynamic head is `iuq.core.decoders.DynamicConvDecoder` itself (three 1x1 convs, 8-8-1, with 2
relative-coordinate channels: 169 parameters), applied on flat pixels, so the base loss, L_inter
and L_equi decode masks with one and the same function. Relative coordinates are
(location - pixel) / size of interest of the location's level, in input pixels.

For iuq: the queries are the positive locations' 169 parameters (sigma is the FCOS assignment,
`iuq.models.fcos.assign`), the pixel embeddings the mask features, L_equi takes the dice form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from iuq.core.decoders import DynamicConvDecoder
from iuq.core.losses import dice_loss
from iuq.core.sampling import downsample_masks, grid_xy
from iuq.models.dense import (
    Assignment,
    DenseSegmenter,
    average_over_ranks,
    conv_norm_relu,
    init_convs,
    prior_bias,
    tower,
)
from iuq.models.fcos import (
    assign,
    centerness_targets,
    distances_to_boxes,
    fcos_losses,
    level_locations,
    mask_centres,
    scale_ranges,
)
from iuq.models.paste import low_res_prediction
from iuq.models.pyramid import Pyramid, build_backbone


@dataclass
class CondInstConfig:
    """CondInst's head (`model.condinst`); defaults are AdelaiDet's R50 1x recipe.

    fpn_channels: FPN and FCOS tower width. head_convs: convs per FCOS tower (cls, box).
    mask_branch_channels, mask_branch_convs: the mask branch's tower (output: 8 channels).
    sizes_of_interest: per level P3..P7; the first four also bound FCOS's scale ranges
        ([0, 64], [64, 128], [128, 256], [256, 512], [512, inf]); all five normalise relative coordinates.
    center_radius: FCOS centre sampling, in strides. max_proposals: positives per image whose
        masks are trained (a random subset beyond it).
    focal_alpha, focal_gamma: classification focal loss.
    score_threshold, pre_nms_topk, nms_iou: inference: candidates per level above the class score,
        the best pre_nms_topk of them per level, class-aware NMS at this IoU.
    mask_threshold: probability above which a pixel is in the mask.
    thresh_with_ctr: candidates pass `score_threshold` on class x centerness rather than on the class
        probability alone (AdelaiDet's CondInst configs set FCOS.THRESH_WITH_CTR).
    """

    fpn_channels: int = 256
    head_convs: int = 4
    mask_branch_channels: int = 128
    mask_branch_convs: int = 4
    sizes_of_interest: list[float] = field(default_factory=lambda: [64.0, 128.0, 256.0, 512.0, 1024.0])
    center_radius: float = 1.5
    max_proposals: int = 500
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    score_threshold: float = 0.05
    pre_nms_topk: int = 1000
    nms_iou: float = 0.6
    mask_threshold: float = 0.5
    thresh_with_ctr: bool = True

    def __post_init__(self) -> None:
        if len(self.sizes_of_interest) != 5:
            raise ValueError(f"model.condinst.sizes_of_interest: one per level P3..P7, got {self.sizes_of_interest}")
        for name in ("fpn_channels", "mask_branch_channels"):
            if getattr(self, name) % 32:
                raise ValueError(
                    f"model.condinst.{name}: must be a multiple of 32 (GroupNorm), got {getattr(self, name)}"
                )
        if self.max_proposals < 1:
            raise ValueError(f"model.condinst.max_proposals: must be >= 1, got {self.max_proposals}")


def candidates(
    probs: torch.Tensor, ctr: torch.Tensor, c: CondInstConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level's detections before NMS: class probabilities [L, C] and centerness [L] -> locations
    [K], classes [K] and scores sqrt(class x centerness) [K]: the pairs whose class probability (x
    centerness under `thresh_with_ctr`) passes `score_threshold`, the best `pre_nms_topk` of them."""
    joint = probs * ctr[:, None]  # [L, C]
    loc, cls = ((joint if c.thresh_with_ctr else probs) > c.score_threshold).nonzero(as_tuple=True)
    scores = torch.sqrt(joint[loc, cls])
    if scores.numel() > c.pre_nms_topk:
        scores, keep = scores.topk(c.pre_nms_topk)
        loc, cls = loc[keep], cls[keep]
    return loc, cls, scores


MASK_CHANNELS = 8  # the mask branch's output, the dynamic head's input (with 2 coordinate channels)


class Scale(nn.Module):
    """A learnable scalar per FPN level (FCOS's box regression)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


class FCOSHead(nn.Module):
    """Shared over levels: per level [N, C, h, w] class logits, [N, 4, h, w] distances (input
    pixels), [N, 1, h, w] centerness logits, [N, P, h, w] dynamic mask parameters."""

    def __init__(self, channels: int, num_classes: int, num_convs: int, num_params: int, strides: list[int]):
        super().__init__()
        self.strides = strides
        self.cls_tower = tower(channels, channels, num_convs)
        self.box_tower = tower(channels, channels, num_convs)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(channels, 1, 3, padding=1)
        self.controller = nn.Conv2d(channels, num_params, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in strides)
        init_convs([self.cls_tower, self.box_tower, self.cls_logits, self.box_pred, self.ctrness, self.controller])
        nn.init.constant_(self.cls_logits.bias, prior_bias(0.01))

    def forward(self, features: list[torch.Tensor]):
        cls, box, ctr, params = [], [], [], []
        for level, x in enumerate(features):
            c, b = self.cls_tower(x), self.box_tower(x)
            cls.append(self.cls_logits(c))
            # Distances in units of the stride, made positive, back to pixels (norm_reg_targets).
            box.append(F.relu(self.scales[level](self.box_pred(b))) * self.strides[level])
            ctr.append(self.ctrness(b))
            params.append(self.controller(b))
        return cls, box, ctr, params


class MaskBranch(nn.Module):
    """P3, P4, P5 -> [N, 8, h3, w3] mask features at stride 8: each level refined by a conv, brought to
    P3's size and summed, then a conv tower and a 1x1 conv to 8 channels (BatchNorm, as AdelaiDet)."""

    def __init__(self, in_channels: int, channels: int, num_convs: int):
        super().__init__()
        self.refine = nn.ModuleList(conv_norm_relu(in_channels, channels, "bn") for _ in range(3))
        self.tower = tower(channels, channels, num_convs, "bn")
        self.out = nn.Conv2d(channels, MASK_CHANNELS, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.refine[0](features[0])
        for refine, f in zip(self.refine[1:], features[1:3], strict=True):
            x = x + F.interpolate(refine(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.tower(x))


class CondInst(DenseSegmenter):
    """CondInst behind iuq's base-model interface (`iuq.models.interface`, docs/design.md).

    Args:
        model_cfg: the run's `model` section (backbone fields and `condinst`).
        num_classes: object classes.
        load_weights: load the backbone's pretrained weights (False: a checkpoint's weights follow).
    """

    stride = 8  # mask features
    mask_out_stride = 4  # masks are trained and predicted at stride 4

    def __init__(self, model_cfg, num_classes: int, load_weights: bool = True):
        super().__init__()
        c = model_cfg.condinst
        self.cfg, self.num_classes, self.model_cfg = c, num_classes, model_cfg
        self.backbone = build_backbone(model_cfg, load_weights)
        self.pyramid = Pyramid(self.backbone.channels, c.fpn_channels, "p3-p7")
        self.strides = self.pyramid.strides  # 8 .. 128
        self.decoder = DynamicConvDecoder(MASK_CHANNELS, (8, 8, 1))
        self.head = FCOSHead(c.fpn_channels, num_classes, c.head_convs, self.decoder.num_query_params(), self.strides)
        self.mask_branch = MaskBranch(c.fpn_channels, c.mask_branch_channels, c.mask_branch_convs)
        self.ranges = scale_ranges(c.sizes_of_interest)
        self.register_normalisation(model_cfg)

    mask_loss_weight = 1.0  # AdelaiDet weighs the dice loss by 1
    pixel_dim = MASK_CHANNELS
    equi_upsample = 2  # L_equi decodes on the stride-8 grid and is supervised at stride 4, as the base loss

    def mask_loss(self, logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
        """CondInst's mask loss (AdelaiDet's squared dice, eps 1e-5, summed over masks, / num_masks),
        for the base loss and L_equi."""
        return self.mask_loss_weight * dice_loss(logits, targets, num_masks, form="squared", eps=1e-5)

    @staticmethod
    def to_mask_stride(logits: torch.Tensor) -> torch.Tensor:
        """Mask logits [Q, h8, w8] on the mask features' grid -> [Q, h4, w4] at stride 4, where CondInst
        trains and predicts masks. Bilinear with half-pixel centres (our locations and `grid_xy` are
        cell centres); AdelaiDet's `aligned_bilinear` puts a cell's value at its corner instead."""
        h, w = logits.shape[-2:]
        if logits.shape[0] == 0:  # no detection: bilinear interpolation refuses empty inputs
            return logits.new_zeros((0, 2 * h, 2 * w))
        return F.interpolate(logits[None], size=(2 * h, 2 * w), mode="bilinear", align_corners=False)[0]

    # -- forward ----------------------------------------------------------------------------------
    def _heads(self, images, pixel_mask):
        feats = self.pyramid(self.backbone(self.normalise(images, pixel_mask)))  # 5 x [N, C, h_l, w_l]
        cls, box, ctr, params = self.head(feats)
        sizes = [tuple(f.shape[-2:]) for f in feats]
        n = images.shape[0]
        flat = {
            "cls": torch.cat([x.flatten(2) for x in cls], 2).transpose(1, 2),  # [N, L, C]
            "box": torch.cat([x.flatten(2) for x in box], 2).transpose(1, 2),  # [N, L, 4]
            "ctr": torch.cat([x.flatten(2) for x in ctr], 2).reshape(n, -1),  # [N, L]
            "params": torch.cat([x.flatten(2) for x in params], 2).transpose(1, 2),  # [N, L, 169]
        }
        locations = level_locations(sizes, self.strides, images.device)
        flat["xy"] = torch.cat(locations)  # [L, 2]
        flat["level"] = torch.cat([torch.full((len(p),), i, device=images.device) for i, p in enumerate(locations)])
        flat["locations"] = locations
        flat["mask_feats"] = self.mask_branch(feats[:3])  # [N, 8, H/8, W/8]
        flat["canvas"] = tuple(images.shape[-2:])
        return flat

    def query_xy(self, xy: torch.Tensor, level: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
        """Locations [Q, 2] (input px) and levels [Q] -> [Q, 4] (x, y, soi_x, soi_y) in canvas units,
        the coordinates `DynamicConvDecoder` reads with pixel coordinates from `grid_xy`."""
        h, w = canvas
        soi = torch.tensor(self.cfg.sizes_of_interest, device=xy.device)[level]  # [Q]
        scale = xy.new_tensor([w, h])
        return torch.cat([xy / scale, soi[:, None] / scale], dim=1)

    def decode(self, mask_feats: torch.Tensor, queries: torch.Tensor, query_xy: torch.Tensor) -> torch.Tensor:
        """One image's mask features [8, h, w], queries [Q, 169], query_xy [Q, 4] -> logits [Q, h, w]."""
        d, h, w = mask_feats.shape
        pixels = mask_feats.flatten(1).t()  # [h*w, 8]
        logits = self.decoder(queries, pixels, grid_xy(h, w, mask_feats.device), query_xy)  # [Q, h*w]
        return logits.reshape(-1, h, w)

    query_key = "params"  # each location's 169 dynamic parameters

    def _assign(self, heads: dict, target: dict) -> Assignment:
        """FCOS's assignment of one image; at most `max_proposals` positives, drawn with the global RNG
        (seeded per step by the engine)."""
        boxes = target["boxes"].to(heads["xy"].device, torch.float32)
        a = assign(heads["locations"], self.strides, self.ranges, boxes, mask_centres(target["masks"], boxes),
                   self.cfg.center_radius)  # fmt: skip
        pos = a.positive.nonzero()[:, 0]  # [n_pos]
        if pos.numel() > self.cfg.max_proposals:
            pos = pos[torch.randperm(pos.numel(), device=pos.device)[: self.cfg.max_proposals]]
        return Assignment(pos, a.gt[pos], a, self.query_xy(heads["xy"][pos], heads["level"][pos], heads["canvas"]))

    def _losses(self, heads, targets, assigned, queries, part) -> dict[str, torch.Tensor]:
        """FCOS losses and the dice mask loss of one view's images (indices `part` of the batch)."""
        idx = list(part)
        assignments = [a.detail for a in assigned]
        labels = torch.cat([
            torch.where(a.positive, t["labels"].to(a.gt.device)[a.gt.clamp(min=0)], -1) if len(t["labels"])
            else torch.full_like(a.gt, -1)
            for a, t in zip(assignments, targets, strict=True)
        ])  # fmt: skip
        reg_t = torch.cat([a.reg for a in assignments])  # [B*L, 4]
        pos = labels >= 0
        device = labels.device
        num_pos = max(average_over_ranks(int(pos.sum()), device), 1.0)
        ctr_sum = average_over_ranks(float(centerness_targets(reg_t[pos]).sum()) if pos.any() else 0.0, device)
        xy = heads["xy"].repeat(len(idx), 1)
        terms = fcos_losses(
            heads["cls"][idx].flatten(0, 1), heads["box"][idx].flatten(0, 1), heads["ctr"][idx].flatten(),
            labels, reg_t, xy, num_pos, ctr_sum, self.cfg.focal_alpha, self.cfg.focal_gamma,
        )  # fmt: skip
        mask_feats = heads["mask_feats"]
        total, count = mask_feats.sum() * 0 + sum(q.sum() * 0 for q in queries), 0
        for i, q, a, t in zip(idx, queries, assigned, targets, strict=True):
            if q.shape[0] == 0:
                continue
            g = a.instances
            logits = self.to_mask_stride(self.decode(mask_feats[i], q, a.query_xy))  # [Q, h4, w4]
            target = downsample_masks(t["masks"][g.to(t["masks"].device)], logits.shape[-2:])  # [Q, h4, w4]
            total = total + self.mask_loss(logits, target, 1.0)
            count += q.shape[0]
        terms["loss_mask"] = total / max(count, 1)
        return terms

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_instances(
        self, images: torch.Tensor, pixel_mask: torch.Tensor | None, sizes, orig_sizes, top_k: int = 100
    ) -> list[dict]:
        """Per image a prediction of `iuq.models.paste` (`scores` [N], `labels` [N], masks at stride 4).

        FCOS detections: locations whose class probability (x centerness under `thresh_with_ctr`)
        passes `score_threshold`, the best `pre_nms_topk` per level by sqrt(class x centerness),
        class-aware NMS, the best `top_k`; their masks from the dynamic head, brought to stride 4 as in
        training, then to the image and thresholded at `mask_threshold`."""
        c = self.cfg
        heads = self._heads(images, pixel_mask)
        results = []
        for i in range(images.shape[0]):
            probs = heads["cls"][i].sigmoid()  # [L, C]
            ctr = heads["ctr"][i].sigmoid()  # [L]
            locs, labels, scores = [], [], []
            for level in range(len(self.strides)):
                on_level = (heads["level"] == level).nonzero()[:, 0]
                loc, cls, s = candidates(probs[on_level], ctr[on_level], c)
                locs.append(on_level[loc])
                labels.append(cls)
                scores.append(s)
            loc, labels, scores = torch.cat(locs), torch.cat(labels), torch.cat(scores)
            h, w = sizes[i]
            boxes = distances_to_boxes(heads["xy"][loc], heads["box"][i][loc])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            keep = batched_nms(boxes, scores, labels, c.nms_iou)[:top_k]
            loc, labels, scores = loc[keep], labels[keep], scores[keep]
            qxy = self.query_xy(heads["xy"][loc], heads["level"][loc], heads["canvas"])
            logits = self.to_mask_stride(self.decode(heads["mask_feats"][i], heads["params"][i][loc], qxy))
            results.append(  # logits [K, h4, w4]
                low_res_prediction(
                    logits, scores, labels, self.mask_out_stride, sizes[i], orig_sizes[i], c.mask_threshold
                )
            )
        return results
