"""Training augmentation applied consistently to an image, its instance masks and boxes.

Each transform is a callable `(image [3, H, W] float, target) -> (image, target)`; the pixel
kernels are torchvision's `transforms.v2.functional`. Randomness comes from torch's global RNG
(seeded by the trainer), so a seeded run is reproducible.

The paper's ResNet recipe (shortest side random in [400, 1200], long side at most 1333, flip) is
`Compose([RandomResize((400, 1200), 1333), RandomHorizontalFlip()])`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from iuq.core.views import boxes_from_masks


class Compose:
    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: dict):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def resize_output_size(height: int, width: int, short_side: int, max_size: int | None) -> tuple[int, int]:
    """Size (h, w) with the shorter side `short_side`, shrunk so the long side is <= max_size."""
    scale = short_side / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: torch.Tensor, target: dict, size: tuple[int, int]):
    """Bilinear (antialiased) resize of the image, nearest for masks; boxes follow the masks."""
    if tuple(image.shape[-2:]) == tuple(size):
        # Images drawn at their own size (the demo's 128 px scenes; not nuclei24, whose 250 px tiles
        # train at 256): both resamplings would be exact copies (benchmarks/data_loading.py).
        return image, _keep_nonempty(target)
    image = TF.resize(image, list(size), antialias=True)  # [3, h, w]
    masks = target["masks"]
    if masks.shape[0]:
        masks = F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5  # [K, h, w]
    else:
        masks = masks.new_zeros((0, *size))
    return image, _keep_nonempty({**target, "masks": masks})


def hflip(image: torch.Tensor, target: dict):
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "masks": target["masks"].flip(-1), "boxes": boxes}


def crop(image: torch.Tensor, target: dict, top: int, left: int, height: int, width: int):
    """Crop a window; instances with no pixel left are dropped, boxes are those of the cropped masks."""
    image = image[:, top : top + height, left : left + width]
    masks = target["masks"][:, top : top + height, left : left + width]
    return image, _keep_nonempty({**target, "masks": masks})


def _keep_nonempty(target: dict) -> dict:
    keep = target["masks"].flatten(1).any(1)  # [K]
    out = dict(target)
    out["masks"] = target["masks"][keep]
    out["labels"] = target["labels"][keep]
    out["boxes"] = boxes_from_masks(out["masks"])
    return out


class RandomResize:
    """Shortest side uniform in `short_side` = (lo, hi) (inclusive), long side capped at `max_size`."""

    def __init__(self, short_side: tuple[int, int], max_size: int | None = None):
        lo, hi = short_side
        if not 0 < lo <= hi:
            raise ValueError(f"short_side must be (lo, hi) with 0 < lo <= hi, got {short_side}")
        self.short_side, self.max_size = (lo, hi), max_size

    def __call__(self, image, target):
        lo, hi = self.short_side
        short = int(torch.randint(lo, hi + 1, ()).item())
        size = resize_output_size(image.shape[-2], image.shape[-1], short, self.max_size)
        return resize(image, target, size)

    def __repr__(self) -> str:
        return f"RandomResize(short_side={self.short_side}, max_size={self.max_size})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomCrop:
    """Crop a window whose sides are each a uniform fraction in `relative` of the image sides."""

    def __init__(self, relative: tuple[float, float] = (0.6, 1.0), p: float = 1.0):
        lo, hi = relative
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"relative must satisfy 0 < lo <= hi <= 1, got {relative}")
        self.relative, self.p = (lo, hi), p

    def __call__(self, image, target):
        if torch.rand(()).item() >= self.p:
            return image, target
        h, w = image.shape[-2:]
        lo, hi = self.relative
        rel = torch.empty(2).uniform_(lo, hi)
        ch, cw = max(1, round(h * rel[0].item())), max(1, round(w * rel[1].item()))
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        return crop(image, target, top, left, ch, cw)

    def __repr__(self) -> str:
        return f"RandomCrop(relative={self.relative}, p={self.p})"


def collate(batch: list, size_divisibility: int = 32) -> dict:
    """List of (image [3, H_i, W_i], target) -> padded batch.

    Returns `images` [B, 3, Hp, Wp] (zero padded at bottom/right, Hp and Wp divisible by
    `size_divisibility`), `pixel_mask` [B, Hp, Wp] bool (True on valid pixels) and `targets`, whose
    masks are padded to [K, Hp, Wp] so they align with the padded images.
    """
    images = [b[0] for b in batch]
    hp = max(im.shape[-2] for im in images)
    wp = max(im.shape[-1] for im in images)
    d = size_divisibility
    hp, wp = -(-hp // d) * d, -(-wp // d) * d
    out = images[0].new_zeros((len(images), 3, hp, wp))
    pixel_mask = torch.zeros((len(images), hp, wp), dtype=torch.bool)
    targets = []
    for i, (image, target) in enumerate(batch):
        h, w = image.shape[-2:]
        out[i, :, :h, :w] = image
        pixel_mask[i, :h, :w] = True
        masks = target["masks"].new_zeros((target["masks"].shape[0], hp, wp))
        masks[:, :h, :w] = target["masks"]
        targets.append({**target, "masks": masks, "size": (h, w)})
    return {"images": out, "pixel_mask": pixel_mask, "targets": targets}
