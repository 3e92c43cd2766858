"""Mask2Former from HF transformers behind the interface iuq needs (DESIGN.md).

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
from dataclasses import dataclass

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
)
from iuq.models.config import ModelConfig
from iuq.models.dense import mean_mask_count
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


@dataclass
class SegmenterOutput:
    """What iuq reads from one forward of a base segmenter on a batch of V views of B images.

    loss: the base loss summed over the views that get one (each view normalised over its own
    masks, so adding a view never dilutes another); loss_terms: the first view's unweighted terms
    (incl. auxiliary layers); view_losses: per view its weighted base loss (None: not computed).
    pixel_embeddings: [V*B, D, h, w] ("I" of the paper); stride: input pixels per embedding cell.
    query_embeddings: [V*B, Q, D] q_n of every query; query_states: [Q, V*B, hidden] the decoder's
    final layer-normed states they derive from (where gradient shares at the queries are read);
    mask_logits [V*B, Q, h, w]; class_logits [V*B, Q, C+1].
    indices: per image (query indices, target indices), the model's own matching sigma.
    """

    loss: torch.Tensor | None
    loss_terms: dict[str, torch.Tensor]
    pixel_embeddings: torch.Tensor
    stride: int
    query_embeddings: torch.Tensor
    mask_logits: torch.Tensor
    class_logits: torch.Tensor
    indices: list[tuple[torch.Tensor, torch.Tensor]] | None
    view_losses: list[torch.Tensor | None] | None = None
    query_states: torch.Tensor | None = None
    query_xy: list[torch.Tensor] | None = None  # Mask2Former's decoder takes no coordinates


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
        return SegmenterOutput(
            loss=loss,
            loss_terms=terms,
            pixel_embeddings=out.pixel_decoder_last_hidden_state,
            stride=self.stride,
            query_embeddings=self.query_embeddings(states),
            mask_logits=out.masks_queries_logits,
            class_logits=out.class_queries_logits,
            indices=indices,
            view_losses=losses,
            query_states=states,
        )

    @staticmethod
    def matched(
        output: SegmenterOutput, targets: list[dict]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per image: matched queries [Q_i, D], their ground-truth masks [Q_i, H, W] and labels [Q_i]
        (sigma order)."""
        if output.indices is None:
            raise ValueError("no matching was captured: run the forward with targets")
        queries, masks, labels = [], [], []
        for b, (src, tgt) in enumerate(output.indices):
            queries.append(output.query_embeddings[b, src.to(output.query_embeddings.device)])
            masks.append(targets[b]["masks"][tgt.to(targets[b]["masks"].device)])
            labels.append(targets[b]["labels"][tgt.to(targets[b]["labels"].device)])
        return queries, masks, labels


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
    b, q, num_cls = output.class_logits.shape[0], output.class_logits.shape[1], output.class_logits.shape[2] - 1
    results = []
    for i in range(b):
        probs = output.class_logits[i].softmax(-1)[:, :num_cls]  # [Q, C] (last column: no object)
        k = min(top_k, q * num_cls)
        scores, flat = probs.flatten().topk(k)
        query, labels = flat // num_cls, flat % num_cls
        pred = low_res_prediction(output.mask_logits[i, query], scores, labels, output.stride, sizes[i], orig_sizes[i])
        mask_score = torch.zeros_like(scores)
        for start, logits in pasted_logits(pred):
            masks = logits > 0
            inside = (logits.sigmoid() * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
            mask_score[start : start + len(logits)] = inside
        pred["scores"] = scores * mask_score
        results.append(pred)
    return results
