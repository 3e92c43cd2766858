"""Scenes of real, different-looking objects: COCO instances cut out and pasted onto blurred scenes.

The embedded synthetic data and nuclei24 are crowds of look-alike instances. This builds the other
regime, the one COCO is made of, from real objects: every instance of a COCO-format source (e.g.
coco128) is cut out with its mask; each scene is a blurred source photo with 1-8 cut-outs pasted at
random scales, flips, positions and depth order. Splits are made **by source image**, so no object
(and no background) appears in two splits; each scene draws its background and objects from its own
split's source images only.

Layout written by `generate_paste()` (deterministic by seed):

    OUT/train/000000.jpg ...   OUT/annotations/instances_train.json
    OUT/dev/...                OUT/annotations/instances_dev.json
    OUT/val/...                OUT/annotations/instances_val.json
    OUT/annotations/sources.json   which source images each split drew from, the kept classes

Annotations are compressed RLE of the *visible* part of each pasted object (visible masks never
overlap); an object is kept only if at least `min_visible` of its pasted area stays visible.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageFilter
from pycocotools.coco import COCO

SPLITS = ("train", "dev", "val")


class PasteError(ValueError):
    """The source cannot give a dataset under these settings; the message says what to change."""


@dataclass(frozen=True)
class PasteConfig:
    """How the pasted-object dataset is built.

    coco_ann, coco_images: the COCO-format source (instances JSON and its image folder).
    seed: fixes every byte written. size: square scenes, side in px.
    scenes: scenes per split (train, dev, val). source_split: fractions of the source images that
        go to (train, dev, val).
    objects: (min, max) cut-outs pasted per scene.
    min_instances: a class is kept when it has at least this many cut-outs over all splits and at
        least one in every split. min_object_px: cut-outs smaller than this (at the source's size,
        visible area) are not used: at scene scale they would be a few pixels.
    scale: (min, max) long side of a pasted object as a fraction of the scene side.
    min_visible: fraction of an object's pasted area that must stay visible after later objects.
    blur: Gaussian blur radius (px, at scene size) of the background photo.
    """

    coco_ann: str = "../shared/datasets/coco128/annotations/instances_train2017.json"
    coco_images: str = "../shared/datasets/coco128/train2017"
    seed: int = 0
    size: int = 192
    scenes: list[int] = field(default_factory=lambda: [600, 100, 100])
    source_split: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    objects: list[int] = field(default_factory=lambda: [1, 8])
    min_instances: int = 10
    min_object_px: int = 400
    scale: list[float] = field(default_factory=lambda: [0.2, 0.6])
    min_visible: float = 0.5
    blur: float = 6.0

    def __post_init__(self) -> None:
        if self.size < 32:
            raise PasteError(f"paste size: at least 32 px, got {self.size}")
        if len(self.scenes) != 3 or min(self.scenes) < 1:
            raise PasteError(f"paste scenes: three positive counts (train, dev, val), got {self.scenes}")
        if len(self.source_split) != 3 or min(self.source_split) <= 0:
            raise PasteError(f"paste source_split: three positive fractions, got {self.source_split}")
        if len(self.objects) != 2 or not 1 <= self.objects[0] <= self.objects[1]:
            raise PasteError(f"paste objects: need 1 <= min <= max, got {self.objects}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise PasteError(f"paste scale: need 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.min_visible <= 1:
            raise PasteError(f"paste min_visible: must be in (0, 1], got {self.min_visible}")


@dataclass
class CutOut:
    """One source instance: its RGBA crop (alpha = the instance mask) and where it came from."""

    rgba: Image.Image
    category_id: int
    image_id: int
    ann_id: int


def cut_outs(coco: COCO, image_dir: Path, image_ids: list[int], min_px: int) -> list[CutOut]:
    """Every non-crowd instance of `image_ids` with a visible area of at least `min_px` pixels, cut
    to its mask's bounding box."""
    out = []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        path = image_dir / info["file_name"]
        if not path.is_file():
            raise PasteError(f"{path}: image {image_id} of the source annotations is missing")
        rgb = np.asarray(Image.open(path).convert("RGB"))
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)):
            mask = coco.annToMask(ann).astype(bool)  # [H, W]
            if mask.shape != rgb.shape[:2]:
                raise PasteError(
                    f"annotation {ann['id']}: mask {mask.shape} does not fit image {image_id} {rgb.shape[:2]}"
                )
            if mask.sum() < min_px:
                continue
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            alpha = (mask[y0:y1, x0:x1] * 255).astype(np.uint8)
            rgba = np.dstack([rgb[y0:y1, x0:x1], alpha])
            out.append(CutOut(Image.fromarray(rgba, "RGBA"), ann["category_id"], image_id, ann["id"]))
    return out


def split_sources(image_ids: list[int], fractions, rng: np.random.Generator) -> dict[str, list[int]]:
    """Source images shuffled and cut into train / dev / val by `fractions` (each split non-empty)."""
    order = [image_ids[i] for i in rng.permutation(len(image_ids))]
    n = len(order)
    total = sum(fractions)
    n_dev = max(1, round(n * fractions[1] / total))
    n_val = max(1, round(n * fractions[2] / total))
    n_train = n - n_dev - n_val
    if n_train < 1:
        raise PasteError(f"{n} source images cannot make three splits")
    return {"train": order[:n_train], "dev": order[n_train : n_train + n_dev], "val": order[n_train + n_dev :]}


