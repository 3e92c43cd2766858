"""QueryInst's parts (`iuq.models.queryinst`): its config, the DIIHead and the dynamic mask head of
one stage, the box coder and the Hungarian matching, after mmdetection's R50 1x recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

from iuq.core.losses import upcast
from iuq.models.dense import prior_bias

BOX_STDS = (0.5, 0.5, 1.0, 1.0)  # DeltaXYWHBBoxCoder's target_stds in the recipe (means 0)
MAX_LOG_RATIO = abs(torch.log(torch.tensor(16 / 1000)).item())  # mmdetection's wh_ratio_clip


@dataclass
class QueryInstConfig:
    """QueryInst's head (`model.queryinst`); defaults are mmdetection's R50 1x recipe.

    fpn_channels: FPN width = proposal feature width. proposals: N learned proposals (100; 300 in the
    3x recipes). stages: refinement stages. heads: attention heads. dynamic_channels: DynamicConv's
    inner width. ffn_dim: the FFN's hidden width. cls_fcs, reg_fcs: FC layers before the class and
    box outputs. mask_convs, mask_channels: the mask head's 3x3 convs. box_pool, mask_pool: RoIAlign
    output sizes (the masks are twice mask_pool). cost_*: Hungarian costs; *_weight: loss weights.
    mask_threshold: probability for a mask pixel at inference.
    """

    section: ClassVar[str] = "queryinst"
    fpn_channels: int = 256
    proposals: int = 100
    stages: int = 6
    heads: int = 8
    dynamic_channels: int = 64
    ffn_dim: int = 2048
    cls_fcs: int = 1
    reg_fcs: int = 3
    mask_convs: int = 4
    mask_channels: int = 256
    box_pool: int = 7
    mask_pool: int = 14
    cost_class: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    dice_weight: float = 8.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("fpn_channels", "proposals", "stages", "heads", "dynamic_channels", "ffn_dim", "mask_channels",
                     "box_pool", "mask_pool"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"model.queryinst.{name}: must be >= 1, got {getattr(self, name)}")
        if self.fpn_channels % self.heads:
            raise ValueError(
                f"model.queryinst.heads: must divide model.queryinst.fpn_channels ({self.fpn_channels}), "
                f"got {self.heads}"
            )
        if not 0 < self.mask_threshold < 1:
            raise ValueError(f"model.queryinst.mask_threshold: must be in (0, 1), got {self.mask_threshold}")


def fc_ln_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout, bias=False), nn.LayerNorm(cout), nn.ReLU(inplace=True))


class DynamicConv(nn.Module):
    """Sparse R-CNN's instance interaction: two 1x1 "convolutions" of an RoI's S*S features whose
    weights are generated from the proposal feature.

    params [n, C] -> (C x F, F x C') weights; feats [n, C, S, S] -> [n, S*S, C'] (or [n, C'] with
    `project`: flattened, one FC, LayerNorm, ReLU)."""

    def __init__(self, channels: int, inner: int, pool: int, project: bool):
        super().__init__()
        self.channels, self.inner = channels, inner
        self.generate = nn.Linear(channels, 2 * channels * inner)
        self.norm_in, self.norm_out = nn.LayerNorm(inner), nn.LayerNorm(channels)
        self.project = nn.Sequential(nn.Linear(channels * pool * pool, channels), nn.LayerNorm(channels),
                                     nn.ReLU(inplace=True)) if project else None  # fmt: skip

    def forward(self, params: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        c, f = self.channels, self.inner
        weights = self.generate(params)  # [n, 2*C*F]
        w_in = weights[:, : c * f].view(-1, c, f)  # [n, C, F]
        w_out = weights[:, c * f :].view(-1, f, c)  # [n, F, C]
        x = feats.flatten(2).transpose(1, 2)  # [n, S*S, C]
        x = F.relu(self.norm_in(torch.bmm(x, w_in)))  # [n, S*S, F]
        x = F.relu(self.norm_out(torch.bmm(x, w_out)))  # [n, S*S, C]
        return x if self.project is None else self.project(x.flatten(1))


class DIIHead(nn.Module):
    """One stage's box head: proposal features [B, N, C] and their RoI features [B*N, C, 7, 7] ->
    class logits [B, N, K], box deltas [B, N, 4], the next stage's features [B, N, C] and the
    attention features [B, N, C] (after self-attention; the mask head's dynamic input)."""

    def __init__(self, cfg: QueryInstConfig, num_classes: int):
        super().__init__()
        c = cfg.fpn_channels
        self.attention = nn.MultiheadAttention(c, cfg.heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(c)
        self.interact = DynamicConv(c, cfg.dynamic_channels, cfg.box_pool, project=True)
        self.interact_norm = nn.LayerNorm(c)
        self.ffn = nn.Sequential(nn.Linear(c, cfg.ffn_dim), nn.ReLU(inplace=True), nn.Linear(cfg.ffn_dim, c))
        self.ffn_norm = nn.LayerNorm(c)
        self.cls_fcs = nn.Sequential(*[fc_ln_relu(c, c) for _ in range(cfg.cls_fcs)])
        self.reg_fcs = nn.Sequential(*[fc_ln_relu(c, c) for _ in range(cfg.reg_fcs)])
        self.cls_out = nn.Linear(c, num_classes)
        self.reg_out = nn.Linear(c, 4)
        for p in self.parameters():  # mmdetection's DIIHead.init_weights
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.cls_out.bias, prior_bias(0.01))

    def forward(self, proposal_feats: torch.Tensor, roi_feats: torch.Tensor):
        b, n, c = proposal_feats.shape
        attn = self.attention_norm(proposal_feats + self.attention(proposal_feats, proposal_feats, proposal_feats,
                                                                   need_weights=False)[0])  # fmt: skip
        x = attn.reshape(b * n, c)
        x = self.interact_norm(x + self.interact(x, roi_feats))
        x = self.ffn_norm(x + self.ffn(x))  # [B*N, C]
        logits = self.cls_out(self.cls_fcs(x)).view(b, n, -1)
        deltas = self.reg_out(self.reg_fcs(x)).view(b, n, 4)
        return logits, deltas, x.view(b, n, c), attn


class DynamicMaskHead(nn.Module):
    """One stage's mask head: attention features [n, C] and RoI features [n, C, S, S] -> mask logits
    [n, K, 2S, 2S]: DynamicConv (no projection), `mask_convs` conv3x3 + BN + ReLU, deconv x2 + ReLU,
    a 1x1 conv to one channel per class.

    The BatchNorm layers normalise as in training (batch statistics) or evaluation (running ones),
    unless `stats` is given: L_inter's decoding of other images' RoIs (`iuq.core.roi`) normalises
    them by the batch statistics of the step's base mask loss, with gradient through those, so a
    per-channel shift of a conv's output changes neither term (with the running statistics instead,
    L_inter could lower its loss by a shift the base loss cannot see and inference inherits:
    docs/evidence.md, section 12)."""

    def __init__(self, cfg: QueryInstConfig, num_classes: int):
        super().__init__()
        c, m = cfg.fpn_channels, cfg.mask_channels
        self.interact = DynamicConv(c, cfg.dynamic_channels, cfg.mask_pool, project=False)
        self.convs = nn.ModuleList(
            nn.Conv2d(c if i == 0 else m, m, 3, padding=1, bias=False) for i in range(cfg.mask_convs)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(m) for _ in range(cfg.mask_convs))
        width = m if cfg.mask_convs else c
        self.upsample = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.logits = nn.Conv2d(width, num_classes, 1)
        for p in self.parameters():  # mmdetection's DynamicMaskHead.init_weights
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.logits.bias)

    def forward(
        self,
        attn_feats: torch.Tensor,
        roi_feats: torch.Tensor,
        stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        record: list | None = None,
    ) -> torch.Tensor:
        """stats: per BatchNorm layer (mean [m], biased variance [m]) to normalise by, running
        statistics untouched; an empty list: each layer by the batch statistics of this call, running
        statistics untouched. record: a list that receives each layer's batch statistics (with
        grad) when it normalises as in training."""
        n, c, s, _ = roi_feats.shape
        x = self.interact(attn_feats, roi_feats).transpose(1, 2).reshape(n, c, s, s)  # [n, C, S, S]
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = conv(x)  # [n, m, S, S]
            if stats is None:
                if record is not None and norm.training:
                    record.append((x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)))
                x = norm(x)
            elif stats:
                x = normalise_by(x, *stats[i], norm)
            else:
                x = F.batch_norm(x, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
            x = F.relu(x)
        return self.logits(F.relu(self.upsample(x)))  # [n, K, 2S, 2S]


def normalise_by(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
    """x [n, m, h, w] normalised by given statistics [m] with the layer's affine. By hand because
    `F.batch_norm` passes no gradient to statistics given as running ones."""
    scale = torch.rsqrt(var + norm.eps) * norm.weight  # [m]
    return (x - mean[:, None, None]) * scale[:, None, None] + norm.bias[:, None, None]


class Stage(nn.Module):
    def __init__(self, cfg: QueryInstConfig, num_classes: int):
        super().__init__()
        self.box_head = DIIHead(cfg, num_classes)
        self.mask_head = DynamicMaskHead(cfg, num_classes)


def decode_boxes(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """boxes [..., 4] xyxy, deltas [..., 4] (dx, dy, dw, dh) over BOX_STDS -> boxes [..., 4] xyxy
    (mmdetection's `delta2bbox` with zero means, no clipping)."""
    d = deltas * deltas.new_tensor(BOX_STDS)
    centre, size = (boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]
    centre = centre + size * d[..., :2]
    size = size * d[..., 2:].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    return torch.cat([centre - size / 2, centre + size / 2], -1)


@torch.no_grad()
def match_cost(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    whwh: torch.Tensor,
    cfg: QueryInstConfig,
) -> torch.Tensor:
    """One image's matching cost [N, G] between proposals (logits [N, K], boxes [N, 4] xyxy) and G
    ground-truth instances: cost_class * focal cost + cost_l1 * L1 of the boxes over the image size
    `whwh` [4] + cost_giou * (-GIoU) (mmdetection's HungarianAssigner with FocalLossCost, BBoxL1Cost
    and IoUCost)."""
    p = upcast(logits).sigmoid()[:, gt_labels]  # [N, G]
    a, g, eps = cfg.focal_alpha, cfg.focal_gamma, 1e-12
    pos = -(p + eps).log() * a * (1 - p) ** g
    neg = -(1 - p + eps).log() * (1 - a) * p**g
    boxes, gt_boxes = upcast(boxes), gt_boxes.float()
    l1 = torch.cdist(boxes / whwh, gt_boxes / whwh, p=1)
    return cfg.cost_class * (pos - neg) + cfg.cost_l1 * l1 - cfg.cost_giou * generalized_box_iou(boxes, gt_boxes)


def hungarian_match(
    logits, boxes, gt_labels, gt_boxes, whwh, cfg: QueryInstConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(proposal indices [G'], their instances [G']), G' = min(N, G): the assignment of least total
    `match_cost` (scipy's `linear_sum_assignment`)."""
    if gt_labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
        return empty, empty
    cost = match_cost(logits, boxes, gt_labels, gt_boxes, whwh, cfg)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    device = logits.device
    return torch.as_tensor(rows, dtype=torch.int64, device=device), torch.as_tensor(
        cols, dtype=torch.int64, device=device
    )
