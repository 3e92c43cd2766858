"""The transformation group G of §3.3: horizontal flip and random crop (relative side 0.6-1.0).

A transform of a batch is, per image and per axis, an affine map from normalised *output*
coordinates u to normalised *source* coordinates x:  x = scale * u + offset  (a flip has a
negative scale). Crops are resized back to the input size, so g(I) has the shape of I and both
views batch together. Because the map is in normalised coordinates (pixel edges at 0 and 1, pixel
centres at (i + 0.5) / n), one transform applies alike to images, masks, feature maps at any
stride, points and boxes.

Padded batches: `valid` gives the fraction of the padded canvas covered by each image; crops are
drawn inside it and the output fills the same region, so padding stays padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BatchTransform:
    """scale, offset: [B, 2] (x, y) with source = scale * output + offset, normalised coordinates."""

    scale: torch.Tensor
    offset: torch.Tensor

    def __len__(self) -> int:
        return self.scale.shape[0]

    def to(self, device) -> BatchTransform:
        return BatchTransform(self.scale.to(device), self.offset.to(device))

    def then(self, other: BatchTransform) -> BatchTransform:
        """Composition: apply self, then `other` (other's output -> self's output -> source)."""
        return BatchTransform(self.scale * other.scale, self.scale * other.offset + self.offset)

    def is_exact(self, i: int) -> bool:
        """True if image i is only flipped (or untouched) over the full canvas: no resampling needed."""
        s, o = self.scale[i], self.offset[i]
        return bool(((s == 1) & (o == 0) | (s == -1) & (o == 1)).all())

    def apply(self, x: torch.Tensor, mode: str = "bilinear", index: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C, H, W] (images, feature maps, or masks as float) -> g(x) of the same shape.

        Row n uses the transform of image `index[n]` (default n). Pure flips are exact index
        reversals; crops are bilinear (or nearest) samples at pixel centres.
        """
        index = torch.arange(x.shape[0], device=x.device) if index is None else index
        out = []
        for n in range(x.shape[0]):
            i = int(index[n])
            if self.is_exact(i):
                dims = [d for d, axis in ((-1, 0), (-2, 1)) if self.scale[i, axis] < 0]
                out.append(x[n].flip(dims) if dims else x[n])
                continue
            s, o = self.scale[i].to(x.dtype), self.offset[i].to(x.dtype)
            # affine_grid works in [-1, 1] (align_corners=False: -1 and 1 are the outer pixel edges):
            # src_n = 2 * (s * (out_n + 1) / 2 + o) - 1 = s * out_n + (s + 2 * o - 1).
            theta = x.new_zeros((1, 2, 3))
            theta[0, 0, 0], theta[0, 1, 1] = s[0], s[1]
            theta[0, :, 2] = s + 2 * o - 1
            grid = F.affine_grid(theta, [1, *x.shape[1:]], align_corners=False)
            out.append(F.grid_sample(x[n : n + 1], grid, mode=mode, padding_mode="zeros", align_corners=False)[0])
        return torch.stack(out) if out else x

    def apply_masks(self, masks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """masks [K, H, W] bool of images `index` [K] -> g(masks) [K, H, W] bool (nearest)."""
        if masks.shape[0] == 0:
            return masks
        return self.apply(masks[:, None].float(), mode="nearest", index=index)[:, 0] > 0.5

    def apply_points(self, xy: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Source points xy [N, 2] normalised, of images `index` [N] -> output coordinates [N, 2]."""
        return (xy - self.offset[index]) / self.scale[index]

    def apply_boxes(self, boxes: torch.Tensor, index: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """boxes [N, 4] xyxy in pixels of an (H, W) canvas -> transformed, clipped to the canvas."""
        h, w = size
        norm = boxes.new_tensor([w, h, w, h])
        p1 = self.apply_points(boxes[:, :2] / norm[:2], index)
        p2 = self.apply_points(boxes[:, 2:] / norm[:2], index)
        out = torch.cat([torch.minimum(p1, p2), torch.maximum(p1, p2)], dim=1).clamp(0, 1)
        return out * norm


def hflip(batch: int, valid: torch.Tensor | None = None, device=None) -> BatchTransform:
    """Flip every image horizontally within its valid region ([B, 2] fractions, default whole canvas)."""
    valid = torch.ones(batch, 2, device=device) if valid is None else valid
    scale = torch.ones(batch, 2, device=device)
    scale[:, 0] = -1
    offset = torch.zeros(batch, 2, device=device)
    offset[:, 0] = valid[:, 0]
    return BatchTransform(scale, offset)


def sample_transforms(
    batch: int,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
    flip_p: float = 0.5,
    crop: tuple[float, float] | None = (0.6, 1.0),
) -> BatchTransform:
    """Draw g ~ G per image: a crop with sides a uniform fraction in `crop` of the valid region,
    placed uniformly inside it and resized back to it, then a flip with probability `flip_p`.
    Draws happen on the CPU generator, so results do not depend on the device.
    """
    valid = torch.ones(batch, 2) if valid is None else valid.detach().cpu().float()
    if crop is not None:
        lo, hi = crop
        rel = lo + (hi - lo) * torch.rand(batch, 2, generator=generator)  # [B, 2] crop side / valid side
        start = (1 - rel) * torch.rand(batch, 2, generator=generator)  # [B, 2] in units of the valid side
    else:
        rel, start = torch.ones(batch, 2), torch.zeros(batch, 2)
    # output u in [0, v] -> source x = v * (start + rel * u / v) = rel * u + v * start
    g = BatchTransform(rel.clone(), valid * start)
    flip = torch.rand(batch, generator=generator) < flip_p
    f = hflip(batch, valid)
    f.scale[~flip], f.offset[~flip] = 1.0, 0.0
    return g.then(f)
