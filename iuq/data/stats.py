"""Summary statistics of a COCO instances JSON (`iuq data stats`)."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np


def dataset_stats(ann_file: str | os.PathLike) -> dict:
    """Counts and ranges of a COCO instances file; the file is not validated beyond its keys."""
    with open(ann_file) as f:
        data = json.load(f)
    images, anns, cats = data["images"], data["annotations"], data["categories"]
    per_image = Counter(a["image_id"] for a in anns if not a.get("iscrowd", 0))
    counts = np.array([per_image.get(img["id"], 0) for img in images])
    heights = np.array([img["height"] for img in images])
    widths = np.array([img["width"] for img in images])
    areas = np.array([a["area"] for a in anns if not a.get("iscrowd", 0)], dtype=np.float64)
    names = {c["id"]: c.get("name", str(c["id"])) for c in cats}
    per_class = Counter(names.get(a["category_id"], f"<unknown {a['category_id']}>") for a in anns)

    def rng(x):
        return (float(x.min()), float(x.mean()), float(x.max())) if x.size else (0.0, 0.0, 0.0)

    return {
        "images": len(images),
        "instances": int(len(anns) - sum(a.get("iscrowd", 0) for a in anns)),
        "crowd": int(sum(a.get("iscrowd", 0) for a in anns)),
        "classes": len(cats),
        "classes_present": len(per_class),
        "images_without_instances": int((counts == 0).sum()),
        "instances_per_image": rng(counts),
        "height": rng(heights),
        "width": rng(widths),
        "instance_area": rng(areas),
        "per_class": dict(per_class.most_common()),
    }


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
    return "\n".join(lines)
