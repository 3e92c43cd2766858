"""The `iuq` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_DATA = Path("data/synthetic")


def _synth(args) -> None:
    from iuq.data.synthetic import SynthConfig, generate

    paths = generate(args.out, SynthConfig(images=args.images, seed=args.seed, size=args.size))
    for split, path in paths.items():
        print(f"{split}: {path}  (images in {Path(args.out) / split})")


def _stats(args) -> None:
    from iuq.data.stats import dataset_stats, format_stats

    print(format_stats(dataset_stats(args.ann_file)))


def _preview(args) -> None:
    from iuq.data.coco import CocoInstances
    from iuq.visualize import draw_instances, save_png

    ds = CocoInstances(args.data, args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(min(args.num, len(ds))):
        image, target = ds[i]
        path = out / f"gt_{target['image_id']}.png"
        save_png(draw_instances(image, target["masks"], target["labels"], ds.class_names), path)
        print(f"wrote {path}  ({target['masks'].shape[0]} instances)")


def _as_results(args) -> None:
    """Ground truth written as COCO results (score 1): checks an evaluation pipeline end to end."""
    import torch

    from iuq.data.coco import CocoInstances
    from iuq.evaluation.coco_eval import to_results

    ds = CocoInstances(args.ann_file, args.images)
    results = []
    for image_id in ds.image_ids:
        t = ds.load_target(image_id)
        cats = [ds.category_ids[int(c)] for c in t["labels"]]
        results.extend(to_results(image_id, t["masks"], torch.ones(len(cats)), cats))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f)
    print(f"wrote {len(results)} results to {args.out}")


def _eval(args) -> None:
    from iuq.evaluation.coco_eval import evaluate_results, format_table, write_metrics

    if args.pred is None or args.gt is None:
        raise SystemExit("iuq eval: give --gt ANN.json and --pred RESULTS.json")
    with open(args.pred) as f:
        results = json.load(f)
    if not isinstance(results, list):
        raise SystemExit(f"{args.pred}: expected a JSON list of COCO results")
    metrics = evaluate_results(args.gt, results, backend=args.backend)
    print(format_table(metrics))
    if args.out:
        write_metrics(metrics, args.out)
        print(f"metrics written to {args.out}")


def _demo(args) -> None:
    """Main job until training lands: build the embedded dataset, print its statistics, preview it."""
    from iuq.data.stats import dataset_stats, format_stats

    root = Path(args.data)
    ann = root / "annotations" / "instances_train.json"
    if not ann.exists():
        _synth(argparse.Namespace(out=root, images=args.images, seed=0, size=256))
    print(format_stats(dataset_stats(ann)))
    _preview(argparse.Namespace(data=ann, images=root / "train", out=root / "preview", num=4))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iuq", description="Instance-Unique Querying for instance segmenters.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets: synthesise, inspect, preview").add_subparsers(
        dest="data_command", required=True
    )
    s = data.add_parser("synth", help="write the embedded synthetic dataset (COCO JSON + PNG)")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--images", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=256, help="image side in px")
    s.set_defaults(func=_synth)

    s = data.add_parser("stats", help="print counts and ranges of a COCO instances JSON")
    s.add_argument("ann_file", type=Path)
    s.set_defaults(func=_stats)

    s = data.add_parser("preview", help="draw ground-truth instances of a dataset to PNG")
    s.add_argument("--data", required=True, type=Path, help="instances JSON")
    s.add_argument("--images", required=True, type=Path, help="image folder")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--num", type=int, default=4)
    s.set_defaults(func=_preview)

    s = data.add_parser("as-results", help="write ground truth as COCO results (score 1), for checks")
    s.add_argument("ann_file", type=Path)
    s.add_argument("--images", required=True, type=Path, help="image folder")
    s.add_argument("--out", required=True, type=Path)
    s.set_defaults(func=_as_results)

    s = sub.add_parser("eval", help="COCO mask AP of a results JSON")
    s.add_argument("--gt", type=Path, help="ground-truth instances JSON")
    s.add_argument("--pred", type=Path, help="COCO results JSON (segmentation RLE, score)")
    s.add_argument("--out", type=Path, help="write AP, AP50, AP75, APs, APm, APl here")
    s.add_argument("--backend", choices=("faster", "pycocotools"), default="faster")
    s.set_defaults(func=_eval)

    s = sub.add_parser("demo", help="the main job on the embedded synthetic data")
    s.add_argument("--data", type=Path, default=DEFAULT_DATA)
    s.add_argument("--images", type=int, default=200)
    s.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from iuq.data.coco import DatasetError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DatasetError, FileNotFoundError) as err:
        print(f"iuq: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
