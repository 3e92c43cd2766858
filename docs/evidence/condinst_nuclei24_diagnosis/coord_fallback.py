"""CondInst: do the dynamic head's masks come from the mask features or from the relative
coordinates alone? For the best detections of every val tile: rectangularity of the mask
(area / area of its bounding box: 1 for a box, ~0.785 for an ellipse), and the IoU between the
mask decoded normally and decoded with the mask features zeroed (coordinates only).

    python coord_fallback.py CHECKPOINT [CHECKPOINT ...]
"""

import sys

import torch

from iuq.data.coco import CocoInstances
from iuq.engine.data import test_loader
from iuq.engine.inference import load_trained
from iuq.models.paste import masks_to_image

VAL = "../shared/datasets/nuclei24"


@torch.no_grad()
def measure(path: str, top: int = 30) -> dict:
    trained = load_trained(path)
    model = trained.model
    ds = CocoInstances(f"{VAL}/annotations/instances_val.json", f"{VAL}/val")
    rect, iou, fg_real, fg_zero = [], [], [], []
    for batch in test_loader(ds, trained.short_side, trained.max_size, 8):
        heads = model._heads(batch["images"], batch["pixel_mask"])
        for i in range(batch["images"].shape[0]):
            probs = heads["cls"][i].sigmoid().max(1).values * heads["ctr"][i].sigmoid()
            loc = probs.topk(top).indices
            qxy = model.query_xy(heads["xy"][loc], heads["level"][loc], heads["canvas"])
            feats = heads["mask_feats"][i]
            size = batch["targets"][i]["size"]
            # Logits at stride 8, upsampled to the input as inference does; masks at input pixels.
            real = masks_to_image(model.decode(feats, heads["params"][i][loc], qxy), 8, size, size) > 0
            zero = (
                masks_to_image(model.decode(torch.zeros_like(feats), heads["params"][i][loc], qxy), 8, size, size) > 0
            )
            for a, b in zip(real, zero, strict=True):
                if a.any():
                    ys, xs = a.nonzero(as_tuple=True)
                    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
                    rect.append(float(a.sum() / box))
                union = (a | b).sum()
                iou.append(float((a & b).sum() / union) if union else 1.0)
                fg_real.append(float(a.float().mean()))
                fg_zero.append(float(b.float().mean()))

    def mean(x):
        return sum(x) / max(len(x), 1)

    return {
        "masks": len(iou),
        "rectangularity": mean(rect),
        "iou_real_vs_zeroed_features": mean(iou),
        "fg_fraction_real": mean(fg_real),
        "fg_fraction_zeroed": mean(fg_zero),
    }


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(p, {k: round(v, 4) if isinstance(v, float) else v for k, v in measure(p).items()})
