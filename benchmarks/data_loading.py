"""Training-item time of the data pipeline: the shipped resize vs one that always resamples.

Where images train at their own size (the demo's 128 px scenes; not nuclei24, whose 250 px tiles
train at 256), `iuq.data.transforms.resize` returns the image and masks as they are instead of resampling them
to the size they already have. This times the training items of a config (read, resize, flip,
crop, exactly as `AugmentedDataset` makes them) with the shipped `resize` and with a reference
that always resamples, alternating item by item so machine noise hits both alike, and checks
that both give the same tensors bit for bit.

    python benchmarks/data_loading.py --config configs/condinst_nuclei24.yaml --items 200
    python benchmarks/data_loading.py --config configs/demo.yaml

Last line: `shipped/resampling item time: R` (below 1 where the shortcut applies).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import iuq.data.transforms as transforms
from iuq.config import load_config
from iuq.engine.data import AugmentedDataset, train_transform
from iuq.engine.train import open_data, prepare_data


def resampling_resize(image: torch.Tensor, target: dict, size: tuple[int, int]):
    """The reference: antialiased bilinear image, nearest masks, whatever the size."""
    image = TF.resize(image, list(size), antialias=True)  # [3, h, w]
    masks = F.interpolate(target["masks"][None].float(), size=size, mode="nearest")[0] > 0.5  # [K, h, w]
    return image, transforms._keep_nonempty({**target, "masks": masks})


def timed_item(dataset: AugmentedDataset, item, resize_fn):
    shipped = transforms.resize
    transforms.resize = resize_fn  # RandomResize looks the function up in its module
    try:
        start = time.perf_counter()
        out = dataset[item]
        return time.perf_counter() - start, out
    finally:
        transforms.resize = shipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/condinst_nuclei24.yaml")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a loader worker has one)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    prepare_data(cfg)
    train, _ = open_data(cfg)
    dataset = AugmentedDataset(train, train_transform(cfg.data), cfg.train.seed)
    items = [(i % len(train), i // len(train)) for i in range(args.items)]
    times: dict[str, list[float]] = {"shipped": [], "resampling": []}
    timed_item(dataset, items[0], transforms.resize)  # warm-up: file cache, kernels
    for k, item in enumerate(items):
        arms = [("shipped", transforms.resize), ("resampling", resampling_resize)]
        outs = {}
        for name, fn in arms if k % 2 == 0 else arms[::-1]:
            seconds, outs[name] = timed_item(dataset, item, fn)
            times[name].append(seconds)
        (a, ta), (b, tb) = outs["shipped"], outs["resampling"]
        assert torch.equal(a, b) and all(torch.equal(ta[key], tb[key]) for key in ("masks", "labels", "boxes")), (
            f"item {item}: the shipped resize and the resampling reference differ"
        )
    for name, ts in times.items():
        print(f"{name:>10}: median {statistics.median(ts) * 1e3:.2f} ms/item, mean {statistics.mean(ts) * 1e3:.2f}")
    ratio = statistics.median(times["shipped"]) / statistics.median(times["resampling"])
    print(f"{args.items} items of {args.config}, outputs identical")
    print(f"shipped/resampling item time: {ratio:.3f}")


if __name__ == "__main__":
    main()
