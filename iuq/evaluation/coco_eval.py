"""COCO (or LVIS) mask AP as reset / process / evaluate.

Predictions become COCO results (compressed RLE, pycocotools' encoder); scoring is COCOeval from
faster-coco-eval, whose numbers agree with pycocotools' reference implementation (tested to 1e-4)
at a fraction of the time. `backend="pycocotools"` runs the reference itself.

`metric="lvis"` scores LVIS v1's federated annotations with faster-coco-eval's `lvis_style`: a
detection of a class neither annotated nor listed in the image's `neg_category_ids` is dropped, an
unmatched detection of a class in `not_exhaustive_category_ids` is not a false positive, at most
`max_dets` (300 in LVIS) detections per image count, and AP_r / AP_c / AP_f average over the rare,
common and frequent categories (`frequency` "r", "c", "f"). The `lvis` package itself is not used:
it breaks on numpy >= 1.24.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch

from iuq.data.rle import rle_counts_problem
from iuq.models.paste import mask_chunks

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_KEYS = (*METRIC_KEYS, "APr", "APc", "APf")
METRICS = ("coco", "lvis")


class ResultsError(ValueError):
    """A COCO results file is unreadable or malformed (the message names the file and entry)."""


def read_results(path: str | os.PathLike) -> list[dict]:
    """A COCO results JSON (a list of {image_id, category_id, segmentation RLE, score}), checked."""
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError as err:
        raise ResultsError(f"{path}: results file not found") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: not valid JSON ({err}); is the file complete?") from err
    except OSError as err:
        raise ResultsError(f"{path}: cannot read the results file ({err.strerror or err})") from err
    if not isinstance(results, list):
        raise ResultsError(f"{path}: expected a JSON list of COCO results, got a {type(results).__name__}")
    for i, r in enumerate(results):
        problem = _results_entry_problem(r)
        if problem:
            raise ResultsError(f"{path}: entry {i}: {problem}")
    return results


def _results_entry_problem(r) -> str | None:
    if not isinstance(r, dict):
        return "not an object"
    missing = [k for k in ("image_id", "category_id", "segmentation", "score") if k not in r]
    if missing:
        return f"missing key(s) {missing}; mask results need image_id, category_id, segmentation (RLE) and score"
    seg = r["segmentation"]
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        return "segmentation must be an RLE object with 'size' and 'counts'"
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size)):
        return f"segmentation size must be [height, width], got {size!r}"
    problem = rle_counts_problem(seg["counts"], size[0] * size[1])
    if problem:
        return f"segmentation counts: {problem}"
    if not isinstance(r["score"], (int, float)) or not np.isfinite(r["score"]):
        return f"score must be a finite number, got {r['score']!r}"
    return None


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """masks [N, H, W] bool -> N compressed RLEs with `counts` as str (JSON-ready)."""
    masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else masks
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))  # wants [H, W, N]
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def to_results(image_id: int, masks, scores, category_ids) -> list[dict]:
    """One image's predictions -> COCO results entries.

    masks [N, H, W] bool at the image's original size; scores [N]; category_ids [N] (COCO ids).
    """
    scores = torch.as_tensor(scores).tolist()
    category_ids = torch.as_tensor(category_ids).tolist()
    return [
        {"image_id": int(image_id), "category_id": int(c), "segmentation": rle, "score": float(s)}
        for rle, s, c in zip(encode_masks(masks), scores, category_ids, strict=True)
    ]


def load_gt(gt: str | os.PathLike | dict, backend: str = "faster"):
    """A COCO ground-truth object for `backend` from a path or an already loaded dict."""
    if backend == "faster":
        from faster_coco_eval import COCO
    elif backend == "pycocotools":
        from pycocotools.coco import COCO
    else:
        raise ValueError(f"unknown COCO eval backend {backend!r}; use 'faster' or 'pycocotools'")
    if isinstance(gt, dict):
        coco = COCO()
        coco.dataset = gt
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt))


def evaluate_results(
    gt, results: list[dict], backend: str = "faster", max_dets: int = 100, metric: str = "coco"
) -> dict[str, float]:
    """COCO (or LVIS) segm metrics of `results` against `gt` (path, dict or COCO object).

    max_dets: COCO's maxDets, the detections per image that count (highest scores first); crowded
        images with more instances than this cannot reach full recall. Under "lvis" it is also the
        cap on an image's detections over all classes (LVIS: 300).
    Returns AP, AP50, AP75, APs, APm, APl on the 0-100 scale, plus APr, APc, APf for "lvis"; COCO's
    -1 ("no ground truth in this area range" or, for APr, no rare class) is kept as -1.0.
    """
    if max_dets < 1:
        raise ValueError(f"eval.max_dets: must be >= 1, got {max_dets}")
    if metric not in METRICS:
        raise ValueError(f"eval.metric: {metric!r} is not one of {METRICS}")
    if metric == "lvis" and backend != "faster":
        raise ValueError("eval.metric lvis: needs eval.backend faster (faster-coco-eval's lvis_style)")
    coco_gt = gt if hasattr(gt, "getImgIds") else load_gt(gt, backend)
    known = set(coco_gt.getImgIds())
    unknown = sorted({r["image_id"] for r in results} - known)
    if unknown:
        raise ResultsError(f"results name image ids that are not in the ground truth: {unknown[:10]}")
    categories = set(coco_gt.getCatIds())
    unknown = sorted({r["category_id"] for r in results} - categories)
    if unknown:
        raise ResultsError(f"results name category ids that are not in the ground truth: {unknown[:10]}")
    for i, r in enumerate(results):
        info = coco_gt.imgs[r["image_id"]]
        if list(r["segmentation"]["size"]) != [info["height"], info["width"]]:
            raise ResultsError(
                f"result {i} (image id {r['image_id']}): mask size {r['segmentation']['size']} differs from the "
                f"image's {[info['height'], info['width']]}"
            )
    results = copy.deepcopy(results)  # both loadRes implementations add keys to the entries in place
    if metric == "lvis":
        return _lvis(coco_gt, top_per_image(results, max_dets), max_dets)
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster":
            from faster_coco_eval import COCOeval_faster as COCOeval

            coco_dt = coco_gt.loadRes(results)
        else:
            from pycocotools.cocoeval import COCOeval

            if not results:  # pycocotools' loadRes cannot take an empty list
                return {k: 0.0 for k in METRIC_KEYS}
            coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "segm")
        # Sorted, ending at max_dets: pycocotools sorts maxDets itself and cuts at the last one.
        ev.params.maxDets = [m for m in (1, 10) if m < max_dets] + [max_dets]
        ev.evaluate()
        ev.accumulate()
    return summarize_precision(ev.eval["precision"], ev.params.iouThrs)


def top_per_image(results: list[dict], k: int) -> list[dict]:
    """The k highest-scoring results of each image (LVIS counts at most k per image, all classes)."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return [r for rs in by_image.values() for r in sorted(rs, key=lambda r: -r["score"])[:k]]


