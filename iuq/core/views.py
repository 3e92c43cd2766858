"""The views IUQ trains on: g ~ G drawn per image, and g applied to a batch and its targets.

    g = draw_g(cfg, pixel_mask, stride, generator)              # one transform per image
    g_images, g_mask, g_targets = transformed_views(images, pixel_mask, targets, g)

The training step (`iuq.engine.step`) stacks [I, g(I)] into one forward of the base model.
"""

from __future__ import annotations

import torch
from torchvision.ops import masks_to_boxes

from iuq.core.config import IUQConfig
from iuq.core.transforms import BatchTransform, sample_transforms


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """masks [K, H, W] bool -> boxes [K, 4] float xyxy in pixel-edge coordinates.

    torchvision's `masks_to_boxes` returns the last covered pixel index; +1 on x2, y2 makes the
    box enclose whole pixels, so that flipping a box is x -> W - x exactly.
    """
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    boxes = masks_to_boxes(masks)  # [K, 4]
    boxes[:, 2:] += 1
    return boxes


def draw_g(cfg: IUQConfig, pixel_mask: torch.Tensor, stride: int, generator: torch.Generator | None) -> BatchTransform:
    """g ~ G for each image of a padded batch, by the config's crop reading."""
    crop = (cfg.crop_min, cfg.crop_max)
    g = sample_transforms(
        pixel_mask.shape[0], generator, valid_fraction(pixel_mask), cfg.flip_p, crop,
        mode=cfg.crop_mode, canvas=tuple(pixel_mask.shape[1:]), align=stride,
    )  # fmt: skip
    return g.to(pixel_mask.device)


def transformed_views(images: torch.Tensor, pixel_mask: torch.Tensor, targets: list[dict], g: BatchTransform):
    """g(I), its pixel mask and g(targets); instances cropped out entirely are dropped."""
    g_images = g.apply(images)  # [B, 3, H, W]
    g_mask = g.apply(pixel_mask[:, None].float(), mode="nearest")[:, 0] > 0.5  # [B, H, W]
    g_targets = []
    for b, t in enumerate(targets):
        index = torch.full((t["masks"].shape[0],), b, dtype=torch.long)
        masks = g.apply_masks(t["masks"], index)  # [K, H, W]
        keep = masks.flatten(1).any(1)
        g_target = {**t, "masks": masks[keep], "labels": t["labels"][keep]}
        if "boxes" in t:
            g_target["boxes"] = boxes_from_masks(masks[keep])
        g_targets.append(g_target)
    return g_images, g_mask, g_targets


def valid_fraction(pixel_mask: torch.Tensor) -> torch.Tensor:
    """pixel_mask [B, H, W] bool (valid region at top-left) -> [B, 2] (x, y) fractions of the canvas."""
    w = pixel_mask.any(1).sum(1).float() / pixel_mask.shape[2]
    h = pixel_mask.any(2).sum(1).float() / pixel_mask.shape[1]
    return torch.stack([w, h], dim=1)
