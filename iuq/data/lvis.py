"""LVIS v1 specifics: image file names from COCO URLs, and repeat-factor sampling.

LVIS v1 is COCO-format with federated labels: each image lists the classes verified absent
(`neg_category_ids`) and those whose instances are not all annotated
(`not_exhaustive_category_ids`); each category has a `frequency` ("r", "c", "f"). Evaluation reads
those from the JSON (`iuq.evaluation.coco_eval`, metric "lvis"). Its images are COCO 2017's and are
named by `coco_url` only; both LVIS splits draw on COCO's train2017 and val2017, so a file name keeps
the split folder and `data.*_images` points at the COCO image root that holds train2017/ and val2017/.

Repeat-factor sampling (Gupta et al., LVIS, CVPR 2019): with f(c) the fraction of training images
that contain class c, r(c) = max(1, sqrt(t / f(c))), and an image is repeated r(I) = max over its
classes of r(c) times per epoch (t = 0.001 in the LVIS recipes).
"""

from __future__ import annotations

import math

import torch


def file_name_from_url(img: dict) -> str | None:
    """ "http://images.cocodataset.org/val2017/000000397133.jpg" -> "val2017/000000397133.jpg"."""
    url = img.get("coco_url")
    if not isinstance(url, str) or url.count("/") < 2:
        return None
    return "/".join(url.rstrip("/").split("/")[-2:])


def repeat_factors(image_categories: list[set[int]], threshold: float) -> torch.Tensor:
    """[N] repeat factor of each training image from the categories it contains (an image without
    annotations keeps 1)."""
    if not threshold > 0:
        raise ValueError(f"data.repeat_factor_threshold: must be > 0, got {threshold!r}")
    n = len(image_categories)
    counts: dict[int, int] = {}
    for cats in image_categories:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    per_class = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return torch.tensor([max((per_class[c] for c in cats), default=1.0) for cats in image_categories])


def repeated_indices(factors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch's image indices: image i appears floor(r_i) times, plus once more with probability
    frac(r_i) (stochastic rounding, so the expected count is r_i)."""
    whole = factors.floor()
    extra = torch.rand(factors.shape, generator=generator, dtype=torch.float64) < (factors.double() - whole.double())
    counts = whole.long() + extra.long()
    return torch.repeat_interleave(torch.arange(factors.shape[0]), counts)
