"""The contract between iuq and a base segmenter (docs/design.md, "The base-model interface").

IUQ needs four things from a query-based segmenter, whatever its architecture: the pixel
embeddings f(I) its masks are decoded from, the queries q_n matched to ground-truth instances
(sigma), the decoder <q, I> that turns one into the other, and its own mask loss. Every model of
`iuq.models.build` provides them through `BaseSegmenter`; the engine and the core read nothing else,
so a new model is one file plus one entry in `build.SPECS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


@dataclass
class SegmenterOutput:
    """One forward of a base segmenter on V views of B images (view-major: the B originals first).

    loss: the base loss summed over the views that get one, each view normalised over its own
        masks (None at inference). loss_terms: the first view's unweighted terms (for the logs).
    view_losses: per view its weighted base loss, None where the view gets none.
    pixel_embeddings: [V*B, D, h, w], the "I" masks are decoded from; stride: input pixels per cell.
    queries: per view-image [Q_i, d], the matched queries q_n (with grad); None at inference.
    instances: per view-image [Q_i] int64, the index (into that view-image's targets) of the instance
        each query is matched to: sigma. Several queries may share an instance (dense models).
    query_states: the tensor the matched queries are computed from, where gradient shares at the
        queries are read (Mask2Former: [Q, V*B, hidden] decoder states; dense: [sum Q_i, d]).
    query_xy: per view-image [Q_i, 4] (x, y, soi_x, soi_y) in canvas units, for decoders that read
        coordinates; None otherwise.
    head: the model's raw outputs that its own inference reads (not part of the contract).
    """

    loss: torch.Tensor | None
    loss_terms: dict[str, torch.Tensor]
    view_losses: list[torch.Tensor | None] | None
    pixel_embeddings: torch.Tensor
    stride: int
    queries: list[torch.Tensor] | None = None
    instances: list[torch.Tensor] | None = None
    query_states: torch.Tensor | None = None
    query_xy: list[torch.Tensor] | None = None
    head: dict = field(default_factory=dict)


def matched(
    output: SegmenterOutput, targets: list[dict]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per view-image: the matched queries [Q_i, d], their instances' masks [Q_i, H, W] and labels [Q_i]."""
    if output.queries is None or output.instances is None:
        raise ValueError("no matching was made: run the forward with targets")
    return output.queries, *instance_targets(targets, output.instances)


def instance_targets(targets: list[dict], instances: list[torch.Tensor]) -> tuple[list, list]:
    """Per view-image the masks [Q_i, H, W] and labels [Q_i] of the instances [Q_i] queries match."""
    masks = [t["masks"][k.to(t["masks"].device)] for t, k in zip(targets, instances, strict=True)]
    labels = [t["labels"][k.to(t["labels"].device)] for t, k in zip(targets, instances, strict=True)]
    return masks, labels


def batch_instances(model: BaseSegmenter, batch: dict, top_k: int) -> list[dict]:
    """Instance predictions, at each image's original size, of a collated batch on the model's device."""
    sizes = [t["size"] for t in batch["targets"]]
    orig = [tuple(int(v) for v in t["orig_size"]) for t in batch["targets"]]
    return model.predict_instances(batch["images"], batch["pixel_mask"], sizes, orig, top_k=top_k)


class BaseSegmenter(Protocol):
    """What every base segmenter provides (an `nn.Module`).

    stride: input pixels per cell of the pixel embeddings. pixel_dim: their channels D.
    decoder: <q, I> on flat pixels, `(queries [Q, d], pixels [P, D], pixel_xy [P, 2] | None,
        query_xy [Q, 4] | None) -> logits [Q, P]`. It has no parameters of its own: L_inter's chunked
        path computes the queries' gradient only (`iuq.core.inter_scene` refuses a decoder with
        parameters).
    An RoI-based model (QueryInst) sets `decoder_kind = "roi"`: its decoder is an
        `iuq.core.roi.RoIDecoder` on pooled RoI features, and `engine.step.build_criterion` pairs it
        with `RoIIUQCriterion` (docs/design.md, "RoI mask heads").
    mask_loss_weight: the weight of the model's own mask loss (L_inter's `inter_scale: mask_weight`,
        L_equi's `equi_weight_base: unit`). equi_upsample: how many times finer than the pixel
        embeddings the base mask loss is taken (L_equi is supervised on that grid).
    """

    stride: int
    pixel_dim: int
    decoder: nn.Module
    mask_loss_weight: float
    equi_upsample: int

    def __call__(
        self,
        images: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        targets: list[dict] | None = None,
        views: int = 1,
        view_loss: tuple[bool, ...] | None = None,
    ) -> SegmenterOutput:
        """images [V*B, 3, H, W] in [0, 1]; pixel_mask [V*B, H, W] bool; targets (omit at inference)
        with `masks` [K, H, W] bool, `labels` [K] and, for the dense models, `boxes` [K, 4]. Every view
        is matched; view v gets the base loss if `view_loss[v]` (default: all)."""
        ...

    def mask_loss(self, logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
        """The model's mask loss (weighted as the model weighs it) on logits [Q, P], targets [Q, P]:
        summed over masks, divided by `num_masks`. L_equi reuses it (Eq. 8)."""
        ...

    def equi_normaliser(self, queries_g: list[torch.Tensor], targets_g: list[dict]) -> float:
        """L_equi's normaliser, as the base model normalises its mask loss (averaged over ranks)."""
        ...

    def predict_instances(self, images, pixel_mask, sizes, orig_sizes, top_k: int = 100) -> list[dict]:
        """Per image a prediction of `iuq.models.paste` (`scores`, `labels`, `mask_logits`, ...)."""
        ...

    def backbone_module(self) -> nn.Module:
        """The backbone, whose parameters get `train.backbone_lr_mult`."""
        ...

    def checkpoint_extras(self) -> dict:
        """What a training checkpoint must hold beyond the state dict to rebuild the model offline."""
        ...

    def export(self, path, label_to_category: list[int], class_names: list[str], short_side: int, max_size) -> None:
        """Write the trained model to folder `path`, loadable by `iuq.models.build.load_exported`."""
        ...
