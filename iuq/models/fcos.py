"""FCOS, the detector under CondInst: locations, their assignment to instances, and its losses.

Assignment (Tian et al., ICCV 2019, with AdelaiDet's defaults as CondInst trains it): a location
(x, y) of level l is a positive of instance k when

  1. it lies inside k's box;
  2. centre sampling: it lies within `radius` x stride_l of k's centre (the centre of mass of k's
     mask, as CondInst does), that window clipped to the box;
  3. the largest of its distances (left, top, right, bottom) to k's box edges is within level l's
     scale range;

and, among the instances it qualifies for, k has the smallest box area. That instance is sigma of
the location: the location's dynamic mask parameters are a query matched to k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from iuq.core.losses import sigmoid_focal, upcast


def level_locations(sizes: list[tuple[int, int]], strides: list[int], device=None) -> list[torch.Tensor]:
    """Per level, the input-pixel (x, y) of every cell's centre -> [h*w, 2], row-major."""
    out = []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys = torch.arange(h, device=device, dtype=torch.float32) * s + s // 2
        xs = torch.arange(w, device=device, dtype=torch.float32) * s + s // 2
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([gx.flatten(), gy.flatten()], dim=1))
    return out


def scale_ranges(sizes_of_interest: list[float]) -> list[tuple[float, float]]:
    """FCOS's per-level range of the largest regression distance: [0, s0], [s0, s1], ..., [s3, inf]
    from the first four sizes of interest (64, 128, 256, 512 -> [0,64] ... [512, inf])."""
    bounds = [0.0, *sizes_of_interest[:4], float("inf")]
    return [(bounds[i], bounds[i + 1]) for i in range(5)]


def mask_centres(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """masks [K, H, W] bool -> [K, 2] (x, y) centre of mass in input pixels (pixel centres at +0.5);
    an empty mask falls back to its box centre."""
    k, h, w = masks.shape
    m = masks.float()
    area = m.flatten(1).sum(1)  # [K]
    xs = torch.arange(w, device=masks.device, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=masks.device, dtype=torch.float32) + 0.5
    cx = (m.sum(1) * xs).sum(1) / area.clamp(min=1)
    cy = (m.sum(2) * ys).sum(1) / area.clamp(min=1)
    box_c = (boxes[:, :2] + boxes[:, 2:]) / 2
    centre = torch.stack([cx, cy], dim=1)
    return torch.where((area > 0)[:, None], centre, box_c)


@dataclass
class Assignment:
    """FCOS targets of one image's L locations (all levels, finest first).

    gt: [L] matched instance index, -1 for background; reg: [L, 4] (left, top, right, bottom)
    distances in input pixels to the matched box; level: [L] level index of each location.
    """

    gt: torch.Tensor
    reg: torch.Tensor
    level: torch.Tensor

    @property
    def positive(self) -> torch.Tensor:
        return self.gt >= 0


def assign(
    locations: list[torch.Tensor],
    strides: list[int],
    ranges: list[tuple[float, float]],
    boxes: torch.Tensor,
    centres: torch.Tensor,
    radius: float = 1.5,
) -> Assignment:
    """FCOS assignment of one image (module docstring).

    locations: per level [h*w, 2]; boxes [K, 4] xyxy; centres [K, 2] (mask centres of mass).
    """
    device = boxes.device
    xy = torch.cat(locations)  # [L, 2]
    level = torch.cat([torch.full((len(p),), i, device=device, dtype=torch.long) for i, p in enumerate(locations)])
    n, k = xy.shape[0], boxes.shape[0]
    if k == 0:
        return Assignment(torch.full((n,), -1, device=device, dtype=torch.long), xy.new_zeros((n, 4)), level)
    x, y = xy[:, 0:1], xy[:, 1:2]  # [L, 1]
    reg = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=2)  # [L, K, 4]
    stride = torch.tensor(strides, device=device, dtype=torch.float32)[level][:, None]  # [L, 1]
    # Centre window, clipped to the box.
    x0 = torch.maximum(centres[:, 0] - stride * radius, boxes[:, 0])  # [L, K]
    y0 = torch.maximum(centres[:, 1] - stride * radius, boxes[:, 1])
    x1 = torch.minimum(centres[:, 0] + stride * radius, boxes[:, 2])
    y1 = torch.minimum(centres[:, 1] + stride * radius, boxes[:, 3])
    in_centre = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2).min(2).values > 0  # [L, K]
    lo = torch.tensor([r[0] for r in ranges], device=device)[level][:, None]
    hi = torch.tensor([r[1] for r in ranges], device=device)[level][:, None]
    largest = reg.max(2).values  # [L, K]
    in_range = (largest >= lo) & (largest <= hi)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(n, k).clone()  # [L, K]
    area[~(in_centre & in_range)] = float("inf")  # in_centre implies inside the box
    best_area, gt = area.min(1)  # [L]
    gt[torch.isinf(best_area)] = -1
    reg = reg[torch.arange(n, device=device), gt.clamp(min=0)]  # [L, 4]
    return Assignment(gt, reg, level)


def centerness_targets(reg: torch.Tensor) -> torch.Tensor:
    """reg [N, 4] (l, t, r, b) -> [N] sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))."""
    lr, tb = reg[:, [0, 2]], reg[:, [1, 3]]
    return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))


def distances_to_boxes(xy: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """locations [N, 2], distances [N, 4] (l, t, r, b) -> boxes [N, 4] xyxy."""
    return torch.cat([xy - reg[:, :2], xy + reg[:, 2:]], dim=1)


def fcos_losses(
    cls_logits: torch.Tensor,
    reg_pred: torch.Tensor,
    ctr_logits: torch.Tensor,
    labels: torch.Tensor,
    reg_targets: torch.Tensor,
    xy: torch.Tensor,
    num_pos: float,
    ctr_sum: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> dict[str, torch.Tensor]:
    """FCOS's three losses over the locations of a batch.

    cls_logits [L, C]; labels [L] class, -1 for background; reg_pred [L, 4] predicted distances;
    ctr_logits [L]; reg_targets [L, 4] (read at positives); xy [L, 2] locations.
    num_pos: positives (averaged over ranks, >= 1) normalising the class and centerness losses;
    ctr_sum: sum of the positives' centerness targets (averaged over ranks), normalising the box loss,
    which is weighted by centerness targets.
    """
    pos = labels >= 0
    onehot = torch.zeros_like(cls_logits)
    onehot[pos, labels[pos]] = 1
    loss_cls = sigmoid_focal(cls_logits, onehot, alpha, gamma) / num_pos
    if not bool(pos.any()):
        zero = reg_pred.sum() * 0 + ctr_logits.sum() * 0
        return {"loss_fcos_cls": loss_cls, "loss_fcos_box": zero, "loss_fcos_ctr": zero}
    ctr_t = centerness_targets(reg_targets[pos])  # [N]
    # Boxes in fp32: the GIoU of a bf16 box loses about 0.4% of a side at 256 px.
    boxes_pred = distances_to_boxes(upcast(xy[pos]), upcast(reg_pred[pos]))
    boxes_true = distances_to_boxes(upcast(xy[pos]), upcast(reg_targets[pos]))
    giou = generalized_box_iou_loss(boxes_pred, boxes_true, reduction="none")  # [N]
    loss_box = (giou * ctr_t).sum() / max(ctr_sum, 1e-6)
    loss_ctr = F.binary_cross_entropy_with_logits(upcast(ctr_logits[pos]), upcast(ctr_t), reduction="sum") / num_pos
    return {"loss_fcos_cls": loss_cls, "loss_fcos_box": loss_box, "loss_fcos_ctr": loss_ctr}
