"""Inter-scene instance discrimination, the second term of Eq. 5.

Each matched query q_n of image I is decoded on instance pixels of *other* images - the rest of
the batch and the external memory - and every (query, pixel) response is pushed toward 0:

    L_inter = mean over pairs (n, p) with image(n) != image(p) of  loss(<q_n, pixel_p>, 0)

With Q queries and a memory of P = 100k pixels, the [Q, P] logits and the focal loss's
intermediates would take gigabytes. `inter_scene_loss` therefore walks over pixel chunks and, in
the same pass, computes each chunk's gradient with respect to the queries (the loss's derivative in
closed form, autograd through the decoder only); only that gradient ([Q, d]) is kept for backward.
Peak memory is one chunk's, and no forward is ever recomputed, so the result equals the naive
computation (values and gradients, to rounding) at no extra compute.

Pixels are constants here (detached samples and memory entries); gradients flow to the queries,
which for a dynamic decoder are the per-query filter parameters. The decoder must have no parameters
of its own (ours have none). `inter_scene_loss_with_batch_grad` is the reading in which the batch's
own negatives also carry gradient into their pixel embeddings (Eq. 5 has no stop-gradient).
"""

from __future__ import annotations

import contextlib

import torch

from iuq.core.losses import elementwise_toward_zero, toward_zero_with_grad, upcast
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
    reduction: str = "mean",
    query_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (or, with reduction="sum", sum of the) per-pair loss toward 0 over (query, pixel) pairs
    of different images.

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
        query_weights: [Q] weight of each query's pairs, in the sum and in the pair count (default 1;
            `iuq.query_reduction: instance` gives a query 1 / its instance's number of queries).

    Returns a scalar; with no valid pair it is a zero that stays connected to `queries`.
    """
    if loss not in ("focal", "bce", "l1", "l2"):
        raise ValueError(f"unknown inter-scene loss {loss!r}; choose one of 'focal', 'bce', 'l1', 'l2'")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if isinstance(decoder, torch.nn.Module) and any(p.requires_grad for p in decoder.parameters()):
        # The chunked backward returns the queries' gradient only: the decoder's weights would get none.
        raise ValueError(
            f"{type(decoder).__name__} has parameters of its own, which L_inter's chunked path cannot train; "
            "a decoder must be parameter-free (<q, I> with per-query weights), or compute L_inter with "
            "inter_scene_loss_naive under plain autograd"
        )
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
        reduction == "mean",
        query_weights,
    )


def pair_count(
    query_image_ids: torch.Tensor, pixel_image_ids: torch.Tensor, query_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Number of (query, pixel) pairs from different images (each query's pairs weighted by
    `query_weights`), without forming the [Q, P] matrix: sum of weights x P minus, per image id,
    (its queries' weights) x (its pixels)."""
    ids, inverse = torch.unique(torch.cat([query_image_ids, pixel_image_ids]), return_inverse=True)
    nq = query_image_ids.shape[0]
    w = torch.ones(nq, device=query_image_ids.device) if query_weights is None else query_weights.float()
    q = torch.zeros(ids.shape[0], device=w.device).index_add_(0, inverse[:nq], w)
    p = torch.bincount(inverse[nq:], minlength=ids.shape[0]).to(w.dtype)
    total = w.sum() * pixel_image_ids.shape[0] - (q * p).sum()
    return total if query_weights is not None else total.round().long()


