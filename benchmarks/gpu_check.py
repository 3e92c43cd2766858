"""The GPU readiness check: CUDA numerics and smoke runs of every model type, IUQ step overhead, L_inter
vs its roofline.

    python benchmarks/gpu_check.py --out gpu_check_out                 # on a GPU: the paper's sizes
    python benchmarks/gpu_check.py --device cpu --out /tmp/gc          # the same logic, tiny sizes

Each part runs in its own process under its own time cap (a failing part does not stop the next)
and writes OUT/<part>.json row by row; the driver writes OUT/summary.md, also printed:
- numerics: one IUQ training step of every model type's demo config (random init, a full memory)
  on the same batch, weights and random draws: CUDA fp32 (TF32 off) against the CPU in fp32 (every
  loss term and the gradient of all parameters), and bf16 autocast against CUDA fp32.
- smoke: `iuq train` of every model type with and without IUQ for one epoch of 2 steps (16 images,
  batch 8: the second step meets a non-empty memory) under bf16-mixed (CUDA) or fp32 (CPU) from
  random init, Lightning's validation at the epoch's end, the final evaluation and export, then
  `iuq eval RUN_DIR`'s path on the exported model, which must reproduce the run's AP.
- overhead: IUQ/baseline step time at equal views (benchmarks/train_step.py's protocol: same model and
  batch, arms alternating step by step, the baseline trains the g-views as extra samples), with a
  full memory of each size, and the peak GPU memory of each arm: Mask2Former and CondInst with a
  ResNet-50-sized backbone at 800 px, batch 8 x 2 views, bf16 autocast.
- kernel: L_inter's forward with its query gradient (the chunked pass) at M = 100k and 1M memory
  pixels, Q = 200 queries, D = 256, bf16, against its roofline max(4 Q M D / peak bf16 FLOP/s,
  one read of the memory / bandwidth); peaks default to one H200 (989 TFLOP/s dense bf16, 4.8 TB/s).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = {"mask2former": "demo", "condinst": "condinst_demo", "solov2": "solov2_demo", "sotr": "sotr_demo",
                "queryinst": "queryinst_demo"}  # fmt: skip
PARTS = ("numerics", "smoke", "overhead", "kernel")


def sizes(args) -> dict:
    """The paper's sizes on a GPU; tiny ones on the CPU, to check the logic in a test."""
    if args.device == "cuda":
        return {"size": 800, "images": 8, "memories": [100_000, 1_000_000], "steps": 5, "warmup": 2,
                "kernel_memories": [100_000, 1_000_000], "queries": 200, "dim": 256, "repeats": 10}  # fmt: skip
    return {"size": 64, "images": 2, "memories": [500, 2_000], "steps": 1, "warmup": 1,
            "kernel_memories": [20_000, 50_000], "queries": 20, "dim": 32, "repeats": 2}  # fmt: skip


