"""Which instance pixels enter the external memory (§3.2, Table 4b).

All strategies draw from instance pixels only (background is never sampled) of detached pixel
embeddings, after downsampling the ground-truth masks to the embedding grid: a grid cell belongs
to an instance when at least half of it is covered. Sampling is vectorised: one random key per
candidate pixel, a sort by (group, key), and a rank cut-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PixelSamples:
    """N sampled pixels: `embeddings` [N, D], `xy` [N, 2] normalised (x, y) in [0, 1] of the
    embedding grid (pixel centres), `image_ids` [N] int64 source image ids, `labels` [N] int64 class
    of each pixel's instance (-1: unknown; only diagnostics read it)."""

    embeddings: torch.Tensor
    xy: torch.Tensor
    image_ids: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.labels is None:
            self.labels = torch.full_like(self.image_ids, -1)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @staticmethod
    def cat(parts: list[PixelSamples]) -> PixelSamples:
        keys = ("embeddings", "xy", "image_ids", "labels")
        return PixelSamples(*(torch.cat([getattr(p, k) for p in parts]) for k in keys))


def downsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """masks [K, H, W] bool at image resolution -> [K, h, w] bool, majority vote per grid cell."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return F.adaptive_avg_pool2d(masks[:, None].float(), size)[:, 0] >= 0.5


def grid_xy(h: int, w: int, device=None) -> torch.Tensor:
    """Normalised pixel-centre coordinates of an h x w grid -> [h*w, 2] (x, y)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], dim=1)


def sample_pixels(
    embeddings: torch.Tensor,
    masks: list[torch.Tensor],
    image_ids: torch.Tensor | list[int],
    strategy: str = "instance_balanced",
    k: int = 50,
    generator: torch.Generator | None = None,
    labels: list[torch.Tensor] | None = None,
    detach: bool = True,
) -> PixelSamples:
    """Sample instance pixels of a batch.

    Args:
        embeddings: [B, D, h, w] pixel embeddings (detached here).
        masks: B tensors [K_i, H, W] bool, ground truth at image resolution (H, W multiples of h, w).
        image_ids: [B] source image ids, stored with each sample.
        strategy: "instance_balanced" (k per instance, all if fewer), "sparse" (k per image over the
            union of its instances, all if fewer) or "dense" (every instance pixel).
        generator: torch.Generator on the embeddings' device, for reproducible draws.
        labels: B tensors [K_i], the class of each instance, stored with its pixels.
        detach: False keeps the samples connected to `embeddings` (L_inter with batch gradient).
    """
    b, d, h, w = embeddings.shape
    device = embeddings.device
    image_ids = torch.as_tensor(image_ids, dtype=torch.int64, device=device)
    emb = (embeddings.detach() if detach else embeddings).flatten(2).transpose(1, 2).reshape(b * h * w, d)  # [B*h*w, D]
    small = [downsample_masks(m.to(device), (h, w)) for m in masks]  # B x [K_i, h, w]
    counts = torch.tensor([m.shape[0] for m in small], device=device)
    if int(counts.sum()) == 0:
        return PixelSamples(emb[:0], emb.new_zeros((0, 2)), image_ids[:0])
    if labels is None:
        inst_labels = torch.full((int(counts.sum()),), -1, dtype=torch.int64, device=device)
    else:
        inst_labels = torch.cat([torch.as_tensor(lab, dtype=torch.int64).to(device) for lab in labels])  # [K]
    inst_masks = torch.cat(small).flatten(1)  # [K, h*w]
    inst_image = torch.repeat_interleave(torch.arange(b, device=device), counts)  # [K]
    inst, pix = inst_masks.nonzero(as_tuple=True)  # candidates, grouped by instance
    if strategy == "instance_balanced":
        group = inst
    elif strategy == "sparse":
        # Union of instances per image: visible masks do not overlap, but be safe with duplicates.
        flat = inst_image[inst] * (h * w) + pix
        flat = torch.unique(flat)
        group, pix = flat // (h * w), flat % (h * w)
        inst = None
    elif strategy == "dense":
        group = None
    else:
        raise ValueError(f"unknown sampling strategy {strategy!r}; use instance_balanced, sparse or dense")
    if group is not None:
        keys = torch.rand(group.shape[0], device=device, generator=generator, dtype=torch.float64)
        order = torch.argsort(group.double() + keys)  # by group, random within group
        group_sorted = group[order]
        sizes = torch.bincount(group_sorted)
        starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.arange(order.shape[0], device=device) - starts[group_sorted]
        keep = order[rank < k]
        pix = pix[keep]
        inst = inst[keep] if inst is not None else None
        img = inst_image[inst] if inst is not None else group[keep]
    else:
        img = inst_image[inst]
    rows = img * (h * w) + pix
    if inst is None:  # sparse: pixels of the union; look up the instance of each kept pixel
        owner = torch.full((b * h * w,), -1, dtype=torch.int64, device=device)
        all_inst, all_pix = inst_masks.nonzero(as_tuple=True)
        owner[inst_image[all_inst] * (h * w) + all_pix] = all_inst
        inst = owner[rows]
    return PixelSamples(emb[rows], grid_xy(h, w, device)[pix], image_ids[img], inst_labels[inst])
