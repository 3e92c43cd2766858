"""Mask2Former from HF transformers behind the interface iuq needs (`iuq.models.interface`, docs/design.md).

The model itself is `transformers.Mask2FormerForUniversalSegmentation`, unchanged. Its forward
returns neither the per-query mask embeddings q_n nor the matching sigma, so the adapter:

- recomputes q_n = mask_embedder(h), with h the decoder's final layer-normed states caught by a
  forward hook on its layer norm (the very tensor the model's own final masks and classes come
  from, so gradients of every term meet there), which is exactly how the model forms
  `masks_queries_logits` from `pixel_decoder_last_hidden_state` (tested);
- captures sigma with a forward hook on `model.criterion.matcher`: the matcher samples random
  points, so a second call could disagree; its first call in a forward is the final layer's
  (auxiliary layers are matched by direct `forward` calls, which hooks do not see);
- captures the unweighted loss terms with a forward hook on `model.criterion` (as copies: the
  model weights the criterion's tensors in place afterwards);
- computes the loss itself, per view (`get_loss_dict` on each view's slice of the outputs), so
  that a batch holding two views of B images weighs each view like a batch of B images.

Internals used: `model.model.transformer_module.decoder.{layernorm, mask_predictor.mask_embedder}`,
`model.criterion`, `model.criterion.matcher`, `model.get_loss_dict`, `model.get_loss`.
`tests/models/test_mask2former.py` fails if they move.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from iuq.core.decoders import DotProductDecoder
from iuq.core.losses import bce_dice_mask_loss
from iuq.models.backbones import (
    EFFICIENTNET_LITE,
    freeze_batchnorm,
    from_hub,
    hf_backbone_config,
    load_efficientnet_lite,
    load_hf_backbone,
    loading_report_replaced,
    small_backbone_config,
    timm_backbone_config,
    with_plain_batchnorm,
)
from iuq.models.config import ModelConfig
from iuq.models.dense import mean_mask_count
from iuq.models.interface import SegmenterOutput, matched
from iuq.models.paste import low_res_prediction, pasted_logits

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_mask2former(cfg: ModelConfig):
    """An HF `Mask2FormerForUniversalSegmentation` from our config, with its pretrained weights, in
    train mode."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    if cfg.pretrained:
        model = load_pretrained_mask2former(cfg.pretrained, cfg.num_labels)
    else:
        if cfg.backbone in EFFICIENTNET_LITE:
            backbone = timm_backbone_config(cfg.backbone)
        elif cfg.backbone == "hf":
            backbone = hf_backbone_config(cfg.backbone_checkpoint)
        else:
            backbone = small_backbone_config(cfg)
        config = Mask2FormerConfig(
            backbone_config=backbone,
            use_pretrained_backbone=False,
            num_labels=cfg.num_labels,
            num_queries=cfg.num_queries,
            hidden_dim=cfg.hidden_dim,
            mask_feature_size=cfg.mask_feature_size,
            feature_size=cfg.mask_feature_size,
            encoder_layers=cfg.encoder_layers,
            decoder_layers=cfg.decoder_layers,
            num_attention_heads=cfg.heads,
            encoder_feedforward_dim=cfg.ffn_dim,
            dim_feedforward=cfg.ffn_dim,
            train_num_points=cfg.train_num_points,
        )
        model = Mask2FormerForUniversalSegmentation(config)
        encoder = backbone_module(model)
        if cfg.backbone in EFFICIENTNET_LITE and cfg.backbone_weights == "imagenet":
            load_efficientnet_lite(encoder._backbone, cfg.backbone)
        elif cfg.backbone == "hf":
            load_hf_backbone(encoder, cfg.backbone_checkpoint, backbone)
    if cfg.freeze_bn:
        freeze_batchnorm(backbone_module(model))
    # from_pretrained returns a model in eval mode; a model that is about to train must not keep
    # BatchNorm and dropout in their inference behaviour.
    return model.train()


def load_pretrained_mask2former(checkpoint: str, num_labels: int):
    """A whole HF Mask2Former checkpoint with its class layer re-sized to `num_labels`; one line
    says which tensors did not carry over (transformers' own report is a table per load)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    config = from_hub("model.pretrained", checkpoint, lambda: Mask2FormerConfig.from_pretrained(checkpoint))
    config.num_labels = num_labels  # re-sizes id2label (passing num_labels= warns when they differ)
    with loading_report_replaced():
        model, info = from_hub(
            "model.pretrained",
            checkpoint,
            lambda: Mask2FormerForUniversalSegmentation.from_pretrained(
                checkpoint, config=config, ignore_mismatched_sizes=True, output_loading_info=True
            ),
        )
    fresh = sorted({*info.get("missing_keys", []), *(k[0] for k in info.get("mismatched_keys", []))})
    log.warning(
        "model.pretrained %s: %d tensors loaded; new (re-sized to %d classes or absent): %s",
        checkpoint,
        len(model.state_dict()) - len(fresh),
        num_labels,
        ", ".join(fresh) or "none",
    )
    return model


def mask2former_from_config(hf_config: dict, freeze_bn: bool):
    """An HF Mask2Former of the architecture `hf_config` (a `config.to_dict()`), random init, in train
    mode, with frozen backbone BatchNorm if the run used it: the shell a checkpoint's weights fill."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig.from_dict(hf_config))
    if freeze_bn:
        freeze_batchnorm(backbone_module(model))
    return model.train()


