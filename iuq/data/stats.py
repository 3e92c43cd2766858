"""Summary statistics of a COCO instances JSON (`iuq data stats`), after the loader's validation."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from iuq.data.coco import CocoInstances


def dataset_stats(
    ann_file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    max_dets: int = 100,
    skip_hint: str = "pass --skip-invalid",
) -> dict:
    """Counts and ranges of a COCO instances file, validated as training would validate it
    (`CocoInstances`; image files are checked too when `image_dir` is given).

    `crowded` lists (image id, instances) of the images holding more than `max_dets` instances,
    which COCO's maxDets would keep from full recall.
    """
    ds = CocoInstances(ann_file, image_dir, skip_invalid=skip_invalid, skip_hint=skip_hint)
    counts = np.array([len(ds.annotations[i]) for i in ds.images])
    heights = np.array([img["height"] for img in ds.images.values()])
    widths = np.array([img["width"] for img in ds.images.values()])
    anns = [a for i in ds.images for a in ds.annotations[i]]
    areas = np.array([_area(a, ds.images[a["image_id"]]) for a in anns], dtype=np.float64)
    per_class = Counter(ds.class_names[ds.category_to_label[a["category_id"]]] for a in anns)
    crowded = sorted(((i, len(a)) for i, a in ds.annotations.items() if len(a) > max_dets), key=lambda x: -x[1])

    def rng(x):
        return (float(x.min()), float(x.mean()), float(x.max())) if x.size else (0.0, 0.0, 0.0)

    return {
        "images": len(ds.images),
        "instances": len(anns),
        "crowd": len(ds.crowd_annotations),
        "classes": len(ds.category_ids),
        "classes_present": len(per_class),
        "images_without_instances": int((counts == 0).sum()),
        "instances_per_image": rng(counts),
        "height": rng(heights),
        "width": rng(widths),
        "instance_area": rng(areas),
        "per_class": dict(per_class.most_common()),
        "skipped_annotations": len(ds.skipped.annotations),
        "skipped_images": len(ds.skipped.images),
        "max_dets": max_dets,
        "crowded": crowded,
    }


def _area(ann: dict, img: dict) -> float:
    if "area" in ann:
        return float(ann["area"])
    from iuq.data.coco import decode_segmentation

    return float(decode_segmentation(ann["segmentation"], img["height"], img["width"]).sum())


def format_stats(stats: dict) -> str:
    def mmm(t):
        return f"min {t[0]:g}  mean {t[1]:.1f}  max {t[2]:g}"

    lines = [
        f"images               {stats['images']}  ({stats['images_without_instances']} without instances)",
        f"instances            {stats['instances']}  (+{stats['crowd']} crowd)",
        f"classes              {stats['classes']}  ({stats['classes_present']} present)",
        f"instances per image  {mmm(stats['instances_per_image'])}",
        f"image height         {mmm(stats['height'])}",
        f"image width          {mmm(stats['width'])}",
        f"instance area (px)   {mmm(stats['instance_area'])}",
        "per class            " + ", ".join(f"{k}: {v}" for k, v in list(stats["per_class"].items())[:12]),
    ]
    if stats["skipped_annotations"] or stats["skipped_images"]:
        lines.append(
            f"skipped              {stats['skipped_annotations']} invalid annotations, "
            f"{stats['skipped_images']} invalid images (not counted above)"
        )
    return "\n".join(lines)


def crowded_warning(stats: dict) -> str | None:
    """A warning when some images hold more instances than COCO's maxDets counts, else None."""
    crowded = stats["crowded"]
    if not crowded:
        return None
    most = crowded[0]
    return (
        f"warning: {len(crowded)} image(s) hold more than {stats['max_dets']} instances (most: image id {most[0]} "
        f"with {most[1]}); COCO AP with maxDets={stats['max_dets']} cannot reach full recall there. Set "
        f"eval.max_dets (and model.num_queries) to at least {most[1]}"
    )
