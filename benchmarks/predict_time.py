"""Inference time of a model trained with IUQ vs one trained without (the paper: no change).

Both are `model/` directories of runs (`save_pretrained` output). They are timed on the same
images, alternating image by image so machine noise hits both alike; the architecture is the same,
so the ratio should be 1 within noise.

    python benchmarks/predict_time.py runs/demo/model runs/demo_baseline/model --images data/demo/val
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from iuq.data.coco import read_image
from iuq.data.transforms import collate
from iuq.engine.inference import load_trained, predict, prepare_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("iuq_model", type=Path)
    p.add_argument("baseline_model", type=Path)
    p.add_argument("--images", type=Path, required=True, help="folder of images")
    p.add_argument("--num", type=int, default=40)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    models = {"iuq": load_trained(args.iuq_model), "baseline": load_trained(args.baseline_model)}
    a, b = (sum(p.numel() for p in m.model.parameters()) for m in models.values())
    assert a == b, f"parameter counts differ: {a} vs {b}"
    paths = sorted(args.images.glob("*.png"))[: args.num]
    times = {name: [] for name in models}
    for i, path in enumerate([paths[0], *paths]):  # the first image warms both up
        image = read_image(path)
        for name, trained in models.items():
            batch = collate([prepare_image(image, trained)])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            predict(trained, batch, args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"{name:8s} median predict {t * 1000:.1f} ms over {len(times[name])} images ({a} parameters)")
    print(f"iuq/baseline predict time: {med['iuq'] / med['baseline']:.3f}")


if __name__ == "__main__":
    main()
