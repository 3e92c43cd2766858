"""Why SOLOv2's `inter` arm ends at AP 0 on nuclei24: the signs of the kernels it predicts.

SOLOv2's unified mask features end in a ReLU, so they are >= 0 everywhere. A kernel whose entries
are all negative gives a negative logit on every pixel of every image, which drives L_inter (focal
toward 0 on other images' pixels) to 0 at once, and no mask is left for the dice loss to shape.
For each run directory this prints, over the 50 cells with the highest class score on the first 4
val tiles: the median over cells of the highest mask probability, the share of cells with any
pixel above 0.5, and the share of kernel entries below 0.

    python docs/evidence/solov2_nuclei24_components/kernel_signs.py \
        docs/evidence/solov2_nuclei24_components/runs/{baseline,inter,equi,both}/seed0
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from iuq.engine.inference import load_trained

torch.set_num_threads(1)
tiles = sorted(Path("../shared/datasets/nuclei24/val").glob("*.jpg"))[:4]
images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in tiles])
images = images.float() / 255  # [4, 3, 256, 256]
for run in sys.argv[1:]:
    model = load_trained(run).model
    with torch.no_grad():
        heads = model._heads(images, None)
        peak, negative, feat_min = [], [], []
        for i in range(len(tiles)):
            cells = heads["cate"][i].max(1).values.topk(50).indices
            kernels = heads["kernels"][i, cells]  # [50, E]
            logits = model.decode(heads["mask_feats"][i], kernels)  # [50, h, w]
            peak.append(logits.flatten(1).max(1).values.sigmoid())
            negative.append((kernels < 0).float().mean())
            feat_min.append(heads["mask_feats"][i].min())
    peak = torch.cat(peak)
    print(
        f"{run}: mask features min {min(feat_min):.3f}; top-50 cells: median peak mask prob "
        f"{peak.median():.3f}, cells with a pixel > 0.5 {(peak > 0.5).float().mean():.2f}, "
        f"kernel entries < 0 {torch.stack(negative).mean():.2f}"
    )
