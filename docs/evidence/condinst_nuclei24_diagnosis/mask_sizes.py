"""CondInst on nuclei24: are a model's masks too small or too large for the nuclei they find?

For every val tile, each ground-truth nucleus is paired with the detection (among the model's top
100) whose mask overlaps it most; over the pairs with IoU > 0.1: the mean IoU, the predicted mask's
area over the nucleus's area, and the mean probability inside the nucleus and in a 3 px ring around
it (where a mask that spills over its nucleus is positive). Masks are as inference makes them
(stride 4, pasted at the tile's size, threshold 0.5).

    python docs/evidence/condinst_nuclei24_diagnosis/mask_sizes.py CHECKPOINT [CHECKPOINT ...]
"""

import sys

import torch
import torch.nn.functional as F

from iuq.data.coco import CocoInstances
from iuq.engine.data import test_loader
from iuq.engine.inference import load_trained
from iuq.models.interface import batch_instances
from iuq.models.paste import paste_masks

VAL = "../shared/datasets/nuclei24"


@torch.no_grad()
def measure(path: str) -> dict:
    trained = load_trained(path)
    ds = CocoInstances(f"{VAL}/annotations/instances_val.json", f"{VAL}/val")
    iou, ratio, inside, ring, found, total = [], [], [], [], 0, 0
    for batch in test_loader(ds, trained.short_side, trained.max_size, 8):
        preds = batch_instances(trained.model.eval(), batch, 100)
        for pred, target in zip(preds, batch["targets"], strict=True):
            size = tuple(int(v) for v in target["orig_size"])
            masks = paste_masks(pred, size)  # [N, H, W] bool
            gt = target["masks"]
            if gt.shape[-2:] != size:
                gt = F.interpolate(gt[None].float(), size=size, mode="nearest")[0] > 0.5
            total += gt.shape[0]
            if masks.shape[0] == 0:
                continue
            m, g = masks.flatten(1).float(), gt.flatten(1).float()  # [N, P], [K, P]
            inter = g @ m.t()  # [K, N]
            union = g.sum(1)[:, None] + m.sum(1)[None] - inter
            best_iou, best = (inter / union.clamp(min=1)).max(1)  # [K]
            keep = best_iou > 0.1
            found += int(keep.sum())
            iou += best_iou[keep].tolist()
            ratio += (m.sum(1)[best[keep]] / g.sum(1)[keep]).tolist()
            dil = F.max_pool2d(gt[:, None].float(), 7, stride=1, padding=3)[:, 0] > 0  # 3 px ring
            for k in keep.nonzero()[:, 0].tolist():
                mk = masks[best[k]]
                inside.append(float(mk[gt[k]].float().mean()))
                band = dil[k] & ~gt[k]
                ring.append(float(mk[band].float().mean()) if band.any() else 0.0)

    def mean(x):
        return sum(x) / max(len(x), 1)

    ratio_sorted = sorted(ratio)
    return {
        "nuclei": total,
        "found (IoU > 0.1)": found,
        "mean IoU": mean(iou),
        "area ratio mean": mean(ratio),
        "area ratio median": ratio_sorted[len(ratio_sorted) // 2] if ratio_sorted else 0.0,
        "covered inside": mean(inside),
        "covered ring": mean(ring),
    }


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(path, {k: round(v, 3) if isinstance(v, float) else v for k, v in measure(path).items()})
