"""Mask decoders <q, I> (Eq. 4) on flat pixels.

A decoder maps queries [Q, d] and pixel embeddings [P, D] to mask logits [Q, P]. Working on flat
pixels lets the same decoder run on a dense feature map (P = h*w), on memory samples gathered from
many images, or on a chunk of either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iuq.core.losses import upcast


class DotProductDecoder(nn.Module):
    """logits = q . I (Mask2Former, SOLOv2's dynamic 1x1 kernels, SOTR): d == D."""

    uses_coordinates = False

    def forward(self, queries, pixels, pixel_xy=None, query_xy=None) -> torch.Tensor:
        """queries [Q, D], pixels [P, D] -> logits [Q, P]."""
        if pixels.dtype != queries.dtype and not torch.is_autocast_enabled(pixels.device.type):
            pixels = pixels.to(queries.dtype)  # a bf16 memory (iuq.memory_dtype) against fp32 queries
        return queries @ pixels.t()  # under autocast both go to its dtype, with no fp32 copy of the memory


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
            `query_xy[:, 2]` when query_xy has 3 columns (x, y, soi), or per query and axis via
            `query_xy[:, 2:4]` when it has 4 (x, y, soi_x, soi_y: a size of interest in pixels over
            the canvas width and height, when coordinates are fractions of a non-square canvas).
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
        """queries [Q, 169], pixels [P, 8], pixel_xy [P, 2], query_xy [Q, 2, 3 or 4] -> logits [Q, P]."""
        if pixel_xy is None or query_xy is None:
            raise ValueError("DynamicConvDecoder needs pixel_xy and query_xy (relative coordinates)")
        q = queries.shape[0]
        soi = query_xy[:, 2:] if query_xy.shape[1] > 2 else query_xy.new_full((q, 1), self.soi)  # [Q, 1 or 2]
        layers = self.split_params(queries)
        # Layer 1 on [rel, feats] with rel = (q_xy - p_xy) / soi is affine in [p_xy, feats]: a per-query
        # constant plus [P, 10] x [Q, 10, out], so the [Q, P, 10] input is never built. The constant
        # and the p_xy term nearly cancel near the query, so layer 1 runs in fp32 whatever the
        # autocast: in bf16 the difference would keep 1-2 significant bits.
        with torch.autocast(pixels.device.type, enabled=False):
            w1, b1 = (upcast(t) for t in layers[0])  # [Q, out, 10], [Q, out]
            w_xy = w1[:, :, :2] / soi[:, None, :].to(w1.dtype)  # [Q, out, 2]
            const = b1 + (w_xy * query_xy[:, None, :2].to(w1.dtype)).sum(-1)  # [Q, out]
            per_query = torch.cat([-w_xy, w1[:, :, 2:]], dim=2)  # [Q, out, 10] on [p_xy, feats]
            z = torch.cat([pixel_xy.to(w1.dtype), pixels.to(w1.dtype)], dim=1)  # [P, 10]
            x = torch.matmul(z[None], per_query.transpose(1, 2)) + const[:, None, :]  # [Q, P, out]
        x = x.to(queries.dtype)
        for w, b in layers[1:]:
            x = torch.baddbmm(b[:, None, :], F.relu(x), w.transpose(1, 2))  # [Q, P, out]
        return x[..., 0]  # [Q, P]
