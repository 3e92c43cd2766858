"""External memory of instance pixel embeddings (§3.3): a FIFO queue of fixed capacity."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from iuq.core.sampling import PixelSamples


class PixelMemory(nn.Module):
    """FIFO queue of C pixel samples: embeddings [C, D], positions [C, 2], source image ids [C].

    The queue lives in buffers, so it moves with `.to(device)` and is saved in `state_dict()` (a
    resumed run continues with the same memory). Under torch.distributed every rank enqueues the
    samples of all ranks, so all ranks hold the same memory.
    """

    def __init__(self, capacity: int = 100_000, dim: int = 256, dtype: torch.dtype = torch.float32):
        super().__init__()
        if capacity <= 0:
            raise ValueError(f"memory capacity must be positive, got {capacity}")
        self.capacity, self.dim = capacity, dim
        self.register_buffer("embeddings", torch.zeros(capacity, dim, dtype=dtype))
        self.register_buffer("xy", torch.zeros(capacity, 2))
        self.register_buffer("image_ids", torch.full((capacity,), -1, dtype=torch.int64))
        self.register_buffer("labels", torch.full((capacity,), -1, dtype=torch.int64))  # diagnostics only
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))  # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))  # valid entries

    def __len__(self) -> int:
        return int(self.count)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before labels were kept: their entries' classes are unknown (-1).
        state_dict.setdefault(prefix + "labels", torch.full((self.capacity,), -1, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def contents(self) -> PixelSamples:
        """The valid entries (in slot order; the loss does not depend on order)."""
        n = len(self)
        return PixelSamples(self.embeddings[:n], self.xy[:n], self.image_ids[:n], self.labels[:n])

    @torch.no_grad()
    def enqueue(self, samples: PixelSamples) -> None:
        """Append samples (oldest entries are overwritten once full); gathers across ranks."""
        emb, xy, ids, labels = samples.embeddings.detach(), samples.xy.detach(), samples.image_ids, samples.labels
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            emb, xy, ids, labels = _all_gather_rows(emb, xy, ids, labels)
        n = emb.shape[0]
        if n == 0:
            return
        if n > self.capacity:  # only the newest C survive
            emb, xy, ids, labels = (t[-self.capacity :] for t in (emb, xy, ids, labels))
            n = self.capacity
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.capacity  # [n]
        self.embeddings[slots] = emb.to(self.embeddings)
        self.xy[slots] = xy.to(self.xy)
        self.image_ids[slots] = ids.to(self.image_ids)
        self.labels[slots] = labels.to(self.labels)
        self.ptr.copy_((self.ptr + n) % self.capacity)
        self.count.copy_(torch.clamp(self.count + n, max=self.capacity))


def _all_gather_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Concatenate each tensor's rows over all ranks, in rank order; row counts may differ by rank."""
    world = dist.get_world_size()
    n = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    out = []
    for t in tensors:
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]))
    return out
