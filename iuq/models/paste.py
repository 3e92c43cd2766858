"""Instance masks at any image size.

A model's prediction keeps its masks as logits at the model's own resolution (the stride grid of
the padded input). They are pasted at the original image size a few instances at a time, for
scoring, RLE encoding or drawing, so memory grows with the instances kept and with one chunk of
full-size masks, never with pixels x instances (a 24-megapixel photo x 100 queries of float logits
would be about 10 GB).

A prediction is a dict: `scores` [N], `labels` [N], `mask_logits` [N, hs, ws] on the padded
stride grid, `stride`, `size` (h, w) of the valid input region, `orig_size` (H0, W0) and
`logit_threshold` (a mask pixel is on where its pasted logit exceeds it). An RoI-based model's
prediction (QueryInst) also holds `mask_boxes` [N, 4], xyxy in input pixels: its `mask_logits`
[N, M, M] then cover each box, not the canvas.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Output pixels pasted at once: 2^25 floats are 128 MB, and a COCO image's 100 masks fit in one chunk.
PASTE_BUDGET = 1 << 25


def masks_to_image(logits: torch.Tensor, stride: int, size: tuple[int, int], orig: tuple[int, int]) -> torch.Tensor:
    """logits [K, h, w] at `stride` on the padded canvas -> [K, H0, W0] logits at the original image
    size: upsampled to the canvas, the padding cropped to the valid `size` (h, w), then resized."""
    if logits.shape[0] == 0:
        return logits.new_zeros((0, *orig))
    hp, wp = logits.shape[-2] * stride, logits.shape[-1] * stride
    x = F.interpolate(logits[None], size=(hp, wp), mode="bilinear", align_corners=False)[0]
    x = x[:, : size[0], : size[1]]
    return F.interpolate(x[None], size=orig, mode="bilinear", align_corners=False)[0]


def roi_masks_to_image(
    logits: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], orig: tuple[int, int]
) -> torch.Tensor:
    """RoI mask logits [K, M, M] over boxes [K, 4] (input pixels, valid region `size` (h, w)) ->
    [K, H0, W0] logits at the original image size: each output pixel samples the box's probabilities
    bilinearly at its centre, 0 outside the box (mmdetection's `_do_paste_mask`)."""
    k = logits.shape[0]
    if k == 0:
        return logits.new_zeros((0, *orig))
    h0, w0 = orig
    sy, sx = size[0] / h0, size[1] / w0  # input pixels per output pixel
    xs = (torch.arange(w0, device=logits.device, dtype=torch.float32) + 0.5) * sx  # [W0] input x of each centre
    ys = (torch.arange(h0, device=logits.device, dtype=torch.float32) + 0.5) * sy
    b = boxes.float()
    gx = (xs[None] - b[:, :1]) / (b[:, 2:3] - b[:, :1]).clamp(min=1e-6) * 2 - 1  # [K, W0] in [-1, 1] inside
    gy = (ys[None] - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]).clamp(min=1e-6) * 2 - 1  # [K, H0]
    grid = torch.stack([gx[:, None, :].expand(k, h0, w0), gy[:, :, None].expand(k, h0, w0)], -1)
    probs = F.grid_sample(logits.float().sigmoid()[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0]
    return torch.logit(probs, eps=1e-6)


def low_res_prediction(
    mask_logits: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    stride: int,
    size: tuple[int, int],
    orig_size: tuple[int, int],
    mask_threshold: float = 0.5,
) -> dict:
    """The prediction dict of one image (module docstring); `mask_threshold` is a probability."""
    return {
        "scores": scores,
        "labels": labels,
        "mask_logits": mask_logits,
        "stride": stride,
        "size": tuple(int(v) for v in size),
        "orig_size": tuple(int(v) for v in orig_size),
        "logit_threshold": math.log(mask_threshold / (1 - mask_threshold)),
    }


def chunk_size(pixels: int, budget: int | None = None) -> int:
    """Instances pasted at once at `pixels` output pixels each (budget: PASTE_BUDGET)."""
    return max(1, (budget or PASTE_BUDGET) // max(pixels, 1))


def pasted_logits(pred: dict, size: tuple[int, int] | None = None, budget: int | None = None) -> Iterator:
    """(start, logits [n, H, W]) chunks of `pred`'s masks at `size` (default: the original size)."""
    size = tuple(size or pred["orig_size"])
    logits = pred["mask_logits"]
    step = chunk_size(size[0] * size[1], budget)
    boxes = pred.get("mask_boxes")
    for start in range(0, logits.shape[0], step):
        if boxes is not None:
            yield (
                start,
                roi_masks_to_image(logits[start : start + step], boxes[start : start + step], pred["size"], size),
            )
        else:
            yield start, masks_to_image(logits[start : start + step], pred["stride"], pred["size"], size)


def mask_chunks(pred: dict, size: tuple[int, int] | None = None, budget: int | None = None) -> Iterator:
    """(start, masks [n, H, W] bool) chunks of `pred`'s masks at `size` (default: the original size)."""
    for start, logits in pasted_logits(pred, size, budget):
        yield start, logits > pred["logit_threshold"]


def paste_masks(pred: dict, size: tuple[int, int] | None = None) -> torch.Tensor:
    """All of `pred`'s masks at once, [N, H, W] bool: for small images, drawings and tests."""
    chunks = [m for _, m in mask_chunks(pred, size)]
    if not chunks:
        h, w = size or pred["orig_size"]
        return torch.zeros((0, h, w), dtype=torch.bool, device=pred["mask_logits"].device)
    return torch.cat(chunks)


def select(pred: dict, keep: torch.Tensor) -> dict:
    """`pred` restricted to the instances `keep` (bool mask or indices)."""
    return {**pred, **{k: pred[k][keep] for k in ("scores", "labels", "mask_logits", "mask_boxes") if k in pred}}