def background(photo: Image.Image, size: int, blur: float, rng: np.random.Generator) -> Image.Image:
    """A random square crop of a source photo, resized to the scene and blurred: real colours and
    textures with no sharp object left to confuse with an annotated one."""
    w, h = photo.size
    side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
    return crop.filter(ImageFilter.GaussianBlur(blur))


def compose(
    cuts: list[CutOut], photos: dict[int, Image.Image], cfg: PasteConfig, rng: np.random.Generator
) -> tuple[Image.Image, list[tuple[int, np.ndarray]]]:
    """One scene: a blurred background and 1-8 pasted cut-outs, back to front. Returns the image
    and the (category id, visible mask [size, size] bool) of every object that stays visible."""
    s = cfg.size
    bg_id = list(photos)[int(rng.integers(len(photos)))]
    canvas = background(photos[bg_id], s, cfg.blur, rng)
    placed = []  # (category, full mask at scene size)
    for _ in range(int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))):
        cut = cuts[int(rng.integers(len(cuts)))]
        rgba = cut.rgba.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else cut.rgba
        long_side = rng.uniform(*cfg.scale) * s
        k = long_side / max(rgba.size)
        w, h = max(1, round(rgba.size[0] * k)), max(1, round(rgba.size[1] * k))
        rgba = rgba.resize((w, h), Image.BILINEAR)
        x, y = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
        alpha = np.asarray(rgba)[:, :, 3] >= 128  # the mask, resampled with the pixels
        full = np.zeros((s, s), dtype=bool)
        full[y : y + h, x : x + w] = alpha
        if not full.any():
            continue
        hard = Image.fromarray((alpha * 255).astype(np.uint8), "L")  # a hard edge: annotation = pixels
        canvas.paste(rgba.convert("RGB"), (x, y), hard)
        placed.append((cut.category_id, full))
    objects = []
    covered = np.zeros((s, s), dtype=bool)
    for category, full in reversed(placed):  # front to back: each object loses what is in front of it
        visible = full & ~covered
        covered |= full
        if visible.sum() >= cfg.min_visible * full.sum():
            objects.append((category, visible))
    return canvas, objects[::-1]


def generate_paste(out: str | Path, cfg: PasteConfig) -> dict:
    """Write the dataset (module docstring) into `out`; returns what `sources.json` holds."""
    out = Path(out)
    ann_path, image_dir = Path(cfg.coco_ann), Path(cfg.coco_images)
    for path, what in ((ann_path, "source annotations"), (image_dir, "source image folder")):
        if not path.exists():
            raise PasteError(f"{what} {path} does not exist")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading steps
        coco = COCO(str(ann_path))
    rng = np.random.default_rng(cfg.seed)
    sources = split_sources(sorted(coco.imgs), cfg.source_split, rng)
    cuts = {name: cut_outs(coco, image_dir, ids, cfg.min_object_px) for name, ids in sources.items()}
    counts = {name: {} for name in SPLITS}
    for name in SPLITS:
        for c in cuts[name]:
            counts[name][c.category_id] = counts[name].get(c.category_id, 0) + 1
    kept = sorted(
        cat for cat in coco.cats
        if sum(counts[n].get(cat, 0) for n in SPLITS) >= cfg.min_instances and all(counts[n].get(cat) for n in SPLITS)
    )  # fmt: skip
    if not kept:
        raise PasteError(
            f"no class of {ann_path} has {cfg.min_instances} cut-outs of at least {cfg.min_object_px} px with one in "
            "every split; lower min_instances or min_object_px, or use a larger source"
        )
    categories = [{"id": c, "name": coco.cats[c]["name"], "supercategory": coco.cats[c].get("supercategory", "")}
                  for c in kept]  # fmt: skip
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for name, n_scenes in zip(SPLITS, cfg.scenes, strict=True):
        pool = [c for c in cuts[name] if c.category_id in kept]
        photos = {i: Image.open(image_dir / coco.imgs[i]["file_name"]).convert("RGB") for i in sources[name]}
        (out / name).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(n_scenes):
            scene, objects = compose(pool, photos, cfg, rng)
            file_name = f"{index:06d}.jpg"
            scene.save(out / name / file_name, quality=92)
            images.append({"id": index + 1, "file_name": file_name, "width": cfg.size, "height": cfg.size})
            for category, visible in objects:
                rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
                x, y, w, h = mask_utils.toBbox(rle).tolist()
                annotations.append({
                    "id": len(annotations) + 1, "image_id": index + 1, "category_id": category,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": int(visible.sum()), "bbox": [x, y, w, h], "iscrowd": 0,
                })  # fmt: skip
        with open(out / "annotations" / f"instances_{name}.json", "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    manifest = {
        "config": asdict(cfg),
        "classes": [c["name"] for c in categories],
        "source_images": sources,
        "cut_outs": {n: sum(c.category_id in kept for c in cuts[n]) for n in SPLITS},
    }
    with open(out / "annotations" / "sources.json", "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