def inter_scene_loss_with_batch_grad(
    queries: torch.Tensor,
    query_image_ids: torch.Tensor,
    batch: PixelSamples,
    memory: PixelSamples | None,
    decoder,
    query_xy: torch.Tensor | None = None,
    loss: str = "focal",
    alpha: float = 0.1,
    gamma: float = 2.5,
    chunk_size: int = 16384,
    query_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_inter (mean over pairs of different images) where the batch's negatives keep their graph,
    so the term also pushes the other images' pixel embeddings; memory entries stay constants.

    The batch part is small (a few thousand pixels) and runs under plain autograd; the memory part
    is the chunked sum. Both are divided by the total number of pairs, so the value equals
    `inter_scene_loss` on the concatenated negatives.
    """
    total = inter_scene_loss_naive(
        queries,
        query_image_ids,
        batch.embeddings,
        batch.image_ids,
        decoder,
        batch.xy,
        query_xy,
        loss,
        alpha,
        gamma,
        reduction="sum",
        pixel_grad=True,
        query_weights=query_weights,
    )
    count = pair_count(query_image_ids, batch.image_ids, query_weights)
    if memory is not None and len(memory) > 0:
        total = total + inter_scene_loss(
            queries,
            query_image_ids,
            memory.embeddings.to(queries.dtype),
            memory.image_ids,
            decoder,
            memory.xy,
            query_xy,
            loss,
            alpha,
            gamma,
            chunk_size,
            reduction="sum",
            query_weights=query_weights,
        )
        count = count + pair_count(query_image_ids, memory.image_ids, query_weights)
    return total / count.to(total.dtype).clamp(min=1e-12)


@torch.no_grad()
def inter_scene_diagnostics(
    queries: torch.Tensor,
    query_image_ids: torch.Tensor,
    query_labels: torch.Tensor,
    negatives: PixelSamples,
    decoder,
    query_xy: torch.Tensor | None = None,
    loss: str = "focal",
    alpha: float = 0.1,
    gamma: float = 2.5,
    chunk_size: int = 16384,
) -> dict[str, torch.Tensor]:
    """L_inter split by negatives of the query's own class ("same") and of other classes ("other"),
    with the fraction of pairs that fire (sigmoid > 0.5) and the share of same-class pairs.
    Negatives of unknown class (-1) are left out of both."""
    sums = torch.zeros(6, dtype=torch.float64, device=queries.device)  # loss, fired, count x (same, other)
    for start in range(0, len(negatives), chunk_size):
        stop = start + chunk_size
        xy = negatives.xy[start:stop]
        logits = decoder(queries, negatives.embeddings[start:stop].to(queries.dtype), xy, query_xy)  # [Q, p]
        per_pair = elementwise_toward_zero(logits, loss, alpha, gamma)
        valid = query_image_ids[:, None] != negatives.image_ids[None, start:stop]
        known = negatives.labels[None, start:stop] >= 0
        same = valid & known & (query_labels[:, None] == negatives.labels[None, start:stop])
        other = valid & known & ~same
        fired = logits > 0
        for k, m in enumerate((same, other)):
            sums[k] += per_pair[m].double().sum()
            sums[2 + k] += fired[m].double().sum()
            sums[4 + k] += m.double().sum()
    n_same, n_other = sums[4].clamp(min=1), sums[5].clamp(min=1)
    return {
        "inter_same_class": sums[0] / n_same,
        "inter_other_class": sums[1] / n_other,
        "inter_fire_same_class": sums[2] / n_same,
        "inter_fire_other_class": sums[3] / n_other,
        "inter_same_class_pairs": sums[4] / (sums[4] + sums[5]).clamp(min=1),
    }


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
    reduction="mean",
    pixel_grad=False,
    query_weights=None,
) -> torch.Tensor:
    """The full [Q, P] computation under plain autograd: the reference of tests and benchmarks,
    and the batch part of `inter_scene_loss_with_batch_grad` (pixel_grad=True)."""
    logits = decoder(queries, pixels if pixel_grad else pixels.detach(), pixel_xy, query_xy)  # [Q, P]
    valid = (query_image_ids[:, None] != pixel_image_ids[None, :]).to(logits.dtype)  # [Q, P]
    if query_weights is not None:
        valid = valid * query_weights[:, None].to(logits.dtype)
    per_pair = elementwise_toward_zero(logits, loss, alpha, gamma)
    total = torch.where(valid > 0, valid * per_pair, 0).sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1e-12)


class _ChunkedInterScene(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, query_ids, pixels, pixel_ids, pixel_xy, query_xy, decoder, loss, alpha, gamma, chunk, mean, weights):  # noqa: E501  # fmt: skip
        needs_grad = ctx.needs_input_grad[0]
        acc = torch.promote_types(queries.dtype, torch.float32)  # accumulate fp16/bf16 in fp32
        total = torch.zeros((), dtype=acc, device=queries.device)
        grad = torch.zeros_like(queries, dtype=acc) if needs_grad else None
        count = torch.zeros((), dtype=acc, device=queries.device)
        # The inner autograd.grad below is not seen by a GradScaler: under fp16 autocast its
        # per-pair gradients would underflow unscaled, so the chunks then run in fp32. bf16 has
        # fp32's range and keeps the autocast.
        device = queries.device.type
        fp32_chunks = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        precision = torch.autocast(device, enabled=False) if fp32_chunks else contextlib.nullcontext()
        q = queries.detach()
        q = (upcast(q) if fp32_chunks else q).requires_grad_(needs_grad)
        for start in range(0, pixels.shape[0], chunk):
            stop = start + chunk
            valid = (query_ids[:, None] != pixel_ids[None, start:stop]).to(acc)  # [Q, p]
            if weights is not None:
                valid = valid * weights[:, None].to(acc)
            with torch.enable_grad(), precision:
                xy = pixel_xy[start:stop] if pixel_xy is not None else None
                p = upcast(pixels[start:stop]) if fp32_chunks else pixels[start:stop]
                logits = decoder(q, p, xy, query_xy)  # [Q, p]
                # The loss and its derivative in closed form; autograd only through the decoder.
                value, slope = toward_zero_with_grad(logits.detach(), loss, alpha, gamma)  # [Q, p] each
                part = torch.where(valid > 0, valid * value, 0).sum()
                if needs_grad:  # inside `precision`: the backward runs under the autocast state of this call
                    slope = torch.where(valid > 0, valid * slope, 0).to(logits.dtype)
                    grad += torch.autograd.grad(logits, q, grad_outputs=slope)[0]
            total += part.to(acc)
            count += valid.sum()
        n = count.clamp(min=1e-12) if mean else torch.ones((), dtype=acc, device=queries.device)
        ctx.query_dtype = queries.dtype
        if needs_grad:
            ctx.save_for_backward(grad / n)
        return (total / n).to(queries.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad_output * grad).to(ctx.query_dtype), *([None] * 12)
