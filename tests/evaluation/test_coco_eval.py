import json

import numpy as np
import pytest
import torch

from iuq.evaluation.coco_eval import CocoMaskEvaluator, evaluate_results, to_results
from tests.conftest import COCO_JSON


def _gt_as_results(gt: dict) -> list[dict]:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    results = []
    for a in gt["annotations"]:
        if a["iscrowd"]:
            continue
        rle = coco.annToRLE(a)
        rle["counts"] = rle["counts"].decode()
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": rle, "score": 1.0})
    return results


def test_ground_truth_as_predictions_gives_ap_100():
    gt = json.loads(COCO_JSON.read_text())
    metrics = evaluate_results(COCO_JSON, _gt_as_results(gt))
    assert metrics == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "APs": 100.0, "APm": 100.0, "APl": 100.0}


def _constructed_case():
    """Two 64x64 images, three GT squares; five predictions of varied overlap and score."""
    h = w = 64
    gt_masks = np.zeros((3, h, w), dtype=bool)
    gt_masks[0, 4:24, 4:24] = True  # image 1, class 1
    gt_masks[1, 30:60, 30:60] = True  # image 1, class 2
    gt_masks[2, 10:50, 10:40] = True  # image 2, class 1
    image_of = [1, 1, 2]
    cats = [1, 2, 1]
    from iuq.evaluation.coco_eval import encode_masks

    anns = []
    for k, rle in enumerate(encode_masks(gt_masks)):
        anns.append(
            {
                "id": k + 1,
                "image_id": image_of[k],
                "category_id": cats[k],
                "segmentation": rle,
                "area": int(gt_masks[k].sum()),
                "bbox": [0, 0, 1, 1],
                "iscrowd": 0,
            }
        )
    gt = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i in (1, 2)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    pred = np.zeros((5, h, w), dtype=bool)
    pred[0, 4:24, 6:24] = True  # IoU 0.9 with gt 0
    pred[1, 30:60, 38:60] = True  # IoU 0.733 with gt 1
    pred[2, 10:50, 10:28] = True  # IoU 0.6 with gt 2
    pred[3, 0:10, 0:10] = True  # false positive, high score
    pred[4, 12:50, 10:40] = True  # IoU 0.95 with gt 2, low score
    results = []
    for k, (img, cat, score) in enumerate([(1, 1, 0.9), (1, 2, 0.8), (2, 1, 0.7), (2, 1, 0.95), (2, 1, 0.3)]):
        results += to_results(img, torch.from_numpy(pred[k : k + 1]), [score], [cat])
    return gt, results


def test_constructed_case_faster_equals_pycocotools():
    gt, results = _constructed_case()
    fast = evaluate_results(gt, results, backend="faster")
    ref = evaluate_results(gt, results, backend="pycocotools")
    for key in fast:
        assert fast[key] == pytest.approx(ref[key], abs=1e-4 * 100)
    # Hand check. Class 2: one GT, one prediction at IoU 0.733 -> AP50 1, AP75 0.
    # Class 1, ranked: 0.95 FP (no overlap), 0.9 TP (IoU 0.9), 0.7 (IoU 0.6), 0.3 (IoU 0.95 with the GT
    # the 0.7 one took at IoU 0.5). At IoU 0.5: FP TP TP FP -> interpolated precision 2/3 everywhere,
    # AP50 = (1 + 2/3) / 2. At IoU 0.75: FP TP FP TP -> precision 1/2 at both recalls, AP75 = (0 + 1/2) / 2.
    assert ref["AP50"] == pytest.approx(100 * (1 + 2 / 3) / 2, abs=1e-9)
    assert ref["AP75"] == pytest.approx(25.0, abs=1e-9)
    assert ref["APl"] == -1.0  # no GT above 96^2 px


def test_evaluator_reset_process_evaluate_matches_functional():
    gt, results = _constructed_case()
    ev = CocoMaskEvaluator(gt, label_to_category=[1, 2])
    from pycocotools import mask as mu

    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    for image_id, rs in by_image.items():
        masks = torch.from_numpy(np.stack([mu.decode(r["segmentation"]) for r in rs])).bool()
        ev.process(
            [image_id],
            [
                {
                    "masks": masks,
                    "scores": torch.tensor([r["score"] for r in rs]),
                    "labels": torch.tensor([r["category_id"] - 1 for r in rs]),
                }
            ],
        )
    assert ev.evaluate() == evaluate_results(gt, results)
    ev.reset()
    assert ev.evaluate()["AP"] == 0.0


def test_unknown_image_id_is_an_error():
    gt, results = _constructed_case()
    results[0]["image_id"] = 99
    with pytest.raises(ValueError, match=r"image ids that are not in the ground truth: \[99\]"):
        evaluate_results(gt, results)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_max_dets_caps_recall_on_a_crowded_image(backend):
    """One image, three 20x20 ground-truth squares, three exact predictions scored 0.9, 0.8, 0.7.
    maxDets=2 keeps the first two: precision 1 up to recall 2/3, then nothing, so COCO's 101-point
    interpolation gives 67/101 at every IoU threshold; maxDets=1 gives 34/101."""
    from iuq.evaluation.coco_eval import encode_masks

    masks = np.zeros((3, 64, 64), dtype=bool)
    for k in range(3):
        masks[k, 2 + 20 * k : 22 + 20 * k, 2:22] = True
    rles = encode_masks(masks)
    gt = {
        "images": [{"id": 1, "height": 64, "width": 64, "file_name": "1.png"}],
        "annotations": [
            {"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": rle, "area": 400, "bbox": [0, 0, 1, 1]}
            | {"iscrowd": 0}
            for k, rle in enumerate(rles)
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    results = [
        {"image_id": 1, "category_id": 1, "segmentation": rle, "score": s}
        for rle, s in zip(rles, (0.9, 0.8, 0.7), strict=True)
    ]
    full = evaluate_results(gt, results, backend=backend)
    assert full["AP"] == pytest.approx(100.0) and full["APs"] == pytest.approx(100.0) and full["APm"] == -1.0
    two = evaluate_results(gt, results, backend=backend, max_dets=2)
    assert two["AP"] == pytest.approx(100 * 67 / 101) and two["AP50"] == pytest.approx(100 * 67 / 101)
    one = evaluate_results(gt, results, backend=backend, max_dets=1)
    assert one["AP"] == pytest.approx(100 * 34 / 101)
