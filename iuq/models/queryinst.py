"""QueryInst (Fang et al., ICCV 2021) on torch/torchvision ops, after mmdetection's R50 1x recipe.

    image -> backbone -> FPN P2..P5
    N learned proposal boxes (the whole image at start) and N learned proposal features
    6 stages, each:
        RoIAlign 7x7 at the boxes -> DIIHead: self-attention among the proposal features (-> the
            "attention features"), DynamicConv of the RoI features with kernels generated from them,
            FFN, one classification FC, three regression FCs -> class logits, box deltas
        boxes <- decode(boxes, deltas), detached for the next stage
        RoIAlign 14x14 at the new boxes -> dynamic mask head (DynamicConv generated from the attention
            features, 4 conv3x3 + BN, deconv x2) -> 28 x 28 logits per class
    losses per stage (weight 1 each), after a Hungarian matching per stage and image:
        focal 2.0 over every proposal, L1 5.0 (boxes over the image size) and GIoU 2.0, dice 8.0

The IUQ hookup is RoI-based (`iuq.core.roi`): q_n is the matched proposal's attention feature at the
last stage (what the mask head's dynamic convolution is generated from), f(I) the FPN levels, and
<q, I> the last stage's mask head on a box's pooled features.

Deviations from mmdetection's QueryInst, each deliberate:
- The FPN is torchvision's `FeaturePyramidNetwork` (P6 computed by its max-pool block and not read),
  and the backbone any of `iuq.models.pyramid`'s; frozen stem + first stage for pretrained backbones,
  as mmdetection's `frozen_stages=1`.
- RoIs are pooled by torchvision's `roi_align` (aligned, sampling ratio 2), levels by mmdetection's
  rule (`iuq.core.roi.roi_levels`).
- Masks are pasted into the image by sampling the 28 x 28 probabilities bilinearly at each output
  pixel (`iuq.models.paste`), as mmdetection's `_do_paste_mask` does, at the original image size.
- The losses' normaliser (matched proposals, averaged over ranks) is taken per view of IUQ's batch;
  with IUQ off there is one view and it is mmdetection's. It is at least 1, so a batch with no
  instance gives the classification loss's sum, where mmdetection divides by ~0.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from iuq.core.losses import dice_loss, sigmoid_focal, upcast
from iuq.core.roi import pool_rois, roi_mask_targets
from iuq.core.views import boxes_from_masks
from iuq.models.dense import DenseSegmenter, average_over_ranks, per_view_losses
from iuq.models.interface import SegmenterOutput, matched
from iuq.models.paste import low_res_prediction
from iuq.models.pyramid import Pyramid, build_backbone
from iuq.models.queryinst_parts import QueryInstConfig, Stage, decode_boxes, hungarian_match

__all__ = ["QueryInst", "QueryInstConfig"]


def class_channel(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class mask logits [n, K, M, M] -> each mask's own class channel [n, M, M]."""
    return logits[torch.arange(labels.shape[0], device=logits.device), labels.to(logits.device)]


class ClassChannelDecoder(nn.Module):
    """The mask head as IUQ's RoI decoder (`iuq.core.roi.RoIDecoder`): (queries [n, C], RoI features
    [n, C, S, S], classes [n]) -> logits [n, 2S, 2S] of each query's class channel. Holds no
    parameters of its own (they are the model's).

    norm: None, BatchNorm as in training (L_equi: a batch of positives, as the base loss's); or
    the output head's `roi_norm`, {stage: that stage's per-layer batch statistics of this step's base
    mask loss} (L_inter); a stage missing there normalises by the call's own batch statistics.
    Either way L_inter leaves the running statistics alone."""

    def __init__(self, model: QueryInst):
        super().__init__()
        self._model = [model]  # not a submodule: the parameters stay the model's
        self.mask_size = 2 * model.cfg.mask_pool

    def forward(self, queries, feats, labels, norm: dict | None = None, stages=None) -> torch.Tensor:
        """`stages` [n]: the stage whose mask head decodes each query (default: the last)."""
        heads = self._model[0].stages

        def decode(s: int, at) -> torch.Tensor:
            stats = None if norm is None else norm.get(s, [])
            return heads[s].mask_head(queries[at], feats[at], stats=stats)  # [n_s, K, M, M]

        if stages is None:
            return class_channel(decode(len(heads) - 1, slice(None)), labels)
        out = queries.new_zeros((queries.shape[0], self.mask_size, self.mask_size))
        for s in stages.unique().tolist():
            at = (stages == s).nonzero()[:, 0]
            out = out.index_put((at,), class_channel(decode(s, at), labels[at]))
        return out


