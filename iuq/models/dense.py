"""What the dense models (CondInst, SOLOv2, SOTR) share: one forward, the per-view loop, export,
and small parts.

Every location (CondInst) or grid cell (SOLOv2, SOTR) of a feature map predicts a class and the
parameters of a mask decoder; the locations assigned to an instance are its matched queries (sigma
is the assignment, not a Hungarian matching). The forward is the same for all of them:

    heads = model._heads(images, pixel_mask)             # the model's raw outputs, per location
    per image: model._assign(heads, target)              # positives, their instances (sigma)
    queries = the positives' rows of heads[model.query_key]
    per view: model._losses(heads, targets, assignments, queries, part)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from iuq.models.interface import SegmenterOutput, matched

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def average_over_ranks(value: float, device) -> float:
    """`value` summed over ranks / world size (a count normaliser, as FCOS and SOLOv2 use)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(float(value), device=device)
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()
    return float(value)


def per_view_losses(views: int, batch: int, view_loss: tuple[bool, ...], losses_of_view):
    """The base loss of V views of B images, each view on its own (its own normalisers).

    losses_of_view(part) -> the unweighted terms of images `part` (a list of batch indices).
    Returns (the sum over views with `view_loss[v]`, the first view's terms detached, per view its
    loss or None)."""
    loss, terms, losses = None, {}, []
    for v in range(views):
        if not view_loss[v]:
            losses.append(None)
            continue
        view_terms = losses_of_view(list(range(v * batch, (v + 1) * batch)))
        view = sum(view_terms.values())
        if v == 0:
            terms = {k: x.detach() for k, x in view_terms.items()}
        loss = view if loss is None else loss + view
        losses.append(view)
    return loss, terms, losses


def mean_mask_count(targets: list[dict], device) -> float:
    """Number of target masks averaged over ranks, at least 1: the normaliser HF Mask2Former uses for
    its mask loss (`get_num_masks`), and so for its L_equi."""
    return max(average_over_ranks(sum(len(t["labels"]) for t in targets), device), 1.0)


