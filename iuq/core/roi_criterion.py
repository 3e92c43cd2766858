"""RoIIUQCriterion: L_inter and L_equi of one step for an RoI mask head (`iuq.core.roi`).

Used as `IUQCriterion` is (weights, warm-up ramp, memory update after the step); it reads the
pyramid f(I) and the boxes each matched query's mask was decoded on, where the pixel criterion reads
a pixel map:

    terms, samples = criterion(levels, strides, queries, query_labels, query_boxes, gt_boxes, ...)
    criterion.update_memory(samples)       # after the optimiser step
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from iuq.core.config import IUQConfig
from iuq.core.criterion import IUQCriterion
from iuq.core.inter_scene import inter_scene_negatives
from iuq.core.memory import PixelMemory
from iuq.core.roi import RoIDecoder, equivariance_rois, pool_rois, roi_inter_scene_loss, roi_mask_targets
from iuq.core.sampling import PixelSamples
from iuq.core.transforms import BatchTransform


class RoIIUQCriterion(IUQCriterion):
    """Args:
    cfg: the method's settings (`roi_*` keys size the memory and the pairs; `inter_center`,
        `inter_batch_grad`, `query_reduction: instance` and `equi_variant: feature` are pixel-decoder
        readings and are refused; `equi_variant: augmentation` keeps the g-views with no L_equi).
    decoder: the model's mask head as an `RoIDecoder` (parameters are the model's).
    channels, roi_size: C and S of the pooled RoI features [C, S, S].
    mask_loss, mask_loss_weight: as `IUQCriterion`.
    """

    def __init__(
        self,
        cfg: IUQConfig,
        decoder: RoIDecoder,
        channels: int,
        roi_size: int,
        mask_loss: Callable,
        mask_loss_weight: float = 1.0,
    ):
        refused = {
            "inter_center": cfg.inter_center,
            "inter_batch_grad": cfg.inter_batch_grad,
            "query_reduction": cfg.query_reduction != "location",
            "equi_variant": cfg.equi_variant == "feature",
        }
        bad = [k for k, v in refused.items() if v]
        if bad:
            raise ValueError(
                f"iuq.{bad[0]}: a reading of the pixel decoders; an RoI mask head (QueryInst) does not take it, "
                "remove the key"
            )
        nn.Module.__init__(self)  # IUQCriterion's own init would allocate a pixel memory
        self.cfg, self.decoder, self.mask_loss = cfg, decoder, mask_loss
        self.mask_loss_weight, self.mask_upsample = mask_loss_weight, 1
        self.channels, self.roi_size = channels, roi_size
        use_memory = cfg.inter and cfg.inter_mode == "memory"
        width = channels * roi_size * roi_size
        dtype = getattr(torch, cfg.memory_dtype)
        self.memory = PixelMemory(cfg.roi_memory_capacity, width, dtype) if use_memory else None

    def forward(
        self,
        levels: list[torch.Tensor],
        strides: list[int],
        queries: list[torch.Tensor],
        query_labels: list[torch.Tensor],
        query_boxes: list[torch.Tensor],
        target_masks: list[torch.Tensor],
        gt_boxes: list[torch.Tensor],
        gt_labels: list[torch.Tensor],
        image_ids: torch.Tensor,
        g: BatchTransform | None = None,
        num_masks: float | None = None,
        generator: torch.Generator | None = None,
        query_stages: list[torch.Tensor] | None = None,
        roi_norm: object = None,
    ) -> tuple[dict[str, torch.Tensor], PixelSamples]:
        """L_inter and L_equi of one batch (unweighted) and the RoIs to enqueue afterwards.

        Args:
            levels: the pyramid f of every view, finest first, each [V*B, C, h_l, w_l] (with grad).
            strides: input pixels per cell of each level.
            queries: V*B tensors [Q_i, d], the matched queries (with grad).
            query_labels: V*B tensors [Q_i], the class of each query's instance.
            query_boxes: V*B tensors [Q_i, 4], the box (input pixels) each query's mask was decoded on.
            target_masks: V*B tensors [Q_i, H, W] bool, each query's instance mask in its view.
            gt_boxes, gt_labels: B tensors [K_i, 4] and [K_i], every instance of the original views.
            image_ids: [B] source image ids.
            g: the g-views' transforms (L_equi). num_masks: L_equi's normaliser.
            query_stages: V*B tensors [Q_i], the stage whose mask head decodes each query (None:
                the decoder's default head).
            roi_norm: how this step's base mask loss normalised its RoIs (QueryInst's output
                head['roi_norm']); L_inter decodes other images' RoIs under it. Needed with L_inter.
        """
        b = len(gt_boxes)
        views = levels[0].shape[0] // max(b, 1)
        if views * b != levels[0].shape[0] or len(queries) != views * b:
            raise ValueError(f"expected V*B entries for B={b} images, got {levels[0].shape[0]} and {len(queries)}")
        device = levels[0].device
        image_ids = torch.as_tensor(image_ids, dtype=torch.int64, device=device)
        originals = [lv[:b] for lv in levels]
        s = self.roi_size
        counts = [int(x.shape[0]) for x in gt_boxes]
        index = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(counts, device=device))
        boxes = torch.cat([x.to(device, torch.float32).reshape(-1, 4) for x in gt_boxes])  # [R, 4]
        canvas = (levels[0].shape[-2] * strides[0], levels[0].shape[-1] * strides[0])
        with torch.no_grad():  # the memory holds constants
            rois = pool_rois(originals, strides, boxes, index, s)  # [R, C, S, S]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2 / boxes.new_tensor([canvas[1], canvas[0]])
        labels = torch.cat([x.to(device, torch.int64) for x in gt_labels])
        samples = PixelSamples(rois.flatten(1), centres, image_ids[index], labels)
        zero = sum(lv.sum() * 0 for lv in levels) + sum(q.sum() * 0 for q in queries)
        terms = {}
        c = self.cfg
        if c.inter:
            q_all, q_ids = self.inter_queries(queries, image_ids)
            n_views = b if c.inter_views == "original" else len(queries)
            q_labels = torch.cat(query_labels[:n_views]).to(device)
            q_stages = None if query_stages is None else torch.cat(query_stages[:n_views]).to(device)
            negatives = inter_scene_negatives(samples, self.memory, c.inter_mode)
            feats = negatives.embeddings.view(-1, self.channels, s, s)
            terms["loss_inter"] = zero + roi_inter_scene_loss(
                q_all, q_ids, q_labels, feats, negatives.image_ids, self.decoder, loss=c.inter_loss,
                alpha=c.focal_alpha, gamma=c.focal_gamma, chunk_pairs=c.roi_chunk_pairs, per_query=c.roi_negatives,
                generator=generator, query_stages=q_stages, norm=roi_norm,
            )  # fmt: skip
        if c.equi:
            if views != 2 or g is None:
                raise ValueError("equivariance needs the g-views: pass V=2 views and their transform g")
            q_g = torch.cat(queries[b:])
            boxes_g = torch.cat([x.to(device, torch.float32) for x in query_boxes[b:]])
            index_g = torch.cat([torch.full((x.shape[0],), i, device=device) for i, x in enumerate(queries[b:])])
            feats = equivariance_rois(originals, strides, g, boxes_g, index_g, canvas, s)
            if c.equi_stopgrad == "features":
                feats = feats.detach()
            if c.equi_stopgrad == "queries":
                q_g = q_g.detach()
            target = roi_mask_targets(torch.cat(target_masks[b:]), boxes_g, self.decoder.mask_size)
            loss = zero
            if q_g.shape[0] and c.equi_variant == "full":
                extra = {} if query_stages is None else {"stages": torch.cat(query_stages[b:]).to(device)}
                logits = self.decoder(q_g, feats, torch.cat(query_labels[b:]).to(device), **extra)
                loss = zero + self.mask_loss(logits, target, num_masks)
            terms["loss_equi"] = loss
        return terms, samples
