"""Instance masks drawn over an image, and ground truth beside prediction, saved as PNG.

Small images (nuclei tiles, thumbnails) are upscaled before drawing, so that outlines and labels
stay readable; labels are left out where an image holds too many instances for text to fit.
"""

from __future__ import annotations

import colorsys
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from iuq.core.views import boxes_from_masks


def _colours(n: int) -> list[tuple[int, int, int]]:
    # Golden-ratio hues: neighbouring instances get clearly different colours.
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.618034 * i) % 1.0, 0.75, 0.95)) for i in range(n)]


def upscale_factor(height: int, width: int, min_side: int) -> int:
    """Whole-number factor that brings the shorter side to at least `min_side` (1 if it already is)."""
    return max(1, math.ceil(min_side / max(min(height, width), 1)))


def _outlines(masks: torch.Tensor) -> torch.Tensor:
    """masks [N, H, W] bool -> their one-pixel inner boundaries [N, H, W] bool."""
    m = masks.float()[:, None]  # [N, 1, H, W]
    eroded = -F.max_pool2d(-m, kernel_size=3, stride=1, padding=1)
    return (m - eroded)[:, 0] > 0


def draw_instances(
    image: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    scores: torch.Tensor | None = None,
    alpha: float = 0.4,
    min_side: int = 512,
    max_labels: int = 15,
) -> torch.Tensor:
    """image [3, H, W] float in [0, 1] or uint8; masks [N, H, W] bool -> overlay [3, sH, sW] uint8.

    s = upscale_factor(H, W, min_side). Each instance is filled and outlined in its own colour;
    class names (and scores) are written only when there are at most `max_labels` instances.
    """
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    s = upscale_factor(image.shape[-2], image.shape[-1], min_side)
    if s > 1:
        image = F.interpolate(image[None].float(), scale_factor=s, mode="bilinear", align_corners=False)[0]
        image = image.round().clamp(0, 255).to(torch.uint8)
        masks = masks.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)
    if masks.shape[0] == 0:
        return image
    masks = masks.bool()
    colours = _colours(masks.shape[0])
    out = draw_segmentation_masks(image, masks, alpha=alpha, colors=colours)
    out = draw_segmentation_masks(out, _outlines(masks), alpha=1.0, colors=colours)
    if masks.shape[0] > max_labels:
        return out
    text = [class_names[int(c)] for c in labels]
    if scores is not None:
        text = [f"{t} {float(s):.2f}" for t, s in zip(text, scores, strict=True)]
    return draw_bounding_boxes(out, boxes_from_masks(masks), labels=text, colors=colours, width=1)


def side_by_side(panels: list[tuple[str, torch.Tensor]], gap: int = 8) -> torch.Tensor:
    """(title, image [3, H, W] uint8) panels of equal height, left to right with titles above."""
    title_h = 18
    h = max(p.shape[1] for _, p in panels)
    w = sum(p.shape[2] for _, p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (w, h + title_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, panel in panels:
        canvas.paste(Image.fromarray(panel.permute(1, 2, 0).cpu().numpy()), (x, title_h))
        draw.text((x + 2, 3), title, fill=(0, 0, 0))
        x += panel.shape[2] + gap
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()


def save_png(overlay: torch.Tensor, path: str | os.PathLike) -> None:
    """overlay [3, H, W] uint8 -> PNG file."""
    Image.fromarray(overlay.permute(1, 2, 0).cpu().numpy()).save(path)
