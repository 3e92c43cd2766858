"""COCO-format instance segmentation dataset: any instances JSON plus an image folder.

Every annotation is validated when the dataset is built, so a broken file fails before training
starts, with the file name and annotation id in the message. Segmentations may be polygons,
uncompressed RLE or compressed RLE; pycocotools does all mask decoding.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

from iuq.core.views import boxes_from_masks
from iuq.data.lvis import file_name_from_url
from iuq.data.rle import rle_counts_problem

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or not valid COCO instances data."""


@dataclass
class SkipReport:
    """What `skip_invalid=True` left out, so callers can print it."""

    annotations: list[tuple[int | None, str]] = field(default_factory=list)  # (annotation id, why)
    images: list[tuple[int | None, str]] = field(default_factory=list)  # (image id, why)

    def __len__(self) -> int:
        return len(self.annotations) + len(self.images)


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) -> mask [H, W] uint8.

    Raises ValueError with a description of what is malformed.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("polygon list is empty")
        for poly in segmentation:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                raise ValueError("each polygon must be a flat list of at least 3 (x, y) pairs")
            if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in poly):
                raise ValueError("polygon coordinates must be finite numbers")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise ValueError("RLE segmentation needs 'counts' and 'size'")
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} differs from the image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected {height * width}")
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(counts, (str, bytes)):  # compressed RLE
            text = counts.decode("ascii", errors="replace") if isinstance(counts, bytes) else counts
            problem = rle_counts_problem(text, height * width)
            if problem:
                raise ValueError(f"compressed RLE: {problem}")
            rle = {"size": [height, width], "counts": text.encode()}
        else:
            raise ValueError("RLE 'counts' must be a list (uncompressed) or a string (compressed)")
    else:
        raise ValueError(f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}")
    return mask_utils.decode(rle)


# Pillow modes read as 16 bits per sample; `convert("RGB")` would clip them to 255 (all white).
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# Modes Pillow converts to RGB faithfully (palette, alpha, 1-bit, CMYK, YCbCr, LAB, HSV).
_CONVERTIBLE = ("RGB", "L", "RGBA", "P", "PA", "LA", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La")


def unsupported_mode(mode: str) -> str | None:
    """Why an image of Pillow mode `mode` cannot be used, or None."""
    if mode in _CONVERTIBLE or mode in _SIXTEEN_BIT or mode == "I":
        return None
    if mode == "F":
        return "floating-point pixels (mode F) have no fixed range; save the image as 8- or 16-bit"
    return f"pixel mode {mode} is not supported; save the image as 8-bit RGB or grayscale"


def image_to_tensor(im: Image.Image) -> torch.Tensor:
    """A Pillow image -> [3, H, W] float32 in [0, 1]; 16-bit images are scaled by 65535, not clipped."""
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        values = np.asarray(im).astype(np.float32)  # [H, W]
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"32-bit integer pixels outside 0..65535 (range {values.min():g}..{values.max():g})")
        gray = torch.from_numpy(values / 65535.0)
        return gray[None].expand(3, -1, -1).contiguous()
    why = unsupported_mode(im.mode)
    if why:
        raise ValueError(why)
    return pil_to_tensor(im.convert("RGB")).float() / 255.0  # [3, H, W]


def read_image(path: str | Path, what: str = "image") -> torch.Tensor:
    """Image file -> [3, H, W] float32 in [0, 1]; unreadable files raise DatasetError naming them."""
    try:
        with Image.open(path) as im:
            return image_to_tensor(im)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read {what} ({err}); replace the file or remove its entry") from err


def probe_image(path: Path, width: int, height: int) -> str | None:
    """Open the header of an image file (no pixels decoded): None if it is readable, of a usable
    mode and of the size the JSON gives, else what is wrong."""
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
    except (OSError, UnidentifiedImageError) as err:
        return f"cannot read the image ({type(err).__name__}: {err})"
    if size != (width, height):
        return f"image is {size[0]}x{size[1]} but the JSON says {width}x{height}"
    return unsupported_mode(mode)


