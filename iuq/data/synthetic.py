"""The embedded synthetic dataset: crowded scenes of many look-alike instances.

This is the case Instance-Unique Querying targets: huddled objects of few shapes and few colours,
touching and overlapping, on a textured background, so that a query must tell apart instances
that look the same. Everything is drawn from one `numpy.random.Generator`, so a seed fixes every
byte of the output (PNG and JSON).

Layout written by `generate()`:

    OUT/train/000000.png ...     OUT/annotations/instances_train.json
    OUT/val/000000.png ...       OUT/annotations/instances_val.json

Annotations are compressed RLE of the *visible* part of each object (visible masks never
overlap); an object is only drawn if at least `MIN_VISIBLE` of it stays visible after all later
objects, so every drawn object is annotated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw

CLASSES = ("disc", "square", "triangle", "hexagon")
# A small shared palette: every class is drawn in these colours, so colour does not give the class
# nor the instance away.
PALETTE = np.array([[200, 70, 60], [60, 120, 200], [220, 180, 50], [90, 170, 90]], dtype=np.float64)
MIN_VISIBLE = 0.45  # fraction of an object's full area that must stay visible
MIN_AREA = 40  # px; smaller visible parts are not drawn


@dataclass(frozen=True)
class SynthConfig:
    images: int = 200
    size: int = 256  # square images, side in px
    seed: int = 0
    val_fraction: float = 0.2
    min_objects: int = 6
    max_objects: int = 18
    min_radius: float = 0.04  # object radius range, as a fraction of the image side
    max_radius: float = 0.14
    colour_by_class: bool = False  # True: every instance of a class has the same colour (easy classes,
    # instances of a class even more alike); False: colours are drawn independently of the class
    unique_colour: bool = False  # True: every instance gets its own colour, uniform in RGB (overrides
    # colour_by_class; classes are then told by shape alone)
    instance_texture: bool = False  # True: every instance carries its own stripe texture (orientation,
    # period, phase, contrast) and brightness on top of its colour: instances differ across the
    # dataset, so dataset-level uniqueness is well-posed, while the class colour stays


def _shape_polygon(cls: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    sides = {"square": 4, "triangle": 3, "hexagon": 6}[cls]
    return [
        (
            cx + r * math.cos(angle + 2 * math.pi * k / sides),
            cy + r * math.sin(angle + 2 * math.pi * k / sides),
        )
        for k in range(sides)
    ]


def _draw_object(size: int, cls: str, cx: float, cy: float, r: float, angle: float, aspect: float) -> np.ndarray:
    """Full (unoccluded) mask [S, S] bool of one object, rasterised by PIL."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if cls == "disc":
        rx, ry = r * aspect, r / aspect
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    else:
        draw.polygon(_shape_polygon(cls, cx, cy, r, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured background [S, S, 3] float: a random colour, low-frequency blotches and stripes."""
    base = rng.uniform(70, 160, size=3)
    coarse = rng.normal(0, 25, size=(size // 16 + 1, size // 16 + 1, 3))
    blotches = np.stack(  # smooth blotches: bicubic upsampling of coarse noise
        [
            np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
            for c in coarse.transpose(2, 0, 1)
        ],
        axis=-1,
    )
    yy, xx = np.mgrid[0:size, 0:size]
    theta, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.25)
    stripes = 12 * np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)))[..., None]
    return base + blotches + stripes + rng.normal(0, 6, size=(size, size, 3))


def _scene(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, list[dict]]:
    """One image [S, S, 3] uint8 and its objects: dicts with class index and visible mask."""
    s = cfg.size
    image = _background(rng, s)
    owner = np.full((s, s), -1, dtype=np.int64)  # index of the visible object per pixel
    objects: list[dict] = []
    target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    yy, xx = np.mgrid[0:s, 0:s]
    for _ in range(target * 12):  # rejection sampling: bounded attempts
        if len(objects) == target:
            break
        r = s * math.exp(rng.uniform(math.log(cfg.min_radius), math.log(cfg.max_radius)))
        if objects and rng.random() < 0.9:  # huddle: place next to an existing object
            other = objects[int(rng.integers(len(objects)))]
            dist = (other["r"] + r) * rng.uniform(0.5, 0.95)
            phi = rng.uniform(0, 2 * math.pi)
            cx, cy = other["cx"] + dist * math.cos(phi), other["cy"] + dist * math.sin(phi)
        else:
            cx, cy = rng.uniform(0.1 * s, 0.9 * s, size=2)
        cls = int(rng.integers(len(CLASSES)))
        full = _draw_object(s, CLASSES[cls], cx, cy, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.25))
        area = int(full.sum())
        if area < MIN_AREA / MIN_VISIBLE:
            continue
        new_owner = np.where(full, len(objects), owner)
        visible = np.bincount(new_owner[new_owner >= 0], minlength=len(objects) + 1)  # px per object
        if any(v < max(MIN_AREA, MIN_VISIBLE * o["area"]) for v, o in zip(visible[:-1], objects, strict=True)):
            continue  # would hide too much of an earlier object
        owner = new_owner
        colour_index = int(rng.integers(len(PALETTE)))  # drawn either way: same random stream
        colour = PALETTE[cls if cfg.colour_by_class else colour_index] + rng.normal(0, 10, size=3)
        if cfg.unique_colour:  # an extra draw only here, so the other variants stay byte-identical
            colour = rng.uniform(30, 230, size=3)
        # Soft shading centred off-centre: a weak per-instance cue, as lighting gives in real scenes.
        lx, ly = cx + rng.uniform(-r, r) / 2, cy + rng.uniform(-r, r) / 2
        shade = 1.15 - 0.35 * np.clip(np.hypot(xx - lx, yy - ly) / (1.5 * r), 0, 1)
        if cfg.instance_texture:  # extra draws only here, as above
            theta, period = rng.uniform(0, math.pi), rng.uniform(3.0, 9.0)
            phase, contrast = rng.uniform(0, 2 * math.pi), rng.uniform(0.2, 0.45)
            u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
            shade = shade * rng.uniform(0.7, 1.2) * (1 + contrast * np.sin(2 * math.pi * u / period + phase))
        image = np.where(full[..., None], colour * shade[..., None], image)
        objects.append({"cls": cls, "cx": cx, "cy": cy, "r": r, "area": area})
    image = np.clip(image + rng.normal(0, 4, size=image.shape), 0, 255).astype(np.uint8)
    for k, obj in enumerate(objects):
        obj["mask"] = owner == k
    return image, objects


def _coco_json(records: list[dict], images: list[dict]) -> dict:
    return {
        "info": {"description": "iuq synthetic crowded look-alike instances"},
        "licenses": [],
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
        "images": images,
        "annotations": records,
    }


def generate(out: str | Path, cfg: SynthConfig) -> dict[str, Path]:
    """Write the dataset under `out`; returns {"train": json path, "val": json path}."""
    out = Path(out)
    rng = np.random.default_rng(cfg.seed)
    n_val = max(1, round(cfg.images * cfg.val_fraction)) if cfg.images > 1 else 0
    splits = {"train": range(0, cfg.images - n_val), "val": range(cfg.images - n_val, cfg.images)}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    paths = {}
    ann_id = 1
    for split, indices in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        images, records = [], []
        for idx in indices:
            image, objects = _scene(rng, cfg)
            name = f"{idx:06d}.png"
            Image.fromarray(image).save(out / split / name, optimize=False)
            images.append({"id": idx + 1, "file_name": name, "height": cfg.size, "width": cfg.size})
            for obj in objects:
                rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                records.append(
                    {
                        "id": ann_id,
                        "image_id": idx + 1,
                        "category_id": obj["cls"] + 1,
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                        "area": int(obj["mask"].sum()),
                        "bbox": [x, y, w, h],
                        "iscrowd": 0,
                    }
                )
                ann_id += 1
        path = out / "annotations" / f"instances_{split}.json"
        with open(path, "w") as f:
            json.dump(_coco_json(records, images), f, sort_keys=True, separators=(",", ":"))
        paths[split] = path
    return paths