def _lvis(coco_gt, results: list[dict], max_dets: int) -> dict[str, float]:
    from faster_coco_eval import COCOeval_faster

    missing = [c["id"] for c in coco_gt.dataset["categories"] if c.get("frequency") not in ("r", "c", "f")]
    if missing:
        raise ResultsError(
            f"eval.metric lvis: categories {missing[:10]} have no 'frequency' ('r', 'c' or 'f'); "
            "is the ground truth an LVIS v1 file?"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval_faster(coco_gt, coco_dt, "segm", lvis_style=True)
        ev.params.maxDets = [max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = summarize_precision(ev.eval["precision"], ev.params.iouThrs)
    stats = ev.stats_as_dict
    for key in ("APr", "APc", "APf"):
        metrics[key] = float(stats[key]) * 100.0 if stats[key] > -1 else -1.0
    return metrics


def summarize_precision(precision: np.ndarray, iou_thresholds: np.ndarray) -> dict[str, float]:
    """The six COCO AP figures from COCOeval's accumulated precision [T, R, K, A, M] at the last
    maxDets (M = -1); areas in COCO's order all, small, medium, large.

    COCOeval's own `summarize` is not used: pycocotools computes its headline AP at a hard-coded
    maxDets of 100, whatever `params.maxDets` says, so any other eval.max_dets would read -1.
    """

    def mean(p: np.ndarray) -> float:
        valid = p[p > -1]
        return float(valid.mean()) * 100.0 if valid.size else -1.0

    t50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thresholds - 0.75)))
    return {
        "AP": mean(precision[:, :, :, 0, -1]),
        "AP50": mean(precision[t50, :, :, 0, -1]),
        "AP75": mean(precision[t75, :, :, 0, -1]),
        "APs": mean(precision[:, :, :, 1, -1]),
        "APm": mean(precision[:, :, :, 2, -1]),
        "APl": mean(precision[:, :, :, 3, -1]),
    }


def metric_keys(metrics: dict[str, float]) -> tuple[str, ...]:
    """The keys reported for these metrics: COCO's six, or LVIS's nine."""
    return LVIS_KEYS if "APr" in metrics else METRIC_KEYS


def format_table(metrics: dict[str, float]) -> str:
    keys = metric_keys(metrics)
    head = " | ".join(f"{k:>6}" for k in keys)
    row = " | ".join(f"{metrics[k]:6.2f}" for k in keys)
    return f"{'LVIS' if 'APr' in metrics else 'COCO'} mask AP\n{head}\n{row}"


def write_metrics(metrics: dict[str, float], path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    keys = metric_keys(metrics)
    with open(path, "w") as f:
        json.dump({k: metrics[k] for k in keys}, f, indent=2)


class CocoMaskEvaluator:
    """Accumulates predictions over a dataset and scores them with COCOeval (segm).

    Args:
        gt: ground truth (instances JSON path or loaded dict).
        label_to_category: COCO category id of each contiguous label the model predicts.
        backend: "faster" (faster-coco-eval, default) or "pycocotools".
        max_dets: COCO's maxDets (100 unless images hold more instances; 300 for LVIS).
        metric: "coco" or "lvis" (`evaluate_results`).
    """

    def __init__(
        self, gt, label_to_category: list[int], backend: str = "faster", max_dets: int = 100, metric: str = "coco"
    ):
        self.coco_gt = load_gt(gt, backend)
        self.label_to_category = torch.as_tensor(label_to_category, dtype=torch.int64)
        self.backend = backend
        self.max_dets = max_dets
        self.metric = metric
        self.reset()

    def reset(self) -> None:
        self._results: list[dict] = []

    def process(self, image_ids: list[int], outputs: list[dict]) -> None:
        """outputs[i]: a model's prediction (`iuq.models.paste`: masks pasted and encoded a chunk at a
        time), or plain `masks` [N, H, W] bool at the original size; with `scores` [N], `labels` [N]."""
        for image_id, out in zip(image_ids, outputs, strict=True):
            categories = self.label_to_category[out["labels"].cpu()]
            scores = out["scores"].cpu()
            chunks = [(0, out["masks"])] if "masks" in out else mask_chunks(out)
            for start, masks in chunks:
                end = start + len(masks)
                self._results.extend(to_results(image_id, masks, scores[start:end], categories[start:end]))

    @property
    def results(self) -> list[dict]:
        return self._results

    def evaluate(self) -> dict[str, float]:
        return evaluate_results(self.coco_gt, self._results, self.backend, self.max_dets, self.metric)
