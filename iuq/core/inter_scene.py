"""Inter-scene instance discrimination, the second term of Eq. 5.

Each matched query q_n of image I is decoded on instance pixels of *other* images - the rest of
the batch and the external memory - and every (query, pixel) response is pushed toward 0:

    L_inter = mean over pairs (n, p) with image(n) != image(p) of  loss(<q_n, pixel_p>, 0)

With Q queries and a memory of P = 100k pixels, the [Q, P] logits and the focal loss's
intermediates would take gigabytes. `inter_scene_loss` therefore walks over pixel chunks and, in
the same pass, computes each chunk's gradient with respect to the queries; only that gradient
([Q, d]) is kept for backward. Peak memory is one chunk's, and no forward is ever recomputed, so
the result equals the naive computation (values and gradients) at no extra compute.

Pixels are constants (detached samples and memory entries); gradients flow to the queries, which
for a dynamic decoder are the per-query filter parameters. The decoder must have no parameters of
its own (ours have none).
"""

from __future__ import annotations

import torch

from iuq.core.losses import elementwise_toward_zero
from iuq.core.memory import PixelMemory
from iuq.core.sampling import PixelSamples


def inter_scene_negatives(batch: PixelSamples, memory: PixelMemory | None, mode: str = "memory") -> PixelSamples:
    """The pixels each query is contrasted with.

    "memory": this batch's samples and the memory (Eq. 5 with the external memory, the default);
    "minibatch": this batch's samples only (Table 4c, row 2). Pairs from the query's own image are
    removed later by image id, which also covers memory entries from an earlier view of that image.
    """
    if mode not in ("memory", "minibatch"):
        raise ValueError(f"unknown inter-scene mode {mode!r}; use 'memory' or 'minibatch'")
    if mode == "minibatch" or memory is None or len(memory) == 0:
        return batch
    mem = memory.contents()
    return PixelSamples.cat([batch, PixelSamples(mem.embeddings.to(batch.embeddings.dtype), mem.xy, mem.image_ids)])


def inter_scene_loss(
    queries: torch.Tensor,
    query_image_ids: torch.Tensor,
    pixels: torch.Tensor,
    pixel_image_ids: torch.Tensor,
    decoder,
    pixel_xy: torch.Tensor | None = None,
    query_xy: torch.Tensor | None = None,
    loss: str = "focal",
    alpha: float = 0.1,
    gamma: float = 2.5,
    chunk_size: int = 16384,
) -> torch.Tensor:
    """Mean per-pair loss toward 0 over (query, pixel) pairs of different images.

    Args:
        queries: [Q, d] matched queries (or per-query decoder parameters), with grad.
        query_image_ids: [Q] source image id of each query.
        pixels: [P, D] pixel embeddings (treated as constants).
        pixel_image_ids: [P] source image id of each pixel.
        decoder: callable (queries, pixels, pixel_xy, query_xy) -> logits [Q, P].
        pixel_xy, query_xy: [P, 2] and [Q, 2 or 3] coordinates for decoders that use them.
        loss: "focal" (alpha, gamma), "bce", "l1" or "l2" (Table 4a).
        chunk_size: pixels per chunk; bounds peak memory at about Q * chunk_size elements per
            intermediate.

    Returns a scalar; with no valid pair it is a zero that stays connected to `queries`.
    """
    if loss not in ("focal", "bce", "l1", "l2"):
        raise ValueError(f"unknown inter-scene loss {loss!r}; choose one of 'focal', 'bce', 'l1', 'l2'")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _ChunkedInterScene.apply(
        queries,
        query_image_ids,
        pixels.detach(),
        pixel_image_ids,
        pixel_xy,
        query_xy,
        decoder,
        loss,
        alpha,
        gamma,
        chunk_size,
    )


def inter_scene_loss_naive(
    queries,
    query_image_ids,
    pixels,
    pixel_image_ids,
    decoder,
    pixel_xy=None,
    query_xy=None,
    loss="focal",
    alpha=0.1,
    gamma=2.5,
) -> torch.Tensor:
    """Reference: the full [Q, P] computation under plain autograd (tests and benchmarks)."""
    logits = decoder(queries, pixels.detach(), pixel_xy, query_xy)  # [Q, P]
    valid = query_image_ids[:, None] != pixel_image_ids[None, :]  # [Q, P]
    per_pair = elementwise_toward_zero(logits, loss, alpha, gamma)
    return torch.where(valid, per_pair, 0).sum() / valid.sum().clamp(min=1)


class _ChunkedInterScene(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, query_ids, pixels, pixel_ids, pixel_xy, query_xy, decoder, loss, alpha, gamma, chunk):
        needs_grad = ctx.needs_input_grad[0]
        acc = torch.promote_types(queries.dtype, torch.float32)  # accumulate fp16/bf16 in fp32
        total = torch.zeros((), dtype=acc, device=queries.device)
        grad = torch.zeros_like(queries, dtype=acc) if needs_grad else None
        count = torch.zeros((), dtype=torch.int64, device=queries.device)
        q = queries.detach().requires_grad_(needs_grad)
        for start in range(0, pixels.shape[0], chunk):
            stop = start + chunk
            valid = query_ids[:, None] != pixel_ids[None, start:stop]  # [Q, p]
            with torch.enable_grad():
                xy = pixel_xy[start:stop] if pixel_xy is not None else None
                logits = decoder(q, pixels[start:stop], xy, query_xy)  # [Q, p]
                part = torch.where(valid, elementwise_toward_zero(logits, loss, alpha, gamma), 0).sum()
            if needs_grad:
                grad += torch.autograd.grad(part, q)[0]
            total += part.detach().to(acc)
            count += valid.sum()
        n = count.clamp(min=1).to(acc)
        ctx.query_dtype = queries.dtype
        if needs_grad:
            ctx.save_for_backward(grad / n)
        return (total / n).to(queries.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad_output * grad).to(ctx.query_dtype), *([None] * 10)
