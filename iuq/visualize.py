"""Instance masks drawn over an image, with class names and scores, saved as PNG."""

from __future__ import annotations

import colorsys
import os

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from iuq.data.coco import boxes_from_masks


def _colours(n: int) -> list[tuple[int, int, int]]:
    # Golden-ratio hues: neighbouring instances get clearly different colours.
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.618034 * i) % 1.0, 0.75, 0.95)) for i in range(n)]


def draw_instances(
    image: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    scores: torch.Tensor | None = None,
    alpha: float = 0.55,
) -> torch.Tensor:
    """image [3, H, W] float in [0, 1] or uint8; masks [N, H, W] bool -> overlay [3, H, W] uint8."""
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if masks.shape[0] == 0:
        return image
    colours = _colours(masks.shape[0])
    out = draw_segmentation_masks(image, masks.bool(), alpha=alpha, colors=colours)
    text = [class_names[int(c)] for c in labels]
    if scores is not None:
        text = [f"{t} {float(s):.2f}" for t, s in zip(text, scores, strict=True)]
    return draw_bounding_boxes(out, boxes_from_masks(masks.bool()), labels=text, colors=colours, width=1)


def save_png(overlay: torch.Tensor, path: str | os.PathLike) -> None:
    """overlay [3, H, W] uint8 -> PNG file."""
    Image.fromarray(overlay.permute(1, 2, 0).cpu().numpy()).save(path)