class QueryInst(nn.Module):
    """QueryInst behind iuq's base-model interface (`iuq.models.interface`, docs/design.md), with the
    RoI decoder kind (`decoder_kind = "roi"`, `iuq.core.roi`). Args as `CondInst`."""

    decoder_kind = "roi"
    strides = (4, 8, 16, 32)  # P2..P5
    stride = 4  # of `pixel_embeddings` (P2)
    equi_upsample = 1
    register_normalisation = DenseSegmenter.register_normalisation
    normalise = DenseSegmenter.normalise
    export = DenseSegmenter.export
    matched = staticmethod(matched)

    def __init__(self, model_cfg, num_classes: int, load_weights: bool = True):
        super().__init__()
        self.cfg, self.num_classes, self.model_cfg = model_cfg.queryinst, num_classes, model_cfg
        c = self.cfg
        self.backbone = build_backbone(model_cfg, load_weights)
        self.pyramid = Pyramid(self.backbone.channels, c.fpn_channels, "p2-p6")
        self.proposal_boxes = nn.Embedding(c.proposals, 4)  # (cx, cy, w, h) over the image size
        nn.init.constant_(self.proposal_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.proposal_boxes.weight[:, 2:], 1.0)
        self.proposal_feats = nn.Embedding(c.proposals, c.fpn_channels)
        self.stages = nn.ModuleList(Stage(c, num_classes) for _ in range(c.stages))
        self.decoder = ClassChannelDecoder(self)
        self.register_normalisation(model_cfg)

    # -- the contract ----------------------------------------------------------------------------
    @property
    def pixel_dim(self) -> int:
        return self.cfg.fpn_channels

    @property
    def mask_loss_weight(self) -> float:
        return self.cfg.dice_weight

    @property
    def roi_size(self) -> int:
        return self.cfg.mask_pool

    def mask_loss(self, logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
        """dice x 8 in mmdetection's squared form (eps 1e-5 on each of sum(p^2) and sum(t^2)), summed
        over masks, / num_masks: the base mask loss and L_equi."""
        return self.cfg.dice_weight * dice_loss(logits, targets, num_masks, form="squared", eps=2e-5)

    def equi_normaliser(self, queries_g: list[torch.Tensor], targets_g: list[dict]) -> float:
        """Matched g-view proposals averaged over ranks, at least 1 (the mask loss's avg_factor)."""
        return max(average_over_ranks(sum(q.shape[0] for q in queries_g), self.mean.device), 1.0)

    def backbone_module(self) -> nn.Module:
        return self.backbone

    def checkpoint_extras(self) -> dict:
        return {}

    def decode_masks(
        self, attn_feats: torch.Tensor, roi_feats: torch.Tensor, labels: torch.Tensor, stage: int = -1,
        record: list | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Stage `stage`'s mask logits [n, M, M] on each query's class channel (BatchNorm as in
        training); `record` receives its BatchNorm batch statistics."""
        logits = self.stages[stage].mask_head(attn_feats, roi_feats, record=record)  # [n, K, M, M]
        return class_channel(logits, labels)

    def roi_queries(self, output: SegmenterOutput, all_stages: bool = False):
        """Per view-image: the matched queries [Q_i, C], their instances [Q_i], the boxes their masks
        were decoded on [Q_i, 4] and their stages [Q_i] (None: the last stage's, the contract's own)
        or every stage's, stage after stage (`iuq.roi_stages: all`)."""
        h = output.head
        if not all_stages:
            return output.queries, output.instances, h["query_boxes"], None
        per_image = list(zip(*h["matches"], strict=True))  # [image][stage] (proposals, instances)
        queries, instances, boxes, stages = [], [], [], []
        for i, rows in enumerate(per_image):
            queries.append(torch.cat([h["attn"][s][i, p] for s, (p, _) in enumerate(rows)]))
            instances.append(torch.cat([k for _, k in rows]))
            boxes.append(torch.cat([h["boxes"][s][i, p].detach() for s, (p, _) in enumerate(rows)]))
            stages.append(torch.cat([torch.full_like(p, s) for s, (p, _) in enumerate(rows)]))
        return queries, instances, boxes, stages

    # -- forward ---------------------------------------------------------------------------------
    def _image_sizes(self, images: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        """[N, 4] (w, h, w, h) of each image's valid region, in input pixels."""
        n, _, h, w = images.shape
        if pixel_mask is None:
            return images.new_tensor([w, h, w, h], dtype=torch.float32).expand(n, 4)
        ws = pixel_mask.any(1).sum(1).float()
        hs = pixel_mask.any(2).sum(1).float()
        return torch.stack([ws, hs, ws, hs], 1)

    def _stages(self, images: torch.Tensor, pixel_mask: torch.Tensor | None) -> dict:
        """Every stage's outputs: `logits` [N, P, K], `boxes` [N, P, 4] (decoded, with grad), `attn`
        [N, P, C]; and `levels` (P2..P5), `whwh` [N, 4]."""
        levels = self.pyramid(self.backbone(self.normalise(images, pixel_mask)))[:4]
        n, p = images.shape[0], self.cfg.proposals
        whwh = self._image_sizes(images, pixel_mask)
        cxcywh = self.proposal_boxes.weight[None] * whwh[:, None]  # [N, P, 4]
        boxes = torch.cat([cxcywh[..., :2] - cxcywh[..., 2:] / 2, cxcywh[..., :2] + cxcywh[..., 2:] / 2], -1)
        feats = self.proposal_feats.weight[None].expand(n, -1, -1)
        index = torch.arange(n, device=images.device).repeat_interleave(p)
        out = {"logits": [], "boxes": [], "attn": [], "levels": levels, "whwh": whwh}
        for stage in self.stages:
            rois = pool_rois(levels, list(self.strides), boxes.reshape(-1, 4), index, self.cfg.box_pool)
            logits, deltas, feats, attn = stage.box_head(feats, rois)
            new_boxes = decode_boxes(boxes, deltas)
            out["logits"].append(logits)
            out["boxes"].append(new_boxes)
            out["attn"].append(attn)
            boxes = new_boxes.detach()
        return out

    def forward(
        self,
        images: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        targets: list[dict] | None = None,
        views: int = 1,
        view_loss: tuple[bool, ...] | None = None,
    ) -> SegmenterOutput:
        """As `iuq.models.interface.BaseSegmenter`; besides the contract's fields, the output's head
        holds `levels` (P2..P5, f(I)), `query_boxes` (per view-image [Q_i, 4], the box each
        matched query's mask was decoded on) and `roi_norm` (per stage, the mask head's BatchNorm
        batch statistics in the first view's base mask loss: how L_inter normalises other images'
        RoIs, `ClassChannelDecoder`)."""
        n = images.shape[0]
        if n % views:
            raise ValueError(f"a batch of {n} images does not split into {views} views")
        heads = self._stages(images, pixel_mask)
        p2 = heads["levels"][0]
        if targets is None:
            return SegmenterOutput(None, {}, None, p2, self.stride, head=heads)
        view_loss = tuple(view_loss) if view_loss is not None else (True,) * views
        gts = []
        for t in targets:
            boxes = t["boxes"] if "boxes" in t else boxes_from_masks(t["masks"])
            gts.append((t["labels"].to(images.device).long(), boxes.to(images.device, torch.float32)))
        matches = [
            [hungarian_match(logits[i], boxes[i], *gts[i], heads["whwh"][i], self.cfg) for i in range(n)]
            for logits, boxes in zip(heads["logits"], heads["boxes"], strict=True)
        ]  # [stage][image] (proposals, instances)

        def losses_of_view(part):
            return self._losses(heads, matches, targets, gts, part)

        heads["roi_norm"] = {}
        loss, terms, losses = per_view_losses(views, n // views, view_loss, losses_of_view)
        last = matches[-1]
        attn = heads["attn"][-1]
        queries = [attn[i, m[0]] for i, m in enumerate(last)]  # [Q_i, C]
        heads["query_boxes"] = [heads["boxes"][-1][i, m[0]].detach() for i, m in enumerate(last)]
        heads["matches"] = matches
        query_states = attn.reshape(-1, attn.shape[-1])
        return SegmenterOutput(loss, terms, losses, p2, self.stride, queries, [m[1] for m in last], query_states,
                               head=heads)  # fmt: skip

    def _losses(self, heads: dict, matches, targets, gts, part: list[int]) -> dict[str, torch.Tensor]:
        """The unweighted-by-stage sum of each stage's weighted terms on images `part`."""
        c = self.cfg
        totals: dict[str, torch.Tensor] = {}
        levels, whwh = heads["levels"], heads["whwh"]
        for s, (logits, boxes, attn) in enumerate(zip(heads["logits"], heads["boxes"], heads["attn"], strict=True)):
            rows = [matches[s][i] for i in part]
            num = max(average_over_ranks(sum(int(r[0].numel()) for r in rows), logits.device), 1.0)
            onehot = torch.zeros_like(logits[part], dtype=torch.float32)  # [b, P, K]
            for j, (i, (prop, inst)) in enumerate(zip(part, rows, strict=True)):
                onehot[j, prop, gts[i][0][inst]] = 1
            terms = {
                "loss_cls": c.class_weight * sigmoid_focal(logits[part], onehot, c.focal_alpha, c.focal_gamma) / num
            }
            pred = torch.cat([boxes[i, prop] for i, (prop, _) in zip(part, rows, strict=True)])  # [M, 4]
            gt = torch.cat([gts[i][1][inst] for i, (_, inst) in zip(part, rows, strict=True)])
            size = torch.cat([whwh[i].expand(prop.numel(), 4) for i, (prop, _) in zip(part, rows, strict=True)])
            pred = upcast(pred)
            terms["loss_l1"] = c.l1_weight * (pred / size - gt / size).abs().sum() / num
            terms["loss_giou"] = c.giou_weight * generalized_box_iou_loss(pred, gt, reduction="sum") / num
            mask_boxes = pred.detach()
            image = torch.cat([torch.full((prop.numel(),), i, device=pred.device) for i, (prop, _) in
                               zip(part, rows, strict=True)])  # fmt: skip
            feats = pool_rois(levels, list(self.strides), mask_boxes, image, c.mask_pool)
            attn_pos = torch.cat([attn[i, prop] for i, (prop, _) in zip(part, rows, strict=True)])
            labels = torch.cat([gts[i][0][inst] for i, (_, inst) in zip(part, rows, strict=True)])
            masks = torch.cat([targets[i]["masks"][inst.to(targets[i]["masks"].device)] for i, (_, inst) in
                               zip(part, rows, strict=True)])  # fmt: skip
            target = roi_mask_targets(masks, mask_boxes, 2 * c.mask_pool)
            if labels.numel():
                stats = heads["roi_norm"].setdefault(s, []) if part[0] == 0 else None
                logits = self.decode_masks(attn_pos, feats, labels, s, record=stats)
                terms["loss_mask"] = self.mask_loss(logits, target, num)
            else:  # keeps every parameter in the graph
                terms["loss_mask"] = attn_pos.sum() * 0 + sum(
                    p.sum() * 0 for p in self.stages[s].mask_head.parameters()
                )
            for k, v in terms.items():
                totals[k] = totals[k] + v if k in totals else v
        return totals

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_instances(
        self, images: torch.Tensor, pixel_mask: torch.Tensor | None, sizes, orig_sizes, top_k: int = 100
    ) -> list[dict]:
        """Per image a prediction of `iuq.models.paste` with RoI masks: the best `top_k` (proposal,
        class) pairs of the last stage by class probability (no NMS), their boxes and 28 x 28 masks."""
        heads = self._stages(images, pixel_mask)
        logits, boxes, attn = heads["logits"][-1], heads["boxes"][-1], heads["attn"][-1]
        k = self.num_classes
        results = []
        for i in range(images.shape[0]):
            scores, idx = logits[i].sigmoid().flatten().topk(min(top_k, logits.shape[1] * k))
            prop, labels = idx // k, idx % k
            index = torch.full((prop.numel(),), i, device=images.device)
            feats = pool_rois(heads["levels"], list(self.strides), boxes[i, prop], index, self.cfg.mask_pool)
            masks = (
                self.decode_masks(attn[i, prop], feats, labels)
                if prop.numel()
                else feats.new_zeros((0, 2 * self.cfg.mask_pool, 2 * self.cfg.mask_pool))
            )
            pred = low_res_prediction(
                masks, scores, labels, self.stride, sizes[i], orig_sizes[i], self.cfg.mask_threshold
            )
            pred["mask_boxes"] = boxes[i, prop]  # [n, 4] input pixels: the masks are RoI masks
            results.append(pred)
        return results
