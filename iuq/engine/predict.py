"""`iuq predict`: instance masks of image files of any size, as COCO results and PNG overlays.

Each image is resized as the model's test transform does; the masks stay at the model's
resolution and are pasted and RLE-encoded a few instances at a time at the original size
(`iuq.models.paste`), so a 24-megapixel photo needs about as much memory as the model's input.
Overlays are previews, drawn with the long side at most `OVERLAY_MAX_SIDE` pixels.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from iuq.data.coco import DatasetError, read_image
from iuq.data.transforms import collate, resize_output_size
from iuq.engine.inference import TrainedModel, predict, prepare_image
from iuq.evaluation.coco_eval import to_results
from iuq.models.paste import mask_chunks, paste_masks, select
from iuq.visualize import draw_instances, save_png, side_by_side

OVERLAY_MAX_SIDE = 2048


@dataclass
class PredictReport:
    results: list[dict] = field(default_factory=list)  # COCO results, image_id = position in the input list
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (file, why) of images that could not be read
    skipped: list[Path] = field(default_factory=list)  # non-image files found in input folders


def image_files(inputs: list[Path]) -> tuple[list[Path], list[Path]]:
    """Files named directly are taken as images; folders give their image files (sorted, by the
    extensions Pillow can read) and the other files, which are skipped."""
    extensions = set(Image.registered_extensions())
    images, skipped = [], []
    for path in inputs:
        if path.is_dir():
            for f in sorted(p for p in path.iterdir() if p.is_file()):
                (images if f.suffix.lower() in extensions else skipped).append(f)
        elif path.exists():
            images.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    return images, skipped


def predict_files(
    trained: TrainedModel, inputs: list[Path], out: Path, threshold: float = 0.5, device: str = "cpu"
) -> PredictReport:
    """Predict every image of `inputs`; write OUT/<stem>.png overlays and OUT/results.json (always,
    also when some images cannot be read: those are reported, the others kept)."""
    paths, skipped = image_files(inputs)
    report = PredictReport(skipped=skipped)
    for path in skipped:
        print(f"warning: {path}: not an image file (by its extension); skipped", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for number, path in enumerate(paths, start=1):
        try:
            image = read_image(path)
        except DatasetError as err:
            report.failed.append((path, str(err)))
            print(f"{path}: skipped, cannot be read", flush=True)
            continue
        pred = predict(trained, collate([prepare_image(image, trained)]), device)[0]
        pred = select(pred, torch.argsort(pred["scores"], descending=True))
        categories = torch.as_tensor(trained.label_to_category)[pred["labels"].cpu()]
        scores = pred["scores"].cpu()
        for start, masks in mask_chunks(pred):
            end = start + len(masks)
            for r in to_results(number, masks.cpu(), scores[start:end], categories[start:end]):
                report.results.append({**r, "file_name": str(path)})
        kept = select(pred, pred["scores"] >= threshold)
        save_png(overlay(image, kept, trained, path, threshold), out / f"{path.stem}.png")
        print(f"{path}: {len(kept['scores'])} instances with score >= {threshold}", flush=True)
        del image  # before the next photo is read: two decoded 24 MP photos would double the peak
    (out / "results.json").write_text(json.dumps(report.results))
    return report


def overlay(image: torch.Tensor, kept: dict, trained: TrainedModel, path: Path, threshold: float) -> torch.Tensor:
    """The kept instances drawn over the image, at most OVERLAY_MAX_SIDE pixels on the long side."""
    h, w = image.shape[-2:]
    size = (h, w)
    if max(h, w) > OVERLAY_MAX_SIDE:
        size = resize_output_size(h, w, OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE)
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
    masks = paste_masks(kept, size).cpu()
    drawn = draw_instances(image, masks, kept["labels"].cpu(), trained.class_names, kept["scores"].cpu())
    title = f"{path.name}: {len(kept['scores'])} instances with score >= {threshold:g}"
    return side_by_side([(title, drawn)])