def backbone_module(model) -> nn.Module:
    """The backbone (HF `*Backbone` or `TimmBackbone`) inside an HF Mask2Former."""
    return model.model.pixel_level_module.encoder


class Mask2FormerAdapter(nn.Module):
    """Wraps an HF Mask2Former; `self.model` stays a plain HF model (save_pretrained works as is)."""

    stride = 4  # mask features are at 1/4 of the input

    def __init__(self, model, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD):
        super().__init__()
        self.model = model
        self.decoder = DotProductDecoder()
        self._caught: dict = {}
        model.criterion.matcher.register_forward_hook(self._catch_indices)
        model.criterion.register_forward_hook(self._catch_losses)
        model.model.transformer_module.decoder.layernorm.register_forward_hook(self._catch_query_states)
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def pixel_dim(self) -> int:
        return int(self.model.config.mask_feature_size)

    def backbone_module(self) -> nn.Module:
        return backbone_module(self.model)

    def equi_normaliser(self, queries_g: list[torch.Tensor], targets_g: list[dict]) -> float:
        """L_equi's normaliser: the g-views' target masks averaged over ranks (HF's `get_num_masks`)."""
        return mean_mask_count(targets_g, self.mean.device)

    @torch.no_grad()
    def predict_instances(self, images, pixel_mask, sizes, orig_sizes, top_k: int = 100) -> list[dict]:
        """Per image a prediction of `iuq.models.paste`: `scores` [N], `labels` [N] and masks at the
        model's resolution, pasted at the original size on demand."""
        return instance_predictions(self(images, pixel_mask), sizes, orig_sizes, top_k=top_k)

    equi_upsample = 1  # L_equi on the mask features' grid, densely (the base loss samples points there)

    @property
    def mask_loss_weight(self) -> float:
        """Weight of the model's mask loss terms (Mask2Former: 5 for BCE and 5 for dice)."""
        return float(self.model.config.mask_weight)

    def _catch_indices(self, module, args, output) -> None:
        self._caught.setdefault("indices", output)  # first call = final decoder layer

    def _catch_losses(self, module, args, output) -> None:
        # Copies: the model then multiplies these very tensors by its loss weights in place.
        self._caught["losses"] = {k: v.clone() for k, v in output.items()}

    def mask_loss(self, logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
        """The model's mask loss form (weighted BCE + dice, its configured weights), dense, for L_equi."""
        c = self.model.config
        return bce_dice_mask_loss(logits, targets, num_masks, bce_weight=c.mask_weight, dice_weight=c.dice_weight)

    def _catch_query_states(self, module, args, output) -> None:
        self._caught["query_states"] = output  # the decoder's layer norm: its last call is the final layer's

    def query_embeddings(self, query_states: torch.Tensor) -> torch.Tensor:
        """Final-layer states [Q, B, hidden] (seq-first, after the decoder's layer norm) -> q_n [B, Q, D],
        as the model's mask predictor forms them."""
        return self.model.model.transformer_module.decoder.mask_predictor.mask_embedder(query_states.transpose(0, 1))

    def forward(
        self,
        images: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        targets: list[dict] | None = None,
        views: int = 1,
        view_loss: tuple[bool, ...] | None = None,
    ) -> SegmenterOutput:
        """images [V*B, 3, H, W] in [0, 1] (V views of B images, view-major); pixel_mask [V*B, H, W]
        bool; targets with `masks` [K, H, W] bool and `labels` [K] (omit for inference).

        Each view is matched on its own; view v gets the base loss if `view_loss[v]` (default: all),
        normalised over its own masks as the model normalises a batch. A view without the loss is
        still matched (its sigma is what L_equi supervises).
        """
        n = images.shape[0]
        if n % views:
            raise ValueError(f"a batch of {n} images does not split into {views} views")
        view_loss = tuple(view_loss) if view_loss is not None else (True,) * views
        out = self.model(
            pixel_values=(images - self.mean) / self.std,
            pixel_mask=pixel_mask.long() if pixel_mask is not None else None,
            output_auxiliary_logits=targets is not None,
        )
        states = self._caught.pop("query_states")  # [Q, V*B, hidden], part of the loss's graph
        loss, terms, losses, indices = None, {}, None, None
        if targets is not None:
            losses, indices = [], []
            b = n // views
            for v in range(views):
                part = slice(v * b, (v + 1) * b)
                mask_labels = [t["masks"].to(images.dtype) for t in targets[part]]
                class_labels = [t["labels"] for t in targets[part]]
                masks, classes = out.masks_queries_logits[part], out.class_queries_logits[part]
                self._caught = {}
                if view_loss[v]:
                    aux = [{k: a[k][part] for k in a} for a in out.auxiliary_logits or []]
                    view = self.model.get_loss(self.model.get_loss_dict(masks, classes, mask_labels, class_labels, aux))
                    if v == 0:
                        terms = dict(self._caught.get("losses", {}))
                    loss = view if loss is None else loss + view
                    losses.append(view)
                    indices += self._caught["indices"]
                else:
                    indices += self.model.criterion.matcher(masks, classes, mask_labels, class_labels)
                    losses.append(None)
        query_embeddings = self.query_embeddings(states)  # [V*B, Q, D]
        queries = instances = None
        if indices is not None:  # sigma: query src[j] of image b is matched to its target tgt[j]
            queries = [query_embeddings[b, src.to(query_embeddings.device)] for b, (src, _) in enumerate(indices)]
            instances = [tgt for _, tgt in indices]
        head = {
            "query_embeddings": query_embeddings,  # q_n of every query
            "mask_logits": out.masks_queries_logits,  # [V*B, Q, h, w]
            "class_logits": out.class_queries_logits,  # [V*B, Q, C+1]
            "indices": indices,  # per image (query indices, target indices)
        }
        return SegmenterOutput(
            loss, terms, losses, out.pixel_decoder_last_hidden_state, self.stride, queries, instances, states, head=head
        )

    matched = staticmethod(matched)

    def checkpoint_extras(self) -> dict:
        """The HF architecture itself, so that a checkpoint loads without the hub."""
        return {"hf_config": self.model.config.to_dict()}

    def export(self, path, label_to_category, class_names, short_side: int, max_size) -> None:
        """`save_pretrained` of the plain HF model (ordinary BatchNorm layers), with label names,
        COCO category ids and the image processor."""
        from transformers import Mask2FormerImageProcessor

        model = with_plain_batchnorm(self.model)
        model.config.id2label = dict(enumerate(class_names))
        model.config.label2id = {name: i for i, name in enumerate(class_names)}
        model.config.coco_category_ids = list(label_to_category)
        model.save_pretrained(path)
        processor = Mask2FormerImageProcessor(
            size={"shortest_edge": short_side, "longest_edge": max_size},
            size_divisor=32,
            image_mean=self.mean.flatten().tolist(),
            image_std=self.std.flatten().tolist(),
            do_reduce_labels=False,
        )
        processor.save_pretrained(path)


@torch.no_grad()
def instance_predictions(
    output: SegmenterOutput, sizes: list[tuple[int, int]], orig_sizes: list[tuple[int, int]], top_k: int = 100
) -> list[dict]:
    """Mask2Former's instance inference: top-k (query, class) pairs by class probability, scored by
    class probability x mean mask probability inside the predicted mask (at the original size, as
    the original implementation scores, pasted in chunks: `iuq.models.paste`).

    Args:
        output: a forward's output on a padded batch.
        sizes: per image (h, w) of the valid (unpadded) region in the input.
        orig_sizes: per image (H, W) of the original image.
    Returns per image a prediction of `iuq.models.paste` (`scores` [N], `labels` [N] contiguous,
    `mask_logits` [N, h/4, w/4], ...).
    """
    class_logits, mask_logits = output.head["class_logits"], output.head["mask_logits"]
    b, q, num_cls = class_logits.shape[0], class_logits.shape[1], class_logits.shape[2] - 1
    results = []
    for i in range(b):
        probs = class_logits[i].softmax(-1)[:, :num_cls]  # [Q, C] (last column: no object)
        k = min(top_k, q * num_cls)
        scores, flat = probs.flatten().topk(k)
        query, labels = flat // num_cls, flat % num_cls
        pred = low_res_prediction(mask_logits[i, query], scores, labels, output.stride, sizes[i], orig_sizes[i])
        mask_score = torch.zeros_like(scores)
        for start, logits in pasted_logits(pred):
            masks = logits > 0
            inside = (logits.sigmoid() * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
            mask_score[start : start + len(logits)] = inside
        pred["scores"] = scores * mask_score
        results.append(pred)
    return results
