"""Matrix NMS (SOLOv2, Wang et al., NeurIPS 2020, Sec. 3.3.3), in one parallel pass.

No mask is removed; every mask's score is decayed by how much it overlaps higher-scored masks of
its class. For a mask j, the decay is the minimum over higher-scored same-class masks i of

    f(iou(i, j)) / f(max iou of i with any mask scored above i, same class)

with f(x) = exp(-sigma * x^2) (gaussian) or 1 - x (linear). The denominator compensates for i
itself being suppressed: a mask that is already a duplicate suppresses others less.
"""

from __future__ import annotations

import torch

KERNELS = ("gaussian", "linear")


def matrix_nms(
    masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, kernel: str = "gaussian", sigma: float = 2.0
) -> torch.Tensor:
    """masks [N, ...] bool, labels [N], scores [N] sorted in descending order -> decayed scores [N]."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown Matrix NMS kernel {kernel!r}; use one of {KERNELS}")
    n = masks.shape[0]
    if n == 0:
        return scores
    m = masks.reshape(n, -1).float()  # [N, P]
    inter = m @ m.t()  # [N, N]
    area = m.sum(1)
    union = area[:, None] + area[None] - inter
    iou = (inter / union.clamp(min=1)).triu(diagonal=1)  # [i, j]: i scored above j
    same = (labels[:, None] == labels[None]).triu(diagonal=1)
    decay_iou = iou * same  # only same-class pairs decay
    compensate = decay_iou.max(0).values  # [N]: each mask's largest IoU with a higher-scored one
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (decay_iou.square() - compensate[:, None].square()))  # [i, j]
    else:
        decay = (1 - decay_iou) / (1 - compensate[:, None]).clamp(min=1e-6)
    return scores * decay.min(0).values
