"""The transformation group G of §3.3: horizontal flip and random crop (relative side 0.6-1.0).

A transform of a batch is, per image and per axis, an affine map from normalised *output*
coordinates u to normalised *source* coordinates x:  x = scale * u + offset  (a flip has a
negative scale). Because the map is in normalised coordinates (pixel edges at 0 and 1, pixel
centres at (i + 0.5) / n), one transform applies alike to images, masks, feature maps at any
stride, points and boxes.

The paper does not say how a crop returns to the network's input size; three readings
(`iuq.crop_mode`):
- "stretch": each side is drawn on its own and resized back to the valid region (zoom and
  aspect change);
- "keep_aspect": one relative side for both axes, resized back (zoom only);
- "no_resize": the crop stays at the original scale in the top-left corner and the rest is
  padding. Offsets and sides are multiples of the embedding stride, so g(f(I)) is an exact crop of
  f(I) (integer shifts, no resampling).

Padded batches: `valid` gives the fraction of the padded canvas covered by each image; crops are
drawn inside it, and `extent` is the region of the output that holds content: everything beyond it
is padding (zero), whatever lies at the corresponding source positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from iuq.core.losses import upcast

CROP_MODES = ("stretch", "keep_aspect", "no_resize")


@dataclass
class BatchTransform:
    """scale, offset: [B, 2] (x, y) with source = scale * output + offset, normalised coordinates.
    extent: [B, 2] (x, y) fraction of the output canvas that holds content (None: all of it)."""

    scale: torch.Tensor
    offset: torch.Tensor
    extent: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.scale.shape[0]

    def to(self, device) -> BatchTransform:
        extent = self.extent.to(device) if self.extent is not None else None
        return BatchTransform(self.scale.to(device), self.offset.to(device), extent)

    def then(self, other: BatchTransform) -> BatchTransform:
        """Composition: apply self, then `other` (other's output -> self's output -> source)."""
        extent = other.extent if other.extent is not None else self.extent
        return BatchTransform(self.scale * other.scale, self.scale * other.offset + self.offset, extent)

    def _host(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """scale, offset, extent on the CPU (where G is drawn; a no-op there): a GPU run reads them
        back once per call, not once per image."""
        return self.scale.cpu(), self.offset.cpu(), self.extent.cpu() if self.extent is not None else None

    @staticmethod
    def _source_indices(scale: torch.Tensor, offset: torch.Tensor, i: int, n: int, axis: int) -> torch.Tensor | None:
        """Integer source index of each of the n output cells along `axis` for image i (host `scale`,
        `offset`), or None when the map is not an integer shift (or flip) at this resolution."""
        s, o = float(scale[i, axis]), float(offset[i, axis])
        shift = o * n
        if abs(abs(s) - 1) > 1e-6 or abs(shift - round(shift)) > 1e-4:
            return None
        # source index j of output i: (j + 0.5) / n = s * (i + 0.5) / n + o
        return round(s) * torch.arange(n) + round(shift) + (round(s) - 1) // 2

    @staticmethod
    def _extent_masks(extent: torch.Tensor | None, rows: torch.Tensor, h: int, w: int, device) -> torch.Tensor | None:
        """[N, h, w] bool: output cells whose centre lies inside the (host) extent of image rows[n]
        (None: no extent)."""
        if extent is None:
            return None
        ex, ey = ((extent[rows, k].double() + 1e-6).float().to(device) for k in (0, 1))  # [N] each
        xs = (torch.arange(w, device=device) + 0.5) / w  # [w]
        ys = (torch.arange(h, device=device) + 0.5) / h  # [h]
        return (ys[None, :, None] < ey[:, None, None]) & (xs[None, None, :] < ex[:, None, None])

    def apply(self, x: torch.Tensor, mode: str = "bilinear", index: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C, H, W] (images, feature maps, or masks as float) -> g(x) of the same shape.

        Row n uses the transform of image `index[n]` (default n). Integer shifts and flips at x's
        resolution are exact gathers; other crops are bilinear (or nearest) samples at pixel centres.
        Output cells outside the extent, or whose source lies off the canvas, are zero. The rows of
        each kind go through one batched gather or one `grid_sample`, whatever N.
        """
        n, c, h, w = x.shape
        if n == 0:
            return x
        rows = torch.arange(n) if index is None else index.detach().cpu().long()  # [N] image of each row
        scale, offset, extent = self._host()  # one read-back per call
        shifts = [(self._source_indices(scale, offset, i, w, 0), self._source_indices(scale, offset, i, h, 1))
                  for i in rows.tolist()]  # fmt: skip
        exact = torch.tensor([jx is not None and jy is not None for jx, jy in shifts])  # [N]
        out = torch.empty_like(x)
        if exact.any():
            at = exact.nonzero()[:, 0]
            jx = torch.stack([shifts[i][0] for i in at.tolist()])  # [n_e, w]
            jy = torch.stack([shifts[i][1] for i in at.tolist()])  # [n_e, h]
            inside = ((jy >= 0) & (jy < h))[:, :, None] & ((jx >= 0) & (jx < w))[:, None, :]  # [n_e, h, w]
            at_d, jx_d, jy_d = at.to(x.device), jx.clamp(0, w - 1).to(x.device), jy.clamp(0, h - 1).to(x.device)
            gathered = x[at_d[:, None, None], :, jy_d[:, :, None], jx_d[:, None, :]]  # [n_e, h, w, C]
            out[at_d] = gathered.permute(0, 3, 1, 2) * inside[:, None].to(x.device, x.dtype)
        if not exact.all():
            at = (~exact).nonzero()[:, 0]
            # The grid and the sampling stay in fp32 whatever x's dtype: a bf16 grid puts a
            # sample up to half a cell off at 256 cells (8 bits of mantissa).
            src = upcast(x[at.to(x.device)])
            s, o = scale[rows[at]].to(src.dtype), offset[rows[at]].to(src.dtype)  # [n_b, 2]
            # affine_grid works in [-1, 1] (align_corners=False: -1 and 1 are the outer pixel
            # edges): src_n = 2 * (s * (out_n + 1) / 2 + o) - 1 = s * out_n + (s + 2 * o - 1).
            theta = torch.zeros(len(at), 2, 3, dtype=src.dtype)
            theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
            theta[:, :, 2] = s + 2 * o - 1
            with torch.autocast(x.device.type, enabled=False):
                grid = F.affine_grid(theta.to(x.device), [len(at), c, h, w], align_corners=False)
                y = F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=False)
            out[at.to(x.device)] = y.to(x.dtype)
        keep = self._extent_masks(extent, rows, h, w, x.device)
        return out if keep is None else out * keep[:, None].to(out.dtype)

    def apply_masks(self, masks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """masks [K, H, W] bool of images `index` [K] -> g(masks) [K, H, W] bool (nearest)."""
        if masks.shape[0] == 0:
            return masks
        return self.apply(masks[:, None].float(), mode="nearest", index=index)[:, 0] > 0.5

    def apply_points(self, xy: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Source points xy [N, 2] normalised, of images `index` [N] -> output coordinates [N, 2]."""
        return (xy - self.offset[index]) / self.scale[index]

    def apply_boxes(self, boxes: torch.Tensor, index: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """boxes [N, 4] xyxy in pixels of an (H, W) canvas -> transformed, clipped to the extent."""
        h, w = size
        norm = boxes.new_tensor([w, h, w, h])
        p1 = self.apply_points(boxes[:, :2] / norm[:2], index)
        p2 = self.apply_points(boxes[:, 2:] / norm[:2], index)
        hi = self.extent[index] if self.extent is not None else torch.ones_like(p1)
        lo, up = torch.minimum(p1, p2), torch.maximum(p1, p2)
        out = torch.cat([lo.clamp(min=0).minimum(hi), up.clamp(min=0).minimum(hi)], 1)
        return out * norm


def hflip(batch: int, valid: torch.Tensor | None = None, device=None) -> BatchTransform:
    """Flip every image horizontally within its valid region ([B, 2] fractions, default whole canvas)."""
    valid = torch.ones(batch, 2, device=device) if valid is None else valid
    scale = torch.ones(batch, 2, device=device)
    scale[:, 0] = -1
    offset = torch.zeros(batch, 2, device=device)
    offset[:, 0] = valid[:, 0]
    return BatchTransform(scale, offset, valid.clone())


def sample_transforms(
    batch: int,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
    flip_p: float = 0.5,
    crop: tuple[float, float] | None = (0.6, 1.0),
    mode: str = "stretch",
    canvas: tuple[int, int] | None = None,
    align: int = 1,
) -> BatchTransform:
    """Draw g ~ G per image: a crop with sides a uniform fraction in `crop` of the valid region,
    placed uniformly inside it, then a flip (within the crop's output region) with probability
    `flip_p`. `mode` is one of CROP_MODES; "no_resize" needs the `canvas` (H, W) in pixels and
    rounds crop sides and offsets down to multiples of `align` pixels (the embedding stride).
    Draws happen on the CPU generator, so results do not depend on the device.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"iuq.crop_mode: {mode!r} is not one of {CROP_MODES}")
    valid = torch.ones(batch, 2) if valid is None else valid.detach().cpu().float()
    if crop is not None:
        lo, hi = crop
        rel = lo + (hi - lo) * torch.rand(batch, 2, generator=generator)  # [B, 2] crop side / valid side
        place = torch.rand(batch, 2, generator=generator)  # [B, 2] where the crop sits within the slack
        if mode != "stretch":  # one relative side for both axes
            rel = rel[:, :1].expand(batch, 2).clone()
    else:
        rel, place = torch.ones(batch, 2), torch.zeros(batch, 2)
    start = (1 - rel) * place  # [B, 2] in units of the valid side
    if mode == "no_resize":
        if canvas is None:
            raise ValueError("crop mode 'no_resize' needs the canvas size (H, W) in pixels")
        size = torch.tensor([canvas[1], canvas[0]], dtype=torch.float32)  # (x, y) pixels
        valid_px = (valid * size).round()
        side = torch.clamp((rel * valid_px / align).floor() * align, min=align)
        side = torch.minimum(side, valid_px)
        first = (place * (valid_px - side) / align).floor() * align
        # output u in [0, side) is source x = u + first (in pixels): a pure shift at the original scale
        g = BatchTransform(torch.ones(batch, 2), first / size, side / size)
    else:
        # output u in [0, v] -> source x = v * (start + rel * u / v) = rel * u + v * start
        g = BatchTransform(rel.clone(), valid * start, valid.clone())
    flip = torch.rand(batch, generator=generator) < flip_p
    f = hflip(batch, g.extent)
    f.scale[~flip], f.offset[~flip] = 1.0, 0.0
    return g.then(f)
