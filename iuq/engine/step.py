"""One training step of a base segmenter with IUQ, independent of the training engine.

    images, targets --[g_augment: g0 ~ G]--> g ~ G per image --> views [I, g(I)] --> one forward
    base loss on each view (normalised per view; the g-view's only with g_view_base_loss);
    L_inter on the matched queries vs. the batch's other images and the memory;
    L_equi from the g-views' matched queries on g(f(I)), normalised like the base mask loss.

The memory is *not* updated here: call `criterion.update_memory(result.samples)` after the
optimiser step, so a batch is never contrasted with its own entries twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from iuq.core.config import IUQConfig
from iuq.core.criterion import IUQCriterion
from iuq.core.roi_criterion import RoIIUQCriterion
from iuq.core.sampling import PixelSamples, downsample_masks
from iuq.core.transforms import BatchTransform
from iuq.core.views import draw_g, transformed_views
from iuq.models.interface import instance_targets, matched


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step, the term and the rank."""


def check_finite(terms: dict[str, torch.Tensor], step: int, advice: str = "") -> None:
    """Raise `NonFiniteLossError` on every rank when any term is NaN or infinite on any rank.

    Under torch.distributed the terms of all ranks are gathered first, so all ranks stop at the same
    step with the same message; a rank that stopped alone would leave the others waiting in their
    next collective until the timeout.
    """
    names = list(terms)
    values = torch.stack([terms[n].detach().float().reshape(()) for n in names])  # [T]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shards = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, values.contiguous())
        table = torch.stack(shards)  # [ranks, T]
    else:
        table = values[None]
    bad = ~torch.isfinite(table)
    if not bool(bad.any()):
        return
    rank, t = (int(i) for i in bad.nonzero()[0])
    where = f" on rank {rank}" if table.shape[0] > 1 else ""
    raise NonFiniteLossError(
        f"step {step}: loss term '{names[t]}' is {float(table[rank, t])}{where}; stopping. {advice}".rstrip()
    )


def build_criterion(cfg: IUQConfig, model) -> IUQCriterion:
    """The criterion for `model`'s decoder kind: pixel decoders (`IUQCriterion`) or an RoI mask head
    (`RoIIUQCriterion`, a model with `decoder_kind = "roi"`)."""
    if getattr(model, "decoder_kind", "pixel") == "roi":
        return RoIIUQCriterion(cfg, model.decoder, model.pixel_dim, model.roi_size, model.mask_loss,
                               model.mask_loss_weight)  # fmt: skip
    return IUQCriterion(cfg, model.decoder, model.pixel_dim, model.mask_loss, model.mask_loss_weight,
                        mask_upsample=model.equi_upsample)  # fmt: skip


@dataclass
class StepResult:
    loss: torch.Tensor  # weighted total to backpropagate
    terms: dict[str, torch.Tensor]  # every term, unweighted: the base model's and loss_inter / loss_equi
    samples: PixelSamples | None  # to enqueue after the step
    g: BatchTransform | None
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)  # gradient shares etc. (logs only)


