"""The `iuq` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SKIP_HINT = "pass --skip-invalid"


class UsageError(ValueError):
    """A command was given an impossible combination of arguments."""


def _synth(args) -> None:
    from iuq.data.synthetic import SynthConfig, generate

    paths = generate(args.out, SynthConfig(images=args.images, seed=args.seed, size=args.size))
    for split, path in paths.items():
        print(f"{split}: {path}  (images in {Path(args.out) / split})")


def _paste(args) -> None:
    from iuq.data.paste import PasteConfig, generate_paste

    cfg = PasteConfig(
        coco_ann=str(args.coco), coco_images=str(args.images), seed=args.seed, size=args.size,
        scenes=[args.train, args.dev, args.val], objects=[args.objects_min, args.objects_max],
        min_instances=args.min_instances, min_object_px=args.min_object_px,
    )  # fmt: skip
    manifest = generate_paste(args.out, cfg)
    print(f"classes kept ({len(manifest['classes'])}): {', '.join(manifest['classes'])}")
    for split, scenes in zip(("train", "dev", "val"), cfg.scenes, strict=True):
        sources, cuts = len(manifest["source_images"][split]), manifest["cut_outs"][split]
        print(f"{split}: {args.out / 'annotations' / f'instances_{split}.json'}  ({scenes} scenes from "
              f"{sources} source images, {cuts} cut-outs)")  # fmt: skip


def _holdout(args) -> None:
    from iuq.data.holdout import HoldoutConfig, write_holdout

    hold_out = [s for s in args.hold_out.split(",") if s]
    counts = write_holdout(args.out, HoldoutConfig(str(args.ann_file), hold_out, args.sep))
    for split, n in counts.items():
        print(f"{split}: {args.out / 'annotations' / f'instances_{split}.json'}  ({n} images)")


def _stats(args) -> None:
    from iuq.data.stats import crowded_warning, dataset_stats, format_stats

    stats = dataset_stats(args.ann_file, args.images, args.skip_invalid, args.max_dets)
    print(format_stats(stats))
    warning = crowded_warning(stats)
    if warning:
        print(warning, file=sys.stderr)


def _preview(args) -> None:
    from iuq.data.coco import CocoInstances
    from iuq.visualize import draw_instances, save_png

    ds = CocoInstances(args.data, args.images, skip_invalid=args.skip_invalid, skip_hint=SKIP_HINT)
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

    ds = CocoInstances(args.ann_file, args.images, skip_invalid=args.skip_invalid, skip_hint=SKIP_HINT)
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
    from iuq.evaluation.coco_eval import evaluate_results, format_table, read_results, write_metrics

    if args.metric == "lvis" and args.backend != "faster":
        raise UsageError("iuq eval --metric lvis: needs --backend faster (faster-coco-eval's LVIS mode)")
    if args.model is not None:
        metrics = _eval_model(args)
    else:
        if args.pred is None or args.gt is None:
            raise UsageError("iuq eval: give CHECKPOINT_OR_MODEL_DIR --data ANN.json --images DIR, or --gt and --pred")
        from iuq.data.coco import CocoInstances

        CocoInstances(args.gt, None, skip_hint=SKIP_HINT)  # the loader's checks, before COCOeval's asserts
        results = read_results(args.pred)
        metrics = evaluate_results(args.gt, results, backend=args.backend, max_dets=args.max_dets, metric=args.metric)
    print(format_table(metrics))
    if args.out:
        write_metrics(metrics, args.out)
        print(f"metrics written to {args.out}")


def _eval_model(args) -> dict:
    from iuq.data.coco import CocoInstances
    from iuq.engine.inference import evaluate, is_run_dir, load_trained

    if (args.data is None or args.images is None) and is_run_dir(Path(args.model)):
        from iuq.config import load_config

        run = load_config(Path(args.model) / "config.yaml")  # a run directory: its own val split
        if run.data.val_ann is not None:
            args.data, args.images = args.data or run.data.val_ann, args.images or run.data.val_images
            print(f"evaluating on the run's val split {args.data}")
    if args.data is None or args.images is None:
        raise UsageError("iuq eval CHECKPOINT_OR_MODEL_DIR: give --data ANN.json and --images DIR")
    trained = load_trained(args.model)
    trained.top_k = max(trained.top_k, args.max_dets)
    dataset = CocoInstances(args.data, args.images, skip_invalid=args.skip_invalid, skip_hint=SKIP_HINT)
    metrics, results = evaluate(
        trained,
        dataset,
        backend=args.backend,
        device=_device(args.device),
        max_dets=args.max_dets,
        metric=args.metric,
    )
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results))
        print(f"{len(results)} results written to {args.results}")
    return metrics


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _train(args) -> None:
    from iuq.config import load_config
    from iuq.engine.train import train

    config = args.config
    if config is None and args.resume and args.out is not None:
        config = args.out / "config.yaml"  # a resumed run keeps its own resolved config
    overrides = list(args.set or [])
    if args.out is not None:
        overrides.append(f"out={args.out}")
    cfg = load_config(config, overrides)
    train(cfg, resume=args.resume)


def _predict(args) -> None:
    from iuq.engine.inference import load_trained
    from iuq.engine.predict import predict_files

    if not 0 <= args.threshold <= 1:
        raise UsageError(f"--threshold: must be in [0, 1], got {args.threshold}")
    trained = load_trained(args.model)
    report = predict_files(trained, args.images, args.out, args.threshold, _device(args.device))
    print(f"overlays and results.json ({len(report.results)} results; image_id = position in the list) in {args.out}")
    if report.failed:
        listed = "; ".join(why for _, why in report.failed[:3])
        raise UsageError(
            f"{len(report.failed)} image(s) could not be read (the results of the others are in "
            f"{args.out / 'results.json'}): {listed}"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iuq", description="Instance-Unique Querying for instance segmenters.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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

    s = data.add_parser(
        "paste", help="scenes of real objects cut from a COCO-format source, split by source image (train/dev/val)"
    )
    s.add_argument("--coco", required=True, type=Path, help="source instances JSON (e.g. coco128's)")
    s.add_argument("--images", required=True, type=Path, help="source image folder")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=192, help="scene side in px")
    s.add_argument("--train", type=int, default=600, help="train scenes")
    s.add_argument("--dev", type=int, default=100, help="dev scenes (choose settings here)")
    s.add_argument("--val", type=int, default=100, help="val scenes (report here)")
    s.add_argument("--objects-min", type=int, default=1)
    s.add_argument("--objects-max", type=int, default=8)
    s.add_argument("--min-instances", type=int, default=10, help="keep classes with at least this many cut-outs")
    s.add_argument("--min-object-px", type=int, default=400, help="skip source instances smaller than this (px)")
    s.set_defaults(func=_paste)

    s = data.add_parser("holdout", help="split a dev set off a training JSON by source image (file-name prefix)")
    s.add_argument("ann_file", type=Path, help="the training instances JSON")
    s.add_argument("--hold-out", required=True, help="comma-separated sources to hold out, e.g. 0007,0012")
    s.add_argument("--sep", default="_", help="a file name's source prefix ends at this string")
    s.add_argument("--out", required=True, type=Path)
    s.set_defaults(func=_holdout)

    s = data.add_parser("stats", help="validate a COCO instances JSON and print its counts and ranges")
    s.add_argument("ann_file", type=Path)
    s.add_argument("--images", type=Path, help="image folder: also check that every image file exists")
    s.add_argument("--max-dets", type=int, default=100, help="warn about images with more instances (eval.max_dets)")
    s.add_argument("--skip-invalid", action="store_true", help="skip and count invalid entries instead of failing")
    s.set_defaults(func=_stats)

    s = data.add_parser("preview", help="draw ground-truth instances of a dataset to PNG")
    s.add_argument("--data", required=True, type=Path, help="instances JSON")
    s.add_argument("--images", required=True, type=Path, help="image folder")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--num", type=int, default=4)
    s.add_argument("--skip-invalid", action="store_true", help="skip and count invalid entries instead of failing")
    s.set_defaults(func=_preview)

    s = data.add_parser("as-results", help="write ground truth as COCO results (score 1), for checks")
    s.add_argument("ann_file", type=Path)
    s.add_argument("--images", required=True, type=Path, help="image folder")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--skip-invalid", action="store_true", help="skip and count invalid entries instead of failing")
    s.set_defaults(func=_as_results)

    s = sub.add_parser(
        "eval",
        help="COCO mask AP of a trained model on a dataset, or of a results JSON",
        description="iuq eval CHECKPOINT_OR_MODEL_DIR --data ANN.json --images DIR [--out metrics.json], "
        "iuq eval RUN_DIR (on the run's own val split), or iuq eval --gt ANN.json --pred RESULTS.json",
    )
    s.add_argument(
        "model", nargs="?", type=Path, help="a run directory, its checkpoints/last.ckpt or its model/ directory"
    )
    s.add_argument(
        "--data", type=Path, help="instances JSON to evaluate on (default for a run directory: its val split)"
    )
    s.add_argument("--images", type=Path, help="image folder of --data")
    s.add_argument("--results", type=Path, help="also write the model's COCO results JSON here")
    s.add_argument("--gt", type=Path, help="ground-truth instances JSON (with --pred)")
    s.add_argument("--pred", type=Path, help="COCO results JSON (segmentation RLE, score)")
    s.add_argument("--out", type=Path, help="write AP, AP50, AP75, APs, APm, APl (and APr, APc, APf) here")
    s.add_argument(
        "--metric",
        choices=("coco", "lvis"),
        default="coco",
        help="coco, or lvis: LVIS v1's federated mask AP with AP_r / AP_c / AP_f (give --max-dets 300)",
    )
    s.add_argument("--backend", choices=("faster", "pycocotools"), default="faster")
    s.add_argument("--max-dets", type=int, default=100, help="COCO maxDets: detections per image that count")
    s.add_argument("--skip-invalid", action="store_true", help="skip and count invalid entries of --data")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    s.set_defaults(func=_eval)

    s = sub.add_parser("train", help="train a segmenter with (or without) IUQ from a YAML config")
    s.add_argument("config", nargs="?", type=Path, help="YAML config (configs/demo.yaml, ...); defaults if omitted")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=0.001")
    s.add_argument("--out", type=Path, help="run directory (overrides the config's `out`)")
    s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    s.set_defaults(func=_train)

    s = sub.add_parser("predict", help="instance masks of images: PNG overlays and a COCO results JSON")
    s.add_argument("model", type=Path, help="a run directory, its checkpoints/last.ckpt or its model/ directory")
    s.add_argument("images", nargs="+", type=Path, help="image files and/or folders of images")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--threshold", type=float, default=0.5, help="score threshold of the overlays")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    s.set_defaults(func=_predict)

    s = sub.add_parser(
        "ablate",
        help="run a study (arms x seeds) and write its table with confidence intervals",
        description="iuq ablate CONFIG --study NAME --seeds N --out DIR [--set KEY=VALUE ...]. Studies: "
        "components, inter_loss, sampling, capacity, equivariance, lambda, readings, collapse "
        "(iuq/study/arms.py). "
        "Finished runs are skipped, so a killed study resumes.",
    )
    s.add_argument("config", type=Path, help="run config YAML that every arm starts from")
    s.add_argument("--study", required=True, help="which study")
    s.add_argument("--seeds", type=int, default=3, help="seeds per arm (train.seed = 0 .. N-1)")
    s.add_argument("--first-seed", type=int, default=0, help="first train.seed")
    s.add_argument("--out", required=True, type=Path, help="study folder")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key in every arm")
    s.add_argument(
        "--arms",
        help="comma-separated subset of the study's arms (the reference is always run); "
        "a+b is arms a and b's switches together, e.g. inter_center+warmup_300",
    )
    s.add_argument("--jobs", type=int, default=1, help="runs at a time (set train.threads to share the cores)")
    s.add_argument("--report-only", action="store_true", help="rebuild the report from DIR/summaries, run nothing")
    s.add_argument(
        "--choose",
        action="store_true",
        help="with --report-only: apply the dev rule of "
        "iuq/study/choice.py (scores on seeds --first-seed .. +--seeds) and write DIR/choice.md",
    )
    s.set_defaults(func=_ablate)
    return p


def _ablate(args) -> None:
    from iuq.config import load_config
    from iuq.study.report import report_prefix
    from iuq.study.runner import StudyError, ablate, choose, report_only

    if not args.config.is_file():
        raise FileNotFoundError(f"config file {args.config} does not exist (shipped configs are in configs/)")
    load_config(args.config, args.set or [])  # a bad key fails here, before any run starts
    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    if args.choose and not args.report_only:
        raise StudyError("--choose applies the dev rule to finished runs: use it with --report-only")
    if args.report_only:
        report_only(args.out, args.study, arms)
        if args.choose:
            seeds = tuple(range(args.first_seed, args.first_seed + args.seeds))
            print(choose(args.out, args.study, arms, seeds), end="")
            print(f"dev rule: {args.out / 'choice.md'}")
    else:
        ablate(args.config, args.study, args.seeds, args.out, args.set, arms, args.jobs, args.first_seed)
    pre = report_prefix(args.study)
    print(f"study report: {args.out / f'{pre}results.md'}  ({pre}results.csv, .json, .png, {pre}curves.png)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from iuq.engine.console import silence_third_party_noise

    silence_third_party_noise()
    from iuq.engine.interrupt import RunInterrupted

    try:
        args.func(args)
    except RunInterrupted as err:
        print(f"iuq: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("iuq: interrupted (a stopped run continues with `iuq train --resume --out DIR`)", file=sys.stderr)
        return 130
    except Exception as err:  # the edge of the program: one line for the user, the traceback on --debug
        if args.debug:
            raise
        expected = isinstance(err, user_errors())
        message = one_line(err)
        if not expected:
            message = f"unexpected {type(err).__name__}: {message} (run again with --debug for the traceback)"
        print(f"iuq: error: {message}", file=sys.stderr)
        if not expected:
            return 1
        return getattr(err, "exit_code", 2)  # a run directory in use: 75, which `iuq ablate` reads
    return 0


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input (files, config, data), each with a message naming it."""
    from iuq.config import ConfigError
    from iuq.data.coco import DatasetError
    from iuq.data.holdout import HoldoutError
    from iuq.data.paste import PasteError
    from iuq.engine.inference import CheckpointError
    from iuq.engine.run_dir import RunDirError
    from iuq.engine.step import NonFiniteLossError
    from iuq.evaluation.coco_eval import ResultsError
    from iuq.models.backbones import WeightsError
    from iuq.study.runner import StudyError

    return (
        UsageError,
        PasteError,
        HoldoutError,
        StudyError,
        DatasetError,
        ConfigError,
        CheckpointError,
        NonFiniteLossError,
        ResultsError,
        RunDirError,
        WeightsError,
        FileNotFoundError,
        FileExistsError,
    )


def one_line(err: BaseException) -> str:
    """The message of `err` on one line. An error raised in a DataLoader worker arrives with the
    worker's traceback in its text; its last line is the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
