"""Does L_inter move QueryInst's mask-head BatchNorm away from its running statistics?

Until 2026-12-02, L_inter decoded other images' RoIs with the mask head's BatchNorm in
running-statistics mode, while the base mask loss trains the head under batch statistics (it now
decodes them under the base loss's batch statistics, `iuq.models.queryinst`). A per-channel
shift of the conv outputs is invisible to the base loss (batch statistics remove it) but not to
L_inter or to inference (running statistics keep it). This script measures that drift and tests
whether it explains an arm's AP:

  drift:  for the last stage's mask head, the conv outputs (before BN) of the top-`k` detections
          of every val image, against the running statistics: per channel z = (mean - running_mean)
          / sqrt(running_var + eps) and the variance ratio var / running_var. Printed: mean |z|,
          max |z|, mean variance ratio, per conv layer.
  recal:  the same head's running statistics re-estimated (cumulative average, nothing else
          changes) on the top-`k` detections of `--recal-images` train images, then val AP again.
          If an arm's AP comes back toward the baseline's, its loss was a BatchNorm-statistics
          shortcut of the RoI reading, not the method.

    python docs/evidence/queryinst_demo_components/bn_drift.py RUN_DIR [RUN_DIR ...] [--recal]

RUN_DIR is a finished `iuq train` run of a QueryInst config (e.g. the components study's
`runs/<arm>/seed0`). Data paths come from the run's config.yaml.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from iuq.config import load_config
from iuq.data.coco import CocoInstances
from iuq.engine.data import test_loader
from iuq.engine.inference import evaluate, load_trained, predict


def capture_pre_bn(head) -> tuple[list[list[torch.Tensor]], list]:
    """Forward hooks that keep each conv's output [n, C, S, S] of the mask head, per call."""
    store: list[list[torch.Tensor]] = [[] for _ in head.convs]
    hooks = [
        conv.register_forward_hook(lambda m, i, out, j=j: store[j].append(out.detach()))
        for j, conv in enumerate(head.convs)
    ]
    return store, hooks


def drift(trained, dataset, top_k: int) -> list[dict]:
    head = trained.model.stages[-1].mask_head
    store, hooks = capture_pre_bn(head)
    trained.top_k = top_k
    for batch in test_loader(dataset, trained.short_side, trained.max_size, 8):
        predict(trained, batch)
    for h in hooks:
        h.remove()
    rows = []
    for j, norm in enumerate(head.norms):
        x = torch.cat(store[j]).transpose(0, 1).flatten(1)  # [C, n*S*S]
        z = (x.mean(1) - norm.running_mean) / (norm.running_var + norm.eps).sqrt()
        ratio = x.var(1) / (norm.running_var + norm.eps)
        rows.append(
            {
                "conv": j,
                "mean|z|": z.abs().mean().item(),
                "max|z|": z.abs().max().item(),
                "var ratio": ratio.mean().item(),
            }
        )
    return rows


def recalibrate(trained, dataset, top_k: int) -> None:
    """Running statistics of the last mask head's BN as the plain average over `dataset`'s top-k
    detections (momentum None); every other layer stays in eval mode."""
    head = trained.model.stages[-1].mask_head
    for norm in head.norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    trained.top_k = top_k
    for batch in test_loader(dataset, trained.short_side, trained.max_size, 8):
        predict(trained, batch)
    for norm in head.norms:
        norm.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument(
        "--recal", action="store_true", help="re-estimate the running stats on train images, re-evaluate"
    )
    parser.add_argument("--recal-images", type=int, default=64)
    args = parser.parse_args()
    for run in args.runs:
        cfg = load_config(run / "config.yaml")
        val = CocoInstances(cfg.data.val_ann, cfg.data.val_images)
        trained = load_trained(run)
        print(f"{run}")
        for row in drift(trained, val, args.top_k):
            print("  conv{conv}: mean|z| {mean|z|:.3f}  max|z| {max|z|:.3f}  var ratio {var ratio:.3f}".format(**row))
        if args.recal:
            trained.top_k = 100
            before = evaluate(trained, val)[0]["AP"]
            train = CocoInstances(cfg.data.train_ann, cfg.data.train_images)
            subset = torch.utils.data.Subset(train, range(min(args.recal_images, len(train))))
            recalibrate(trained, subset, args.top_k)
            trained.top_k = 100
            after = evaluate(trained, val)[0]["AP"]
            print(
                f"  val AP {before:.2f} as trained, {after:.2f} after recalibration"
                f" ({'nan' if math.isnan(after) else f'{after - before:+.2f}'})"
            )


if __name__ == "__main__":
    main()
