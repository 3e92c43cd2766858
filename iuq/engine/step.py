"""One training step of a base segmenter with IUQ, independent of the training engine.

    images, targets --> g ~ G per image --> views [I, g(I)] --> one batched forward
    base losses on both views; L_inter on the matched queries of all views vs. the batch's other
    images and the memory; L_equi from the g-views' matched queries on g(f(I)).

The memory is *not* updated here: call `criterion.update_memory(result.samples)` after the
optimiser step, so a batch is never contrasted with its own entries twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iuq.core.criterion import IUQCriterion
from iuq.core.sampling import PixelSamples
from iuq.core.transforms import BatchTransform, sample_transforms


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step and the term."""


@dataclass
class StepResult:
    loss: torch.Tensor  # weighted total to backpropagate
    terms: dict[str, torch.Tensor]  # every term, unweighted: the base model's and loss_inter / loss_equi
    samples: PixelSamples | None  # to enqueue after the step
    g: BatchTransform | None


def transformed_views(images: torch.Tensor, pixel_mask: torch.Tensor, targets: list[dict], g: BatchTransform):
    """g(I), its pixel mask and g(targets); instances cropped out entirely are dropped."""
    g_images = g.apply(images)  # [B, 3, H, W]
    g_targets = []
    for b, t in enumerate(targets):
        index = torch.full((t["masks"].shape[0],), b, dtype=torch.long)
        masks = g.apply_masks(t["masks"], index)  # [K, H, W]
        keep = masks.flatten(1).any(1)
        g_targets.append({**t, "masks": masks[keep], "labels": t["labels"][keep]})
    return g_images, pixel_mask, g_targets


def valid_fraction(pixel_mask: torch.Tensor) -> torch.Tensor:
    """pixel_mask [B, H, W] bool (valid region at top-left) -> [B, 2] (x, y) fractions of the canvas."""
    w = pixel_mask.any(1).sum(1).float() / pixel_mask.shape[2]
    h = pixel_mask.any(2).sum(1).float() / pixel_mask.shape[1]
    return torch.stack([w, h], dim=1)


def training_step(
    model,
    criterion: IUQCriterion | None,
    images: torch.Tensor,
    pixel_mask: torch.Tensor,
    targets: list[dict],
    image_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Base model (an adapter such as `Mask2FormerAdapter`) plus IUQ on one padded batch.

    `criterion=None` is the plain baseline. With `criterion.cfg.equi` the batch gains its g-views
    (also for the "augmentation" variant, so ablations see equal numbers of views).
    """
    b = images.shape[0]
    g = None
    all_images, all_mask, all_targets = images, pixel_mask, targets
    if criterion is not None and criterion.cfg.equi:
        cfg = criterion.cfg
        g = sample_transforms(b, generator, valid_fraction(pixel_mask), cfg.flip_p, (cfg.crop_min, cfg.crop_max))
        g = g.to(images.device)
        g_images, g_mask, g_targets = transformed_views(images, pixel_mask, targets, g)
        all_images = torch.cat([images, g_images])
        all_mask = torch.cat([pixel_mask, g_mask])
        all_targets = targets + g_targets
    out = model(all_images, all_mask, all_targets)
    terms = dict(out.loss_terms)
    loss = out.loss
    samples = None
    if criterion is not None and (criterion.cfg.inter or criterion.cfg.equi):
        # Pixel sampling draws on the embeddings' device; its generator is seeded from the CPU one.
        sample_generator = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
            sample_generator = torch.Generator(device=images.device).manual_seed(seed)
        queries, masks = model.matched(out, all_targets)
        iuq_terms, samples = criterion(
            out.pixel_embeddings,
            queries,
            masks,
            [t["masks"] for t in targets],
            image_ids,
            g=g,
            num_masks=max(sum(q.shape[0] for q in queries[b:]), 1),
            generator=sample_generator,
        )
        for name, value in iuq_terms.items():
            terms[name] = value
            loss = loss + criterion.weights[name] * value
    return StepResult(loss=loss, terms=terms, samples=samples, g=g)