def conv_norm_relu(cin: int, cout: int, norm: str = "gn") -> nn.Sequential:
    """3x3 conv, GroupNorm(32) or BatchNorm, ReLU (the towers of FCOS, CondInst and SOLOv2).

    Below 64 channels GroupNorm takes groups of 2 channels: a group of one channel on P7's 1 x 1 map
    of a small image would hold a single value."""
    layer = nn.GroupNorm(32 if cout >= 64 else max(cout // 2, 1), cout) if norm == "gn" else nn.BatchNorm2d(cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), layer, nn.ReLU(inplace=True))


def tower(cin: int, channels: int, depth: int, norm: str = "gn") -> nn.Sequential:
    return nn.Sequential(*[conv_norm_relu(cin if i == 0 else channels, channels, norm) for i in range(depth)])


def init_convs(modules, std: float = 0.01) -> None:
    """Every Conv2d among `modules` (and their children): weights N(0, std), biases 0, as the heads of
    FCOS, CondInst and SOLO start."""
    for layer in (m for module in modules for m in module.modules()):
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def prior_bias(p: float = 0.01) -> float:
    """Bias of a classification layer so that every class starts at probability p (focal loss)."""
    return -float(torch.log(torch.tensor((1 - p) / p)))


@dataclass
class Assignment:
    """One image's assignment. positives: [Q_i] indices of its positive locations in the model's
    flat per-image location order; instances: [Q_i] the instance each is assigned to (sigma);
    detail: what the model's own losses read (CondInst's FCOS targets, SOLO's cell labels);
    query_xy: [Q_i, 4] for decoders that read coordinates, else None."""

    positives: torch.Tensor
    instances: torch.Tensor
    detail: Any
    query_xy: torch.Tensor | None = None


class DenseSegmenter(nn.Module):
    """The part of the base-model interface (`iuq.models.interface`) the dense models share.

    A subclass provides `_heads(images, pixel_mask)` -> a dict holding `mask_feats` (the pixel
    embeddings [N, D, h, w]) and, under `query_key`, every location's query [N, L, d];
    `_assign(heads, target)` -> `Assignment`; and `_losses(heads, targets, assignments, queries,
    part)` -> the unweighted base-loss terms of the images `part` of one view."""

    stride: int  # of the pixel embeddings
    query_key: str  # the entry of `_heads`'s dict that holds every location's query

    def register_normalisation(self, model_cfg) -> None:
        """The backbone's input mean and std as buffers (not saved: the config holds them)."""
        self.register_buffer("mean", torch.tensor(model_cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(model_cfg.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(
        self,
        images: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        targets: list[dict] | None = None,
        views: int = 1,
        view_loss: tuple[bool, ...] | None = None,
    ) -> SegmenterOutput:
        """images [V*B, 3, H, W] in [0, 1] (V views of B images, view-major), pixel_mask [V*B, H, W];
        targets with `masks` [K, H, W] bool, `labels` [K], `boxes` [K, 4] (omit for inference).
        View v gets the base loss if `view_loss[v]` (default: all); every view is assigned."""
        n = images.shape[0]
        if n % views:
            raise ValueError(f"a batch of {n} images does not split into {views} views")
        heads = self._heads(images, pixel_mask)
        mask_feats = heads["mask_feats"]
        if targets is None:
            return SegmenterOutput(None, {}, None, mask_feats, self.stride, head=heads)
        view_loss = tuple(view_loss) if view_loss is not None else (True,) * views
        table = heads[self.query_key]  # [N, L, d]
        assignments = [self._assign(heads, t) for t in targets]
        rows = torch.cat([i * table.shape[1] + a.positives for i, a in enumerate(assignments)])
        query_states = table.reshape(-1, table.shape[-1])[rows]  # [sum Q_i, d]
        queries = list(query_states.split([a.positives.numel() for a in assignments]))

        def losses_of_view(part):
            pick = [[x[i] for i in part] for x in (targets, assignments, queries)]
            return self._losses(heads, *pick, part)

        loss, terms, losses = per_view_losses(views, n // views, view_loss, losses_of_view)
        xys = [a.query_xy for a in assignments]
        return SegmenterOutput(
            loss, terms, losses, mask_feats, self.stride, queries, [a.instances for a in assignments],
            query_states, query_xy=None if xys[0] is None else xys, head=heads,
        )  # fmt: skip

    def normalise(self, images: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        """[0, 1] images -> backbone input; padding is 0 after normalisation (as detectron2 pads)."""
        x = (images - self.mean) / self.std
        return x if pixel_mask is None else x * pixel_mask[:, None].to(x.dtype)

    def backbone_module(self) -> nn.Module:
        return self.backbone

    matched = staticmethod(matched)

    def checkpoint_extras(self) -> dict:
        return {}  # the run config alone rebuilds the architecture

    def export(self, path, label_to_category, class_names, short_side: int, max_size) -> None:
        """`path`/config.json (the `model` section, labels, category ids, test size) and model.safetensors."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        settings = {
            "iuq_model_type": self.model_cfg.type,
            "model": {**asdict(self.model_cfg), "num_labels": len(class_names)},
            "class_names": list(class_names),
            "coco_category_ids": list(label_to_category),
            "test_short_side": short_side,
            "max_size": max_size,
        }
        (path / "config.json").write_text(json.dumps(settings, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, path / "model.safetensors")

    def equi_normaliser(self, queries_g: list[torch.Tensor], targets_g: list[dict]) -> float:
        """L_equi's normaliser: matched queries of the g-views averaged over ranks, at least 1 (the
        base mask loss of both models is a mean over positives)."""
        n = sum(q.shape[0] for q in queries_g)
        return max(average_over_ranks(n, self.mean.device), 1.0)
