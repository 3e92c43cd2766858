"""IUQCriterion: the two objectives of one training step, for any training loop.

It only orchestrates the pure pieces (sampling, memory, Eq. 5, Eq. 8) in the order of a step:

    terms, samples = criterion(...)        # L_inter and L_equi, unweighted
    loss = base_loss + sum(criterion.weights[k] * terms[k] for k in terms)
    loss.backward(); optimizer.step()
    criterion.update_memory(samples)       # after the loss: a batch never contrasts with itself twice

Views: a batch of B images may come with their transformed views g(I). All per-view inputs list
the B original views first, then the B g-views (V * B entries, V = 1 or 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from iuq.core.config import IUQConfig
from iuq.core.equivariance import equivariance_loss
from iuq.core.inter_scene import (
    inter_scene_diagnostics,
    inter_scene_loss,
    inter_scene_loss_with_batch_grad,
    inter_scene_negatives,
)
from iuq.core.memory import PixelMemory
from iuq.core.sampling import PixelSamples, sample_pixels
from iuq.core.transforms import BatchTransform


class IUQCriterion(nn.Module):
    """Args:
    cfg: the method's settings.
    decoder: the base model's <q, I> on flat pixels.
    pixel_dim: channels D of the pixel embeddings stored in memory.
    mask_loss: the base model's mask loss (logits [Q, P], targets [Q, P], num_masks) -> scalar, reused
        as L_equi.
    mask_loss_weight: the base model's weight of its mask loss; L_inter carries it under
        `inter_scale: mask_weight` (Eq. 5 read as part of L_mask).
    mask_upsample: how many times finer than the pixel embeddings the base model's mask loss is taken
        (CondInst: 2); L_equi is supervised on that grid.
    """

    def __init__(
        self,
        cfg: IUQConfig,
        decoder: nn.Module,
        pixel_dim: int,
        mask_loss: Callable,
        mask_loss_weight: float = 1.0,
        mask_upsample: int = 1,
    ):
        super().__init__()
        self.cfg, self.decoder, self.mask_loss = cfg, decoder, mask_loss
        self.mask_loss_weight, self.mask_upsample = mask_loss_weight, mask_upsample
        use_memory = cfg.inter and cfg.inter_mode == "memory"
        self.memory = (
            PixelMemory(cfg.memory_capacity, pixel_dim, getattr(torch, cfg.memory_dtype)) if use_memory else None
        )
        if cfg.inter and cfg.inter_center:  # running mean of instance-pixel embeddings; count 0: none yet
            self.register_buffer("center", torch.zeros(pixel_dim))
            self.register_buffer("center_count", torch.zeros((), dtype=torch.int64))

    @property
    def weights(self) -> dict[str, float]:
        """The weights of L_inter and L_equi at full strength."""
        c = self.cfg
        inter = c.inter_weight * (self.mask_loss_weight if c.inter_scale == "mask_weight" else 1.0)
        equi = c.equi_weight / (self.mask_loss_weight if c.equi_weight_base == "unit" else 1.0)
        return {"loss_inter": inter, "loss_equi": equi}

    def weights_at(self, step: int | None) -> dict[str, float]:
        """The weights at optimiser step `step` (0-based): ramped linearly from 0 over
        `warmup_steps` (step s trains with (s + 1) / warmup_steps of each), then constant."""
        ramp = 1.0
        if self.cfg.warmup_steps > 0 and step is not None:
            ramp = min(1.0, (step + 1) / self.cfg.warmup_steps)
        return {name: w * ramp for name, w in self.weights.items()}

    def centred(self, samples: PixelSamples) -> PixelSamples:
        """Negatives as L_inter decodes them: minus the running mean under `inter_center` (before
        any update, this batch's own mean), detached either way."""
        if not (self.cfg.inter and self.cfg.inter_center) or len(samples) == 0:
            return samples
        center = self.center if int(self.center_count) > 0 else samples.embeddings.detach().float().mean(0)
        centred = samples.embeddings - center.to(samples.embeddings.dtype)
        return PixelSamples(centred, samples.xy, samples.image_ids, samples.labels)

    @torch.no_grad()
    def _update_center(self, samples: PixelSamples) -> None:
        emb = samples.embeddings.detach().float()
        stats = torch.cat([emb.sum(0), emb.new_tensor([emb.shape[0]])])  # [D + 1]: sum, count
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)  # every rank keeps the same mean
        if stats[-1] == 0:
            return
        mean = stats[:-1] / stats[-1]
        m = self.cfg.inter_center_momentum if int(self.center_count) > 0 else 0.0
        self.center.mul_(m).add_(mean.to(self.center.device), alpha=1 - m)
        self.center_count += 1

    def chunk_size(self, device: torch.device, queries: int) -> int:
        """Pixels per chunk of L_inter: on a CPU `chunk_size`, or about `cpu_chunk_pairs` pairs (at most
        `chunk_size` pixels); on CUDA about `cuda_chunk_pairs` pairs (at least `chunk_size` pixels)."""
        c = self.cfg
        if device.type != "cuda":
            if c.cpu_chunk_pairs is None:
                return c.chunk_size
            return max(256, min(c.chunk_size, c.cpu_chunk_pairs // max(queries, 1)))
        return max(c.chunk_size, c.cuda_chunk_pairs // max(queries, 1))

    def query_weights(self, query_instances: list[torch.Tensor] | None, count: int) -> list[torch.Tensor] | None:
        """Per view-image, the weight of each query under `query_reduction` (None: all 1)."""
        if self.cfg.query_reduction == "location" or query_instances is None:
            return None
        out = []
        for inst in query_instances[:count]:
            inst = inst.long()
            out.append(1.0 / torch.bincount(inst)[inst].float() if inst.numel() else inst.float())
        return out

    def sample(
        self,
        pixel_embeddings: torch.Tensor,
        gt_masks: list[torch.Tensor],
        image_ids: torch.Tensor,
        generator: torch.Generator | None = None,
        gt_labels: list[torch.Tensor] | None = None,
    ) -> PixelSamples:
        """Instance pixels of a batch, by the configured strategy (kept connected to the embeddings
        under `inter_batch_grad`; the memory detaches what it stores)."""
        k = self.cfg.samples_per_image if self.cfg.sampling == "sparse" else self.cfg.samples_per_instance
        detach = not (self.cfg.inter and self.cfg.inter_batch_grad)
        return sample_pixels(
            pixel_embeddings, gt_masks, image_ids, self.cfg.sampling, k, generator, gt_labels, detach=detach
        )

    def inter_queries(self, queries: list[torch.Tensor], image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries that enter L_inter ([N, d]) and their image ids ([N]), by `inter_views`."""
        b = image_ids.shape[0]
        if self.cfg.inter_views == "original":
            queries = queries[:b]
        q_ids = [image_ids[i % b].expand(q.shape[0]) for i, q in enumerate(queries)]
        return torch.cat(queries), torch.cat(q_ids)

    def diagnose_inter(
        self,
        queries: list[torch.Tensor],
        query_labels: list[torch.Tensor],
        image_ids: torch.Tensor,
        samples,
        query_xy: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """L_inter split by same-class and other-class negatives, and how many pairs fire (logs only)."""
        image_ids = torch.as_tensor(image_ids, dtype=torch.int64, device=samples.embeddings.device)
        q, q_ids = self.inter_queries([x.detach() for x in queries], image_ids)
        b = image_ids.shape[0]
        original = self.cfg.inter_views == "original"
        labels = query_labels[:b] if original else query_labels
        q_xy = None if query_xy is None else torch.cat(query_xy[:b] if original else query_xy)
        negatives = self.centred(inter_scene_negatives(samples, self.memory, self.cfg.inter_mode))
        c = self.cfg
        return inter_scene_diagnostics(
            q,
            q_ids,
            torch.cat(labels).to(q.device),
            negatives,
            self.decoder,
            query_xy=q_xy,
            loss=c.inter_loss,
            alpha=c.focal_alpha,
            gamma=c.focal_gamma,
            chunk_size=self.chunk_size(q.device, q.shape[0]),
        )

    def forward(
        self,
        pixel_embeddings: torch.Tensor,
        queries: list[torch.Tensor],
        target_masks: list[torch.Tensor],
        gt_masks: list[torch.Tensor],
        image_ids: torch.Tensor,
        g: BatchTransform | None = None,
        query_xy: list[torch.Tensor] | None = None,
        num_masks: float | None = None,
        generator: torch.Generator | None = None,
        gt_labels: list[torch.Tensor] | None = None,
        valid_g: torch.Tensor | None = None,
        query_instances: list[torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], PixelSamples]:
        """L_inter and L_equi of one batch (unweighted) and the samples to enqueue afterwards.

        Args:
            pixel_embeddings: [V*B, D, h, w] f of every view (with grad).
            queries: V*B tensors [Q_i, d], the matched queries of each view (with grad).
            target_masks: V*B tensors [Q_i, H, W] bool, the matched ground truth of each query
                (already transformed for g-views).
            gt_masks: B tensors [K_i, H, W] bool, all instances of the original views.
            image_ids: [B] source image ids (dataset-wide, so memory entries of an image are
                recognised in later epochs).
            g: the transforms of the g-views (None when there are none).
            query_xy: V*B tensors [Q_i, 2 or 3] for decoders with coordinates.
            num_masks: normaliser of L_equi (the base model's, e.g. all-reduced mask count).
            gt_labels: B tensors [K_i], classes of `gt_masks` (kept with the samples, for diagnostics).
            valid_g: [B, h, w] bool, non-padding cells of the g-views' embeddings ("feature" variant).
            query_instances: V*B tensors [Q_i], the instance (index into that view's targets) each
                query is matched to, for `query_reduction: instance` (None: one query per instance).
        """
        b = len(gt_masks)
        views = pixel_embeddings.shape[0] // max(b, 1)
        if views * b != pixel_embeddings.shape[0] or len(queries) != views * b:
            raise ValueError(
                f"expected V*B entries for B={b} images, got embeddings {pixel_embeddings.shape[0]}"
                f" and queries {len(queries)}"
            )
        image_ids = torch.as_tensor(image_ids, dtype=torch.int64, device=pixel_embeddings.device)
        # Batch negatives come from the original views; the g-views show the same instances again.
        samples = self.sample(pixel_embeddings[:b], gt_masks, image_ids, generator, gt_labels)
        zero = pixel_embeddings.sum() * 0 + sum(q.sum() * 0 for q in queries)
        terms = {}
        c = self.cfg
        weights = self.query_weights(query_instances, len(queries))
        if c.inter:
            q_all, q_ids = self.inter_queries(queries, image_ids)  # [N, d], [N]
            n_views = b if c.inter_views == "original" else len(queries)
            q_xy = None
            if query_xy is not None:
                q_xy = torch.cat(query_xy[:n_views])
            q_w = torch.cat(weights[:n_views]) if weights is not None else None
            chunk = self.chunk_size(q_all.device, q_all.shape[0])
            focal = {"loss": c.inter_loss, "alpha": c.focal_alpha, "gamma": c.focal_gamma, "chunk_size": chunk}
            if c.inter_batch_grad:
                memory = self.memory.contents() if (c.inter_mode == "memory" and self.memory is not None) else None
                batch = self.centred(samples)
                memory = self.centred(memory) if memory is not None else None
                loss = inter_scene_loss_with_batch_grad(
                    q_all, q_ids, batch, memory, self.decoder, q_xy, query_weights=q_w, **focal
                )
            else:
                negatives = self.centred(inter_scene_negatives(samples, self.memory, c.inter_mode))
                loss = inter_scene_loss(
                    q_all, q_ids, negatives.embeddings, negatives.image_ids, self.decoder, negatives.xy, q_xy,
                    query_weights=q_w, **focal,
                )  # fmt: skip
            terms["loss_inter"] = zero + loss
        if self.cfg.equi:
            if views != 2 or g is None:
                raise ValueError("equivariance needs the g-views: pass V=2 views and their transform g")
            groups = None
            if weights is not None:  # instances, not locations: the normaliser counts instances
                groups = query_instances[b:]
                n_q = sum(q.shape[0] for q in queries[b:])
                n_inst = sum(int(torch.unique(x).numel()) for x in groups)
                if num_masks is not None and n_q > 0:
                    num_masks = max(num_masks * n_inst / n_q, 1.0)  # the model's (rank-averaged) count, rescaled
            terms["loss_equi"] = zero + equivariance_loss(
                queries[b:],
                target_masks[b:],
                pixel_embeddings[:b],
                g,
                self.decoder,
                self.mask_loss,
                variant=self.cfg.equi_variant,
                pixel_embeddings_g=pixel_embeddings[b:],
                query_xy_g=query_xy[b:] if query_xy is not None else None,
                valid_g=valid_g,
                num_masks=num_masks,
                upsample=self.mask_upsample,
                query_groups=groups,
                stopgrad=c.equi_stopgrad,
            )
        if not c.inter_batch_grad:
            return terms, samples
        # The memory stores constants; only the loss above needed the graph.
        detached = PixelSamples(samples.embeddings.detach(), samples.xy, samples.image_ids, samples.labels)
        return terms, detached

    def update_memory(self, samples: PixelSamples) -> None:
        """Enqueue this batch's samples (gathered from all ranks) and update the running mean of
        `inter_center`; call after the loss."""
        if self.memory is not None:
            self.memory.enqueue(samples)
        if self.cfg.inter and self.cfg.inter_center:
            self._update_center(samples)