def probe_images(paths: dict, sizes: dict, workers: int = 16) -> dict:
    """probe_image over many files in parallel threads (opening headers is I/O bound):
    {key: problem} for the bad ones, in the order of `paths`."""
    from concurrent.futures import ThreadPoolExecutor

    keys = list(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = pool.map(lambda k: probe_image(paths[k], *sizes[k]), keys)
        return {k: why for k, why in zip(keys, found, strict=True) if why}


class CocoInstances(torch.utils.data.Dataset):
    """Instances JSON + image folder -> (image [3, H, W] float in [0, 1], target dict).

    Target keys: `masks` [K, H, W] bool, `labels` [K] int64 (contiguous 0..C-1), `boxes` [K, 4]
    xyxy float, `image_id` int, `orig_size` (H, W). Crowd annotations are not training targets;
    they stay in the JSON for COCO evaluation, as COCO does.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder holding the images named by `file_name`; None validates the annotations
            alone (`iuq data stats`), and then no image can be loaded.
        transforms: callable (image, target) -> (image, target), see `iuq.data.transforms`.
        keep_empty: keep images with no (non-crowd) annotation; they are negatives for training.
        skip_invalid: instead of raising, skip bad annotations/images and count them (with a warning).
        skip_hint: how the caller's user turns skipping on, for error messages (a config key, a CLI flag).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        transforms: Callable | None = None,
        keep_empty: bool = True,
        skip_invalid: bool = False,
        skip_hint: str = "pass skip_invalid=True",
    ):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        if self.image_dir is not None and not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder of {self.ann_file} does not exist")
        self.skip_hint = skip_hint
        self.transforms = transforms
        self.skip_invalid = skip_invalid
        self.skipped = SkipReport()

        data = _read_json(self.ann_file)
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in self.categories]
        self.category_to_label = {cid: i for i, cid in enumerate(self.category_ids)}
        self.class_names = [c.get("name", str(c["id"])) for c in self.categories]

        self.images: dict[int, dict] = {}
        for img in data["images"]:
            try:
                _check_image_entry(img, self.image_dir, self.ann_file)
                if img["id"] in self.images:
                    raise DatasetError(f"{self.ann_file}: image id {img['id']} appears twice in 'images'")
            except DatasetError as err:
                self._invalid("image", img.get("id") if isinstance(img, dict) else None, str(err))
                continue
            self.images[img["id"]] = img
        self._skipped_images: dict = {}
        if self.image_dir is not None:
            self._check_image_files()

        self.annotations: dict[int, list[dict]] = {i: [] for i in self.images}
        self.crowd_annotations: list[dict] = []  # valid, kept for evaluation, not training targets
        seen: set = set()
        for ann in data["annotations"]:
            if not isinstance(ann, dict):
                self._invalid("annotation", None, f"{self.ann_file}: an entry of 'annotations' is not an object")
                continue
            if ann.get("id") in seen:
                self._invalid("annotation", ann.get("id"), f"{self.ann_file}: annotation id {ann['id']} appears twice")
                continue
            seen.add(ann.get("id"))
            problem = self._check_annotation(ann)
            if problem:
                self._invalid("annotation", ann.get("id"), problem)
                continue
            if ann.get("iscrowd", 0):
                self.crowd_annotations.append(ann)
            else:
                self.annotations[ann["image_id"]].append(ann)

        self.image_ids = [i for i in self.images if keep_empty or self.annotations[i]]
        if self.skipped:
            log.warning(
                "%s: skipped %d invalid annotations and %d invalid images; first: %s",
                self.ann_file,
                len(self.skipped.annotations),
                len(self.skipped.images),
                (self.skipped.annotations + self.skipped.images)[0][1],
            )

    def _check_image_files(self) -> None:
        """Every image header opened (in parallel) before any training; every bad file reported at once."""
        paths = {i: self.image_dir / img["file_name"] for i, img in self.images.items()}
        sizes = {i: (img["width"], img["height"]) for i, img in self.images.items()}
        problems = {i: f"{paths[i]} (image id {i}): {why}" for i, why in probe_images(paths, sizes).items()}
        if not problems:
            return
        if not self.skip_invalid:
            listed = "; ".join(list(problems.values())[:5])
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise DatasetError(
                f"{len(problems)} image file(s) of {self.ann_file} cannot be used: {listed}{more} "
                f"(or {self.skip_hint} to skip and count such images)"
            )
        for image_id, why in problems.items():
            self.skipped.images.append((image_id, why))
            self._skipped_images[image_id] = why
            del self.images[image_id]

    def _invalid(self, kind: str, ident, why: str) -> None:
        if not self.skip_invalid:
            raise DatasetError(f"{why} (or {self.skip_hint} to skip and count such entries)")
        (self.skipped.annotations if kind == "annotation" else self.skipped.images).append((ident, why))

    def _check_annotation(self, ann: dict) -> str | None:
        """None if the annotation is a valid target, else a message naming file and annotation id."""
        where = f"{self.ann_file}: annotation id {ann.get('id')}"
        for key in ("id", "image_id", "category_id", "segmentation"):
            if key not in ann:
                return f"{where}: missing key '{key}'"
        for key in ("id", "image_id", "category_id"):
            if not isinstance(ann[key], int) or isinstance(ann[key], bool):
                return f"{where}: '{key}' must be an integer, got {ann[key]!r}"
        if ann["image_id"] in self._skipped_images:
            return f"{where}: its image was skipped ({self._skipped_images[ann['image_id']]})"
        if ann["image_id"] not in self.images:
            return f"{where}: image_id {ann['image_id']} is not in 'images'"
        if ann["category_id"] not in self.category_to_label:
            return f"{where}: category_id {ann['category_id']} is not in 'categories'"
        if ann.get("iscrowd", 0) not in (0, 1):
            return f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}"
        img = self.images[ann["image_id"]]
        try:
            mask = decode_segmentation(ann["segmentation"], img["height"], img["width"])
        except (ValueError, TypeError) as err:
            return f"{where}: malformed segmentation: {err}"
        if not ann.get("iscrowd", 0) and not mask.any():
            return f"{where}: segmentation covers no pixel of the {img['width']}x{img['height']} image"
        return None

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        """image [3, H, W] float32 in [0, 1]."""
        info = self.images[image_id]
        if self.image_dir is None:
            raise DatasetError(f"{self.ann_file}: opened without an image folder; cannot load image {image_id}")
        path = self.image_dir / info["file_name"]
        image = read_image(path, f"image id {image_id}")
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise DatasetError(
                f"{path}: image is {image.shape[2]}x{image.shape[1]} but {self.ann_file} says "
                f"{info['width']}x{info['height']} for image id {image_id}"
            )
        return image

    def load_target(self, image_id: int) -> dict:
        info = self.images[image_id]
        h, w = info["height"], info["width"]
        anns = self.annotations[image_id]
        if anns:
            masks = np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns])
            masks = torch.from_numpy(masks).bool()  # [K, H, W]
        else:
            masks = torch.zeros((0, h, w), dtype=torch.bool)
        labels = torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        return {
            "masks": masks,
            "labels": labels,
            "boxes": boxes_from_masks(masks),
            "image_id": image_id,
            "orig_size": (h, w),
        }

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        image, target = self.load_image(image_id), self.load_target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: annotation file not found") from err
    except IsADirectoryError as err:
        raise DatasetError(f"{path}: is a folder; expected a COCO instances JSON file") from err
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the annotation file ({err.strerror or err})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err}); is the file complete?") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO instances file (top level is not an object)")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(
            f"{path}: not a COCO instances file: missing list(s) {missing}; expected keys "
            "'images', 'annotations' and 'categories'"
        )
    ids = set()
    for cat in data["categories"]:
        if not isinstance(cat, dict) or "id" not in cat:
            raise DatasetError(f"{path}: category without 'id': {cat}")
        if not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
            raise DatasetError(f"{path}: category id {cat['id']!r} must be an integer (COCO ids are integers)")
        if cat["id"] in ids:
            raise DatasetError(f"{path}: category id {cat['id']} appears twice in 'categories'")
        ids.add(cat["id"])
    return data


def _check_image_entry(img: dict, image_dir: Path | None, ann_file: Path) -> None:
    if not isinstance(img, dict):
        raise DatasetError(f"{ann_file}: an entry of 'images' is not an object: {img!r}")
    if "file_name" not in img and file_name_from_url(img):  # LVIS v1: images named by their COCO URL
        img["file_name"] = file_name_from_url(img)
    for key in ("id", "file_name", "height", "width"):
        if key not in img:
            raise DatasetError(f"{ann_file}: image entry {img.get('id')} is missing key '{key}'")
    if not isinstance(img["id"], int) or isinstance(img["id"], bool):
        raise DatasetError(f"{ann_file}: image id {img['id']!r} must be an integer (COCO ids are integers)")
    for key in ("height", "width"):
        if not isinstance(img[key], int) or img[key] < 1:
            raise DatasetError(f"{ann_file}: image id {img['id']}: '{key}' must be an integer >= 1, not {img[key]!r}")
    if image_dir is None:
        return
    path = image_dir / img["file_name"]
    if not path.is_file():
        raise DatasetError(f"{path}: image file of image id {img['id']} not found")