def gradient_shares(
    parts: dict[str, torch.Tensor], points: dict[str, torch.Tensor | list[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """For each weighted loss part and each point of the graph (a tensor, or a group of parameters
    taken as one vector): the norm of the part's gradient there, and its share of the sum of norms
    over parts (`grad_norm/<point>/<part>`, `grad_share/...`). One backward pass per part."""
    names = list(points)
    groups = [p if isinstance(p, list) else [p] for p in points.values()]
    flat = [t for group in groups for t in group]
    norms = {point: {} for point in names}
    for name, value in parts.items():
        grads = torch.autograd.grad(value, flat, retain_graph=True, allow_unused=True)
        at = 0
        for point, group in zip(names, groups, strict=True):
            squares = [g.detach().float().square().sum() for g in grads[at : at + len(group)] if g is not None]
            norms[point][name] = torch.stack(squares).sum().sqrt() if squares else flat[0].new_zeros(())
            at += len(group)
    out = {}
    for point in names:
        total = sum(norms[point].values()).clamp(min=1e-12)
        for name, norm in norms[point].items():
            out[f"grad_norm/{point}/{name}"] = norm
            out[f"grad_share/{point}/{name}"] = norm / total
    return out


def shared_parameter_groups(model) -> dict[str, list[torch.Tensor]]:
    """The trainable parameters of each top-level part of the base model (backbone, pyramid, heads,
    mask branch...; one level further down when the model wraps a single module), for gradient shares
    at the weights every term trains."""
    children = [(n, c) for n, c in model.named_children() if any(p.requires_grad for p in c.parameters())]
    if len(children) == 1:
        children = [(n, c) for n, c in children[0][1].named_children() if any(p.requires_grad for p in c.parameters())]
    return {f"param_{n}": [p for p in c.parameters() if p.requires_grad] for n, c in children}


def training_step(
    model,
    criterion: IUQCriterion | None,
    images: torch.Tensor,
    pixel_mask: torch.Tensor,
    targets: list[dict],
    image_ids: torch.Tensor,
    generator: torch.Generator | None = None,
    cfg: IUQConfig | None = None,
    diagnose: bool = False,
    step: int | None = None,
) -> StepResult:
    """Base model (`iuq.models.build.build_model`) plus IUQ on one padded batch.

    `criterion=None` is the plain baseline; `cfg` (default: the criterion's) still decides
    `g_augment`, so a baseline can train with G as augmentation. With `criterion.cfg.equi` the batch
    gains its g-views (also for the "augmentation" variant, so ablations see equal numbers of views).
    `diagnose` adds gradient shares per term (at the pixel embeddings, the query states and each
    part of the model's parameters) and the split of L_inter to `result.diagnostics`. `step`, the
    optimiser step, sets the IUQ weights under `iuq.warmup_steps`.
    """
    cfg = criterion.cfg if criterion is not None else (cfg or IUQConfig(inter=False, equi=False))
    if cfg.g_augment:  # G as ordinary augmentation: every later step sees g0(I) as "the image"
        g0 = draw_g(cfg, pixel_mask, model.stride, generator)
        images, pixel_mask, targets = transformed_views(images, pixel_mask, targets, g0)
    b = images.shape[0]
    g = None
    all_images, all_mask, all_targets, views = images, pixel_mask, targets, 1
    if criterion is not None and cfg.equi:
        g = draw_g(cfg, pixel_mask, model.stride, generator)
        g_images, g_mask, g_targets = transformed_views(images, pixel_mask, targets, g)
        all_images = torch.cat([images, g_images])
        all_mask = torch.cat([pixel_mask, g_mask])
        all_targets = targets + g_targets
        views = 2
    out = model(all_images, all_mask, all_targets, views=views, view_loss=(True, cfg.g_view_base_loss)[:views])
    terms = dict(out.loss_terms)
    loss = out.loss
    parts = {"base": out.loss}
    if views == 2 and out.view_losses[1] is not None:
        terms["loss_base_g"] = out.view_losses[1].detach()  # weighted, for the logs
    samples = None
    diagnostics = {}
    if criterion is not None and (cfg.inter or cfg.equi):
        # Pixel sampling draws on the embeddings' device; its generator is seeded from the CPU one.
        sample_generator = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
            sample_generator = torch.Generator(device=images.device).manual_seed(seed)
        queries, masks, labels = matched(out, all_targets)
        num_masks = model.equi_normaliser(queries[b:], all_targets[b:]) if g is not None else None
        if isinstance(criterion, RoIIUQCriterion):  # masks decoded from RoI features (QueryInst)
            # Every stage matches the same number of instances, so the last stage's normaliser makes
            # "all" stages' L_equi the sum of per-stage losses, as the base loss sums them.
            r_queries, r_instances, r_boxes, r_stages = model.roi_queries(out, cfg.roi_stages == "all")
            r_masks, r_labels = instance_targets(all_targets, r_instances)
            iuq_terms, samples = criterion(
                out.head["levels"], list(model.strides), r_queries, r_labels, r_boxes, r_masks,
                [t["boxes"] for t in targets], [t["labels"] for t in targets], image_ids, g=g, num_masks=num_masks,
                generator=sample_generator, query_stages=r_stages, roi_norm=out.head["roi_norm"],
            )  # fmt: skip
        else:
            valid_g = None
            if g is not None:
                valid_g = downsample_masks(all_mask[b:], out.pixel_embeddings.shape[-2:])  # [B, h, w]
            iuq_terms, samples = criterion(
                out.pixel_embeddings,
                queries,
                masks,
                [t["masks"] for t in targets],
                image_ids,
                g=g,
                query_xy=out.query_xy,
                num_masks=num_masks,
                generator=sample_generator,
                gt_labels=[t["labels"] for t in targets],
                valid_g=valid_g,
                query_instances=out.instances,
            )
        weights = criterion.weights_at(step)
        for name, value in iuq_terms.items():
            terms[name] = value
            weighted = weights[name] * value
            loss = loss + weighted
            parts[name.removeprefix("loss_")] = weighted
        if diagnose and cfg.inter and not isinstance(criterion, RoIIUQCriterion):
            diagnostics.update(criterion.diagnose_inter(queries, labels, image_ids, samples, out.query_xy))
    if diagnose:
        points = {"pixel": out.pixel_embeddings, "query": out.query_states, **shared_parameter_groups(model)}
        diagnostics.update(gradient_shares(parts, points))
    return StepResult(loss=loss, terms=terms, samples=samples, g=g, diagnostics=diagnostics)
