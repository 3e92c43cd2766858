"""Mask decoders <q, I> (Eq. 4) on flat pixels.

A decoder maps queries [Q, d] and pixel embeddings [P, D] to mask logits [Q, P]. Working on flat
pixels lets the same decoder run on a dense feature map (P = h*w), on memory samples gathered from
many images, or on a chunk of either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DotProductDecoder(nn.Module):
    """logits = q . I (Mask2Former, SOLOv2's dynamic 1x1 kernels, SOTR): d == D."""

    uses_coordinates = False

    def forward(self, queries, pixels, pixel_xy=None, query_xy=None) -> torch.Tensor:
        """queries [Q, D], pixels [P, D] -> logits [Q, P]."""
        return queries @ pixels.t()


class DynamicConvDecoder(nn.Module):
    """CondInst's dynamic mask head as a per-pixel MLP.

    Each query holds the weights of three 1x1 convolutions (widths 8, 8, 1, ReLU between) applied
    to [relative coordinates (2), pixel features (8)]: (10*8+8) + (8*8+8) + (8*1+1) = 169 parameters.
    Relative coordinates are (query location - pixel location) / size of interest, with locations
    in the same (normalised) units as `pixel_xy` and `query_xy`.

    Args:
        in_channels: pixel feature channels (8 in CondInst).
        widths: hidden widths and the output width.
        soi: size of interest used to scale relative coordinates; a scalar, or per query via
            `query_xy[:, 2]` when query_xy has 3 columns (x, y, soi).
    """

    uses_coordinates = True

    def __init__(self, in_channels: int = 8, widths: tuple[int, ...] = (8, 8, 1), soi: float = 1.0):
        super().__init__()
        self.in_channels, self.widths, self.soi = in_channels, tuple(widths), soi
        dims = [in_channels + 2, *self.widths]
        self.weight_shapes = [(dims[i + 1], dims[i]) for i in range(len(self.widths))]
        self.bias_shapes = [(dims[i + 1],) for i in range(len(self.widths))]

    def num_query_params(self, pixel_dim: int | None = None) -> int:
        return sum(o * i + o for o, i in self.weight_shapes)

    def split_params(self, queries: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """queries [Q, n_params] -> [(weight [Q, out, in], bias [Q, out]) per layer]."""
        q = queries.shape[0]
        sizes = [o * i for o, i in self.weight_shapes] + [o for o, _ in self.weight_shapes]
        parts = torch.split(queries, sizes, dim=1)
        n = len(self.widths)
        weights = [w.reshape(q, *s) for w, s in zip(parts[:n], self.weight_shapes, strict=True)]
        return list(zip(weights, parts[n:], strict=True))

    def forward(self, queries, pixels, pixel_xy, query_xy) -> torch.Tensor:
        """queries [Q, 169], pixels [P, 8], pixel_xy [P, 2], query_xy [Q, 2 or 3] -> logits [Q, P]."""
        if pixel_xy is None or query_xy is None:
            raise ValueError("DynamicConvDecoder needs pixel_xy and query_xy (relative coordinates)")
        soi = query_xy[:, 2:3] if query_xy.shape[1] == 3 else self.soi  # [Q, 1] or scalar
        rel = (query_xy[:, None, :2] - pixel_xy[None]) / (soi[:, :, None] if torch.is_tensor(soi) else soi)
        feats = pixels[None].expand(queries.shape[0], -1, -1)  # [Q, P, 8]
        x = torch.cat([rel.to(pixels.dtype), feats], dim=-1)  # [Q, P, 10]
        layers = self.split_params(queries)
        for k, (w, b) in enumerate(layers):
            x = torch.baddbmm(b[:, None, :], x, w.transpose(1, 2))  # [Q, P, out]
            if k < len(layers) - 1:
                x = F.relu(x)
        return x[..., 0]  # [Q, P]
