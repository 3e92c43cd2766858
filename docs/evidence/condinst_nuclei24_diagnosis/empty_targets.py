"""CondInst on nuclei24: how many of L_equi's targets are empty on the grid it was supervised on?

Draws training batches exactly as `iuq train configs/condinst_nuclei24.yaml` does (patches, G as
augmentation, then the g-views), assigns locations with CondInst's FCOS rule, and for every matched
query counts the targets with no cell left after majority-vote downsampling:
- g-view queries on the stride-8 grid (L_equi before the fidelity fix),
- g-view queries on the stride-4 grid (L_equi now, and the base loss's grid),
- original-view queries on the stride-4 grid (the base loss).
An empty target under the +1-smoothed linear dice pulls every pixel of the query's mask toward 0;
under the originals' squared dice it gives a constant loss and no gradient.

    python docs/evidence/condinst_nuclei24_diagnosis/empty_targets.py [BATCHES]
"""

import sys

import torch

from iuq.config import load_config
from iuq.core.sampling import downsample_masks
from iuq.engine.data import open_split, train_loader
from iuq.engine.step import draw_g, transformed_views
from iuq.models.build import build_model


@torch.no_grad()
def main(batches: int = 40) -> None:
    cfg = load_config("configs/condinst_nuclei24.yaml", ["data.num_workers=0"])
    cfg.model.num_labels = 1
    model = build_model(cfg.model, load_weights=False).eval()  # the assignment does not use weights
    ds = open_split(cfg.data.train_ann, cfg.data.train_images, False, False)
    loader = train_loader(ds, cfg.data, seed=0, rank=0, world_size=1, steps_done=lambda: 0)
    generator = torch.Generator().manual_seed(0)
    counts = {"g_stride8": [0, 0], "g_stride4": [0, 0], "orig_stride4": [0, 0]}  # [empty, all]
    areas = []
    for n, batch in enumerate(loader):
        if n == batches:
            break
        images, mask, targets = transformed_views(
            batch["images"], batch["pixel_mask"], batch["targets"],
            draw_g(cfg.iuq, batch["pixel_mask"], model.stride, generator),
        )  # fmt: skip
        g = draw_g(cfg.iuq, mask, model.stride, generator)
        g_images, g_mask, g_targets = transformed_views(images, mask, targets, g)
        all_targets = targets + g_targets
        out = model(torch.cat([images, g_images]), torch.cat([mask, g_mask]), all_targets, views=2)
        _, masks, _ = model.matched(out, all_targets)
        b = images.shape[0]
        h8, w8 = out.pixel_embeddings.shape[-2:]
        for i, m in enumerate(masks):
            if m.shape[0] == 0:
                continue
            grids = [("g_stride8", (h8, w8)), ("g_stride4", (2 * h8, 2 * w8))] if i >= b else []
            grids += [("orig_stride4", (2 * h8, 2 * w8))] if i < b else []
            for name, size in grids:
                empty = ~downsample_masks(m, size).flatten(1).any(1)
                counts[name][0] += int(empty.sum())
                counts[name][1] += m.shape[0]
            if i >= b:
                areas.extend(m.flatten(1).sum(1).tolist())
    print(f"{batches} batches of {cfg.data.batch_size} patches (seed 0); matched queries with an empty target:")
    for name, (empty, total) in counts.items():
        print(f"  {name:13s} {empty:6d} / {total:6d} = {100 * empty / max(total, 1):5.1f}%")
    small = sum(a < 64 for a in areas)
    print(f"  g-view queries whose instance covers < 64 input pixels: {small} / {len(areas)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
