"""LVIS v1: federated evaluation on a constructed case with hand-computed AP, the loader's file
names from COCO URLs, and repeat-factor sampling."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from iuq.data.coco import CocoInstances
from iuq.data.lvis import file_name_from_url, repeat_factors, repeated_indices
from iuq.engine.data import StepSampler
from iuq.evaluation.coco_eval import encode_masks, evaluate_results, format_table, top_per_image, write_metrics


def _square(x, y, side=6, size=20):
    m = np.zeros((size, size), dtype=bool)
    m[y : y + side, x : x + side] = True
    return m


def _polygon(x, y, side=6):
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def _lvis_gt() -> dict:
    """Image 1: a rare (cat 1) and a frequent (cat 3) instance; cat 3 is not exhaustively annotated
    there, and cat 2 is neither present nor verified absent. Image 2: a common (cat 2) instance;
    cat 1 is verified absent (negative)."""
    return {
        "images": [
            {"id": 1, "height": 20, "width": 20, "coco_url": "http://images.cocodataset.org/val2017/a.png",
             "neg_category_ids": [], "not_exhaustive_category_ids": [3]},
            {"id": 2, "height": 20, "width": 20, "coco_url": "http://images.cocodataset.org/train2017/b.png",
             "neg_category_ids": [1], "not_exhaustive_category_ids": []},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": _polygon(1, 1), "area": 36.0,
             "bbox": [1, 1, 6, 6]},
            {"id": 2, "image_id": 1, "category_id": 3, "segmentation": _polygon(10, 10), "area": 36.0,
             "bbox": [10, 10, 6, 6]},
            {"id": 3, "image_id": 2, "category_id": 2, "segmentation": _polygon(4, 4), "area": 36.0,
             "bbox": [4, 4, 6, 6]},
        ],
        "categories": [
            {"id": 1, "name": "rare", "frequency": "r"},
            {"id": 2, "name": "common", "frequency": "c"},
            {"id": 3, "name": "frequent", "frequency": "f"},
            {"id": 4, "name": "unseen", "frequency": "f"},
        ],
    }  # fmt: skip


def _result(image_id, category_id, mask, score):
    (rle,) = encode_masks(mask[None])
    return {"image_id": image_id, "category_id": category_id, "segmentation": rle, "score": score}


def _results() -> list[dict]:
    return [
        _result(1, 1, _square(1, 1), 0.9),  # TP, cat 1 (rare)
        _result(2, 1, _square(12, 2), 0.95),  # cat 1 is negative on image 2: a false positive, ranked first
        _result(1, 2, _square(3, 12), 0.95),  # cat 2 neither present nor negative on image 1: dropped
        _result(2, 2, _square(4, 4), 0.7),  # TP, cat 2 (common)
        _result(1, 3, _square(10, 10), 0.8),  # TP, cat 3 (frequent)
        _result(1, 3, _square(1, 12), 0.9),  # unmatched, but cat 3 is not exhaustive on image 1: ignored
    ]


def _to_coco(gt: dict) -> dict:
    """The same annotations read the COCO way (no federated fields)."""
    coco = json.loads(json.dumps(gt))
    for img in coco["images"]:
        img.pop("neg_category_ids")
        img.pop("not_exhaustive_category_ids")
        img["file_name"] = file_name_from_url(img)
    return coco


def test_lvis_ap_by_hand():
    m = evaluate_results(_lvis_gt(), _results(), max_dets=300, metric="lvis")
    # cat 1: FP (0.95) then TP (0.9): precision 0.5 at recall 1 at every IoU -> AP 0.5.
    # cat 2: the dropped detection does not count -> AP 1. cat 3: the unmatched one is ignored -> AP 1.
    # cat 4 has no ground truth anywhere -> left out of every mean.
    assert m["APr"] == pytest.approx(50.0)
    assert m["APc"] == pytest.approx(100.0)
    assert m["APf"] == pytest.approx(100.0)
    assert m["AP"] == pytest.approx((50 + 100 + 100) / 3)
    assert m["APs"] == pytest.approx(m["AP"]) and m["APm"] == m["APl"] == -1.0  # 36 px instances


def test_coco_reading_of_the_same_case_counts_the_federated_detections_as_false_positives():
    m = evaluate_results(_to_coco(_lvis_gt()), _results(), max_dets=100)
    assert m["AP"] == pytest.approx(50.0)  # each class: an FP ranked above its TP
    assert "APr" not in m


def test_lvis_needs_frequencies_and_caps_detections_per_image():
    gt = _lvis_gt()
    del gt["categories"][0]["frequency"]
    with pytest.raises(ValueError, match=r"categories \[1\] have no 'frequency'"):
        evaluate_results(gt, _results(), metric="lvis")
    # max_dets 1: per image only the best detection counts (image 1: 0.95 cat 2, dropped; image 2: 0.95 FP)
    m = evaluate_results(_lvis_gt(), _results(), max_dets=1, metric="lvis")
    assert m["AP"] == pytest.approx(0.0)
    kept = top_per_image(_results(), 2)
    assert sorted((r["image_id"], r["score"]) for r in kept) == [(1, 0.9), (1, 0.95), (2, 0.7), (2, 0.95)]


def test_lvis_metrics_table_and_file(tmp_path):
    m = evaluate_results(_lvis_gt(), _results(), max_dets=300, metric="lvis")
    assert format_table(m).splitlines()[0] == "LVIS mask AP"
    write_metrics(m, tmp_path / "m.json")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert list(saved) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]


def test_loader_reads_lvis_images_by_coco_url(tmp_path):
    for split, name in (("val2017", "a.png"), ("train2017", "b.png")):
        (tmp_path / split).mkdir()
        Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / split / name)
    ann = tmp_path / "lvis_v1_val.json"
    ann.write_text(json.dumps(_lvis_gt()))
    ds = CocoInstances(ann, tmp_path)
    assert [ds.images[i]["file_name"] for i in (1, 2)] == ["val2017/a.png", "train2017/b.png"]
    image, target = ds[0]
    assert image.shape == (3, 20, 20) and target["labels"].tolist() == [0, 2]
    assert int(target["masks"][0].sum()) == 36  # the 6 x 6 polygon square, as pycocotools rasterises it


def test_repeat_factors_by_hand():
    # 4 images; class 1 in 3 of them, class 2 in one; t = 1: r(1) = sqrt(1 / 0.75), r(2) = sqrt(1 / 0.25) = 2
    r = repeat_factors([{1}, {1}, {1, 2}, set()], threshold=1.0)
    assert r.tolist() == pytest.approx([math.sqrt(4 / 3), math.sqrt(4 / 3), 2.0, 1.0])
    assert repeat_factors([{1}, {2}], threshold=0.001).tolist() == [1.0, 1.0]  # common classes: no repeats
    g = torch.Generator().manual_seed(0)
    counts = torch.stack([torch.bincount(repeated_indices(r, g), minlength=4) for _ in range(4000)]).double()
    assert counts.mean(0).tolist() == pytest.approx(r.tolist(), abs=0.02)  # stochastic rounding: E = r
    assert set(counts[:, 2].tolist()) == {2.0} and set(counts[:, 3].tolist()) == {1.0}


def test_repeat_factor_sampler_has_fixed_epochs_and_resumes_exactly():
    r = repeat_factors([{1}] * 8 + [{2}], threshold=0.5)  # class 2 in 1 of 9 images: r = sqrt(4.5)
    step = [0]
    sampler = StepSampler(9, 2, seed=5, steps_done=lambda: step[0], repeat=r)
    assert sampler.epoch_size == round(8 + math.sqrt(4.5)) == 10 and len(sampler) == 10
    full = [i for i, _ in sampler]
    assert len(full) == 10 and full.count(8) >= 2  # the rare image at least twice
    step[0] = 3  # resumed at step 3 of the epoch: the same remaining batches
    assert [i for i, _ in sampler] == full[6:]
    step[0] = 5  # the next epoch: a new draw of the same length
    nxt = [(i, e) for i, e in sampler]
    assert len(nxt) == 10 and {e for _, e in nxt} == {1}
