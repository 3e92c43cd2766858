"""Step time of a base model + IUQ vs the baseline at equal views per batch (Table 3's overhead).

Both arms train the same model (a tiny Mask2Former, or the model of --config: CondInst, SOLOv2, ...)
on the embedded synthetic data with two views per image:
the baseline is the "augmentation" arm (g-views as extra samples, no IUQ term), IUQ adds L_inter
(with a 100k memory) and L_equi. Arms alternate step by step so machine noise hits both alike.

    python benchmarks/train_step.py --images 4 --steps 20
    python benchmarks/train_step.py --config configs/demo.yaml   # the demo's model, batch, size, memory
    python benchmarks/train_step.py --config configs/condinst_demo.yaml
    python benchmarks/train_step.py --config configs/queryinst_demo.yaml   # RoI memory: RoIs x C*14*14

Last line: `iuq/baseline step time: R` (the paper reports ~1.05 on 8 A100s).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from iuq.config import load_config
from iuq.core.config import IUQConfig
from iuq.data.coco import CocoInstances
from iuq.data.synthetic import SynthConfig, generate
from iuq.data.transforms import collate
from iuq.engine.step import build_criterion, training_step
from iuq.models.build import build_model
from iuq.models.config import ModelConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4, help="images per batch (x2 views)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--memory", type=int, default=100_000)
    p.add_argument("--config", help="take model, batch size, image size and IUQ settings from a run config")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    # The small random-init ResNet of the figures in docs/benchmarks.md (--config picks any other model).
    model_cfg = ModelConfig(backbone="resnet", num_labels=4)
    iuq_cfg = IUQConfig(memory_capacity=args.memory)
    synth = {}
    if args.config:
        run = load_config(args.config)
        model_cfg, iuq_cfg = run.model, run.iuq
        model_cfg.num_labels = 4
        args.images, args.size, args.memory = run.data.batch_size, run.data.test_short_side, iuq_cfg.memory_capacity
        if run.data.synthetic is not None:  # the config's own scenes (objects per image, sizes, colours)
            synth = {k: v for k, v in vars(run.data.synthetic).items() if k not in ("dir", "images", "size", "seed")}
    device = torch.device(args.device)
    root = Path(tempfile.mkdtemp())
    generate(root, SynthConfig(images=args.images * 4, size=args.size, seed=0, **synth))
    ds = CocoInstances(root / "annotations" / "instances_train.json", root / "train")
    arms, memory = {}, None
    for name, cfg in {
        "baseline": IUQConfig(inter=False, equi=True, equi_variant="augmentation"),
        "iuq": iuq_cfg,
    }.items():
        torch.manual_seed(0)
        model = build_model(model_cfg).to(device)
        crit = build_criterion(cfg, model).to(device)
        if crit.memory is not None:  # a full memory, as in steady-state training
            crit.memory.embeddings.normal_()
            crit.memory.count.fill_(crit.memory.capacity)
            memory = crit.memory
        arms[name] = (model, crit, torch.optim.AdamW(model.parameters(), lr=1e-4), [])
    batches = len(ds) // args.images
    for step in range(args.steps + 2):
        idx = list(range((step % batches) * args.images, (step % batches + 1) * args.images))
        batch = collate([ds[i] for i in idx])
        images, mask = batch["images"].to(device), batch["pixel_mask"].to(device)
        targets = [{**t, "masks": t["masks"].to(device), "labels": t["labels"].to(device)} for t in batch["targets"]]
        ids = torch.tensor([t["image_id"] for t in targets], device=device)
        for model, crit, opt, times in arms.values():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = training_step(model, crit, images, mask, targets, ids, torch.Generator().manual_seed(step))
            opt.zero_grad()
            res.loss.backward()
            opt.step()
            crit.update_memory(res.samples)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:  # warm-up
                times.append(time.perf_counter() - t0)
    med = {name: statistics.median(arm[3]) for name, arm in arms.items()}
    for name, t in med.items():
        print(f"{name:8s} median step {t * 1000:.1f} ms over {args.steps} steps")
    entries = f"{memory.capacity} x {memory.dim}" if memory is not None else "none"
    size = memory.embeddings.nbytes / 2**20 if memory is not None else 0.0
    print(f"batch {args.images} x 2 views, {args.size} px, memory {entries} ({size:.1f} MiB), device {device}")
    print(f"iuq/baseline step time: {med['iuq'] / med['baseline']:.3f}")


if __name__ == "__main__":
    main()