# -- numerics -------------------------------------------------------------------------------------
@contextlib.contextmanager
def host_random():
    """Draw every `torch.rand` / `randn` / `randperm` on the CPU and move it to the asked device.

    The CUDA and CPU generators give different streams for the same seed, so without this the
    point sampling of Mask2Former's loss, CondInst's proposal cap and IUQ's pixel sampling would
    differ between the two runs of one seeded step, and the check would compare two samples instead
    of two devices. A generator on the device is mirrored by a CPU one of the same seed.
    """
    originals = {name: getattr(torch, name) for name in ("rand", "randn", "randperm")}
    mirrors: dict[int, tuple[torch.Generator, torch.Generator]] = {}  # keeps the device generator alive

    def on_host(fn):
        def draw(*size, device=None, generator=None, **kw):
            if generator is not None and generator.device.type != "cpu":
                if id(generator) not in mirrors:
                    mirrors[id(generator)] = (generator, torch.Generator().manual_seed(generator.initial_seed()))
                generator = mirrors[id(generator)][1]
            return fn(*size, generator=generator, **kw).to(device if device is not None else "cpu")

        return draw

    for name, fn in originals.items():
        setattr(torch, name, on_host(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def one_step(model, crit, batch: dict, device: str, autocast: bool) -> tuple[dict[str, float], dict]:
    """Every loss term of one IUQ training step, and the gradients of all trainable parameters: of
    the total loss ("loss") and of each term alone, each {parameter name: flat float64 gradient}."""
    from iuq.engine.step import training_step

    dev = torch.device(device)
    images, mask = batch["images"].to(dev), batch["pixel_mask"].to(dev)
    targets = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in t.items()} for t in batch["targets"]]
    ids = torch.tensor([t["image_id"] for t in targets], device=dev)
    torch.manual_seed(0)
    with host_random(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        res = training_step(model, crit, images, mask, targets, ids, torch.Generator().manual_seed(1))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = {}
    for key, value in {"loss": res.loss, **res.terms}.items():
        if not value.requires_grad:
            continue
        parts = torch.autograd.grad(value, [p for _, p in named], retain_graph=True, allow_unused=True)
        grads[key] = {n: (g if g is not None else torch.zeros_like(p)).flatten().double().cpu()
                      for (n, p), g in zip(named, parts, strict=True)}  # fmt: skip
    terms = {k: float(v.detach().float()) for k, v in res.terms.items()}
    return {"loss": float(res.loss.detach().float()), **terms}, grads


def moved(model, crit, device: str):
    """A copy of the pair on `device`; one deepcopy, so the criterion's decoder stays the model's module."""
    model, crit = copy.deepcopy((model, crit))
    return model.to(device), crit.to(device)


def flat(grads: dict[str, torch.Tensor], module: str | None = None) -> torch.Tensor:
    return torch.cat([g for n, g in grads.items() if module is None or module_of(n) == module])


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def module_of(name: str) -> str:
    """The parameter's module two levels down (backbone.stem, head.cls_tower, ...)."""
    return ".".join(name.split(".")[:2])


def numerics(args) -> list[dict]:
    """CUDA correctness and AMP: one IUQ step of each model's demo config (random init unless
    `--backbone-weights config`; a full memory; the same batch, weights and random draws) on CUDA
    in fp32 (TF32 off) against the CPU in fp32, and under bf16 autocast against CUDA fp32. On a
    CPU-only machine both sides run on the CPU (the logic only; the differences are then zero)."""
    from iuq.config import load_config
    from iuq.data.coco import CocoInstances
    from iuq.data.synthetic import SynthConfig, generate
    from iuq.data.transforms import collate
    from iuq.engine.step import build_criterion
    from iuq.models.build import build_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    size, count = (128, 4) if args.device == "cuda" else (64, 2)
    root = scratch("gc_numerics_")
    generate(root, SynthConfig(images=count + 2, size=size, seed=0, val_fraction=2 / (count + 2)))
    ds = CocoInstances(root / "annotations" / "instances_train.json", root / "train")
    batch = collate([ds[i] for i in range(count)])
    rows = []
    for kind in args.models:
        row = {"model": kind, "ok": False}
        try:
            weights = [] if args.backbone_weights == "config" else [f"model.backbone_weights={args.backbone_weights}"]
            cfg = load_config(ROOT / "configs" / f"{DEMO_CONFIGS[kind]}.yaml", weights)
            torch.manual_seed(0)
            model = build_model(cfg.model, load_weights=args.backbone_weights != "none")
            crit = build_criterion(cfg.iuq, model)
            if crit.memory is not None:  # a full memory, so L_inter meets other images' pixels
                g = torch.Generator().manual_seed(2)
                crit.memory.embeddings.copy_(torch.randn(crit.memory.embeddings.shape, generator=g))
                crit.memory.xy.copy_(torch.rand(crit.memory.xy.shape, generator=g))
                crit.memory.image_ids.fill_(10**9)
                crit.memory.count.fill_(crit.memory.capacity)
            device = args.device
            ref_terms, ref_grads = one_step(*moved(model, crit, "cpu"), batch, "cpu", False)
            f32_terms, f32_grads = one_step(*moved(model, crit, device), batch, device, False)
            bf_terms, bf_grads = one_step(*moved(model, crit, device), batch, device, device == "cuda")

            def rel(a: float, b: float) -> float:
                return abs(a - b) / max(abs(b), 1e-6)

            ref_g, f32_g, bf_g = flat(ref_grads["loss"]), flat(f32_grads["loss"]), flat(bf_grads["loss"])
            modules = sorted({module_of(n) for n in f32_grads["loss"]})
            by_module = {m: (cos(flat(bf_grads["loss"], m), flat(f32_grads["loss"], m)),
                             float(flat(f32_grads["loss"], m).norm() / f32_g.norm().clamp(min=1e-30)))
                         for m in modules}  # fmt: skip
            row.update(
                terms={k: round(v, 5) for k, v in ref_terms.items()},
                fp32_term_rel=max(rel(f32_terms[k], v) for k, v in ref_terms.items()),
                fp32_grad_rel=float((f32_g - ref_g).norm() / ref_g.norm().clamp(min=1e-30)),
                bf16_term_rel=max(rel(bf_terms[k], f32_terms[k]) for k in f32_terms),
                bf16_grad_cos=cos(bf_g, f32_g),
                # where bf16 departs: the gradient of each term that carries one (the base model's
                # terms are logged detached), and the total's by module as (cosine, share of the norm)
                bf16_grad_cos_by_term={k: round(cos(flat(bf_grads[k]), flat(f32_grads[k])), 4) for k in f32_grads},
                bf16_grad_cos_by_module={
                    m: [round(c, 4), round(share, 4)]
                    for m, (c, share) in sorted(by_module.items(), key=lambda kv: kv[1][0])[:4]
                },  # fmt: skip
                finite=all(map(math.isfinite, [*f32_terms.values(), *bf_terms.values()]))
                and bool(torch.isfinite(f32_g).all() and torch.isfinite(bf_g).all()),
            )
            row["bf16_worst_term"] = max(ref_terms, key=lambda k: rel(bf_terms[k], f32_terms[k]))
            # CUDA fp32 must match the CPU to rounding; bf16 autocast to its precision (8 bits of mantissa).
            row["ok"] = (row["finite"] and row["fp32_term_rel"] < 1e-3 and row["fp32_grad_rel"] < 1e-2
                         and row["bf16_term_rel"] < 5e-2 and row["bf16_grad_cos"] > 0.98)  # fmt: skip
            for k in ("fp32_term_rel", "fp32_grad_rel", "bf16_term_rel", "bf16_grad_cos"):
                row[k] = float(f"{row[k]:.3g}")
        except Exception as err:  # every model is checked, whatever fails before it
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        record(args, "numerics", rows, row)
    return rows


# -- smoke ----------------------------------------------------------------------------------------
def smoke(args) -> list[dict]:
    from iuq.config import load_config
    from iuq.engine.inference import evaluate, load_trained
    from iuq.engine.train import open_data, train

    rows = []
    work = scratch("gc_smoke_")
    gpu = args.device == "cuda"
    for kind in args.models:
        for arm in ("iuq", "baseline"):
            name = DEMO_CONFIGS[kind] + ("_baseline" if arm == "baseline" else "")
            sets = [
                f"out={work / name}", f"data.train_ann={work}/data/annotations/instances_train.json",
                f"data.train_images={work}/data/train", f"data.val_ann={work}/data/annotations/instances_val.json",
                f"data.val_images={work}/data/val", f"data.synthetic.dir={work}/data", "data.synthetic.images=20",
                "data.batch_size=8", "data.num_workers=0", "model.backbone_weights=none", "train.max_steps=2",
                "train.max_epochs=null", "train.eval_every_epochs=1", "train.log_every_steps=1",
                f"train.precision={'bf16-mixed' if gpu else '32-true'}", f"train.accelerator={'gpu' if gpu else 'cpu'}",
                "train.devices=1", "train.strategy=auto", "eval.num_vis=1",
            ]  # fmt: skip
            row = {"model": kind, "arm": arm, "ok": False}
            t0 = time.perf_counter()
            try:
                cfg = load_config(ROOT / "configs" / f"{name}.yaml", sets)
                metrics = train(cfg)
                trained = load_trained(work / name / "model")
                _, val = open_data(cfg)
                again, _ = evaluate(trained, val, device=args.device, max_dets=cfg.eval.max_dets)
                row.update(AP=round(metrics["AP"], 3), eval_AP=round(again["AP"], 3))
                log = (work / name / "logs" / "metrics.csv").read_text()
                validated = "val/AP" in log.splitlines()[0]  # Lightning's validation at the epoch's end
                row["ok"] = (
                    validated
                    and abs(metrics["AP"] - again["AP"]) < 1e-6
                    and all((work / name / f).exists() for f in ("model", "checkpoints/last.ckpt", "metrics.json"))
                )
            except Exception as err:  # a part reports every failure instead of stopping at the first
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            row["seconds"] = round(time.perf_counter() - t0, 1)
            record(args, "smoke", rows, row)
    return rows


# -- overhead -------------------------------------------------------------------------------------
def overhead_model(kind: str, device: str):
    from iuq.models.config import ModelConfig

    if device != "cuda":  # small random-init ResNets, the logic only
        if kind == "mask2former":
            return ModelConfig(backbone="resnet", backbone_widths=[8, 16, 16, 16], num_queries=10, hidden_dim=32,
                               mask_feature_size=32, encoder_layers=1, decoder_layers=2, heads=2, ffn_dim=32,
                               train_num_points=64, num_labels=4)  # fmt: skip
        return ModelConfig(type="condinst", backbone="resnet", backbone_widths=[8, 16, 16, 16],
                           backbone_weights="none", num_labels=4)  # fmt: skip
    if kind == "mask2former":  # configs/coco_r50_12ep.yaml's head on a ResNet-50-shaped HF backbone
        return ModelConfig(backbone="resnet", resnet_layer_type="bottleneck", backbone_widths=[256, 512, 1024, 2048],
                           backbone_depths=[3, 4, 6, 3], freeze_bn=True, num_queries=100, hidden_dim=256,
                           mask_feature_size=256, encoder_layers=6, decoder_layers=9, heads=8, ffn_dim=1024,
                           train_num_points=12544, num_labels=4)  # fmt: skip
    # configs/condinst_coco_r50_1x.yaml: torchvision ResNet-50 (random init) and AdelaiDet's head
    return ModelConfig(type="condinst", backbone="resnet50", backbone_weights="none", freeze_bn=True, num_labels=4)


def overhead(args) -> list[dict]:
    from iuq.core.config import IUQConfig
    from iuq.data.coco import CocoInstances
    from iuq.data.synthetic import SynthConfig, generate
    from iuq.data.transforms import collate
    from iuq.engine.step import build_criterion, training_step
    from iuq.models.build import build_model

    s, dev = sizes(args), torch.device(args.device)
    cuda = dev.type == "cuda"
    root = scratch("gc_overhead_")
    generate(root, SynthConfig(images=s["images"] + 2, size=s["size"], seed=0, val_fraction=2 / (s["images"] + 2)))
    ds = CocoInstances(root / "annotations" / "instances_train.json", root / "train")
    batch = collate([ds[i] for i in range(s["images"])])
    images, mask = batch["images"].to(dev), batch["pixel_mask"].to(dev)
    targets = [{**t, "masks": t["masks"].to(dev), "labels": t["labels"].to(dev)} for t in batch["targets"]]
    ids = torch.tensor([t["image_id"] for t in targets], device=dev)
    rows = []
    for kind in ("mask2former", "condinst"):
        arms = {"baseline": IUQConfig(inter=False, equi=True, equi_variant="augmentation")}
        for m in s["memories"]:
            arms[f"iuq M={m}"] = IUQConfig(memory_capacity=m, memory_dtype="bfloat16" if cuda else "float32")
        built = {}
        for name, cfg in arms.items():
            torch.manual_seed(0)
            model = build_model(overhead_model(kind, args.device), load_weights=False).to(dev)
            crit = build_criterion(cfg, model).to(dev)
            if crit.memory is not None:  # a full memory, as in steady-state training
                crit.memory.embeddings.normal_()
                crit.memory.xy.uniform_()
                crit.memory.image_ids.fill_(10**9)
                crit.memory.count.fill_(crit.memory.capacity)
            params = [p for p in model.parameters() if p.requires_grad]
            built[name] = (model, crit, torch.optim.AdamW(params, lr=1e-4), [], [0])
        for step in range(s["warmup"] + s["steps"]):
            for _name, (model, crit, opt, times, peak) in built.items():  # alternating: noise hits both alike
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    res = training_step(model, crit, images, mask, targets, ids, torch.Generator().manual_seed(step))
                opt.zero_grad(set_to_none=True)
                res.loss.backward()
                opt.step()
                crit.update_memory(res.samples)
                if cuda:
                    torch.cuda.synchronize()
                    peak[0] = max(peak[0], torch.cuda.max_memory_allocated())
                if step >= s["warmup"]:
                    times.append(time.perf_counter() - t0)
        base = statistics.median(built["baseline"][3])
        for name, (_, _, _, times, peak) in built.items():
            med = statistics.median(times)
            row = {"model": kind, "arm": name, "median_ms": round(med * 1e3, 1), "ratio": round(med / base, 3),
                   "peak_gib": round(peak[0] / 2**30, 2) if cuda else None, "steps": len(times),
                   "batch": f"{s['images']} x 2 views, {s['size']} px"}  # fmt: skip
            record(args, "overhead", rows, row)
        del built
        if cuda:
            torch.cuda.empty_cache()
    return rows


# -- kernel ---------------------------------------------------------------------------------------
def kernel(args) -> list[dict]:
    from iuq.core.decoders import DotProductDecoder
    from iuq.core.inter_scene import inter_scene_loss

    s, dev = sizes(args), torch.device(args.device)
    cuda = dev.type == "cuda"
    q_n, d = s["queries"], s["dim"]
    rows = []
    from iuq.core.config import IUQConfig

    cuda_chunk = max(args.chunk_size, IUQConfig().cuda_chunk_pairs // q_n)  # what training uses on CUDA
    for m, chunk in [(m, c) for m in s["kernel_memories"] for c in dict.fromkeys((args.chunk_size, cuda_chunk))]:
        g = torch.Generator(device=dev).manual_seed(0)
        dtype = torch.bfloat16 if cuda else torch.float32
        memory = torch.randn(m, d, device=dev, generator=g).to(dtype)  # a bf16 memory (iuq.memory_dtype)
        pixel_ids = torch.full((m,), 10**9, device=dev)
        q = (torch.randn(q_n, d, device=dev, generator=g) * 0.05).requires_grad_()
        q_ids = torch.arange(q_n, device=dev) // 4
        times = []
        for i in range(s["repeats"] + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = inter_scene_loss(q, q_ids, memory, pixel_ids, DotProductDecoder(), chunk_size=chunk)
            (grad,) = torch.autograd.grad(loss, q)
            if cuda:
                torch.cuda.synchronize()
            if i > 0:
                times.append(time.perf_counter() - t0)
        measured = statistics.median(times)
        flops = 4 * q_n * m * d  # forward logits 2QMD + the queries' gradient 2QMD
        read = m * d * memory.element_size()
        roofline = max(flops / (args.peak_tflops * 1e12), read / (args.bandwidth_tbs * 1e12)) if cuda else None
        row = {"M": m, "Q": q_n, "D": d, "chunk": chunk, "median_ms": round(measured * 1e3, 3),
               "roofline_ms": round(roofline * 1e3, 4) if roofline else None,
               "x_roofline": round(measured / roofline, 2) if roofline else None,
               "finite": bool(torch.isfinite(loss).item() and torch.isfinite(grad).all().item())}  # fmt: skip
        record(args, "kernel", rows, row)
    return rows


# -- driver ---------------------------------------------------------------------------------------
def summary(out: Path, device: str) -> str:
    lines = [f"# gpu_check ({device}; {torch.cuda.get_device_name() if device == 'cuda' else 'CPU, tiny sizes'})", ""]
    parts = {p: json.loads((out / f"{p}.json").read_text()) if (out / f"{p}.json").is_file() else None for p in PARTS}
    lines += ["## numerics: one IUQ step, CUDA fp32 vs CPU fp32 and bf16 autocast vs CUDA fp32", "",
              "| model | ok | fp32 max term rel | fp32 grad rel | bf16 max term rel (term) | bf16 grad cos | error |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in parts["numerics"] or []:
        lines.append(f"| {r['model']} | {'yes' if r['ok'] else 'NO'} | {r.get('fp32_term_rel', '')} | "
                     f"{r.get('fp32_grad_rel', '')} | {r.get('bf16_term_rel', '')} ({r.get('bf16_worst_term', '')}) | "
                     f"{r.get('bf16_grad_cos', '')} | {r.get('error', '')} |")  # fmt: skip
    lines += ["", "## smoke: train 2 steps, evaluate, export, `iuq eval` on the export", "",
              "| model | arm | ok | AP | AP by iuq eval | s | error |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in parts["smoke"] or []:
        lines.append(f"| {r['model']} | {r['arm']} | {'yes' if r['ok'] else 'NO'} | {r.get('AP', '')} | "
                     f"{r.get('eval_AP', '')} | {r['seconds']} | {r.get('error', '')} |")  # fmt: skip
    lines += ["", "## overhead: IUQ/baseline step time at equal views", "",
              "| model | arm | batch | median ms | ratio | peak GiB |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in parts["overhead"] or []:
        lines.append(f"| {r['model']} | {r['arm']} | {r['batch']} | {r['median_ms']} | {r['ratio']} | "
                     f"{r['peak_gib'] if r['peak_gib'] is not None else 'n/a'} |")  # fmt: skip
    lines += ["", "## kernel: L_inter forward + query gradient vs roofline", "",
              "| M | Q | D | chunk | median ms | roofline ms | x roofline | finite |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in parts["kernel"] or []:
        lines.append(f"| {r['M']} | {r['Q']} | {r['D']} | {r['chunk']} | {r['median_ms']} | "
                     f"{r['roofline_ms'] or 'n/a'} | {r['x_roofline'] or 'n/a'} | {r['finite']} |")  # fmt: skip
    missing = [p for p, v in parts.items() if v is None]
    if missing:
        lines += ["", f"parts without results (failed or out of time; see log): {', '.join(missing)}"]
    return "\n".join(lines) + "\n"


def record(args, part: str, rows: list[dict], row: dict) -> None:
    """Print a row and rewrite OUT/<part>.json with every row so far: a part stopped at its time cap
    keeps what it measured."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    (args.out / f"{part}.json").write_text(json.dumps(rows, indent=1))


def scratch(prefix: str) -> Path:
    """A temporary folder, removed when the part's process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--part", choices=("all", *PARTS), default="all")
    p.add_argument("--models", nargs="+", default=list(DEMO_CONFIGS), choices=list(DEMO_CONFIGS))
    p.add_argument("--budget", type=float, default=470.0, help="seconds for all parts together")
    p.add_argument("--backbone-weights", default="none",
                   help="numerics: 'none' (random init) or 'config' (each demo config's own: ImageNet)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H200: 989)")
    p.add_argument("--bandwidth-tbs", type=float, default=4.8, help="memory bandwidth of the GPU (H200: 4.8)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part != "all":
        rows = {"numerics": numerics, "smoke": smoke, "overhead": overhead, "kernel": kernel}[args.part](args)
        (args.out / f"{args.part}.json").write_text(json.dumps(rows, indent=1))
        return
    start = time.perf_counter()
    shares = {"numerics": 0.2, "smoke": 0.4, "overhead": 0.3, "kernel": 0.1}  # of what is left when a part starts
    for i, part in enumerate(PARTS):
        left = args.budget - (time.perf_counter() - start)
        cap = max(10.0, left * shares[part] / sum(shares[q] for q in PARTS[i:]))
        cmd = [sys.executable, __file__, *sys.argv[1:], "--part", part]  # the last --part wins
        print(f"=== {part} (cap {cap:.0f} s)", flush=True)
        try:
            rc = subprocess.run(cmd, timeout=cap).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"=== {part}: rc {rc}, {time.perf_counter() - start:.0f} s so far", flush=True)
    text = summary(args.out, args.device)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
