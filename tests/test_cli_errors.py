"""Bad input to every command: one line naming the file, id or key and what to do; exit code 2;
no traceback (unless --debug)."""

import json
import shutil

import pytest

from iuq.cli import main
from tests.conftest import COCO_IMAGES, COCO_JSON, write_tiny_coco

SQUARE = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]


def _error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("iuq: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def truncated(tmp_path):
    path = tmp_path / "truncated.json"
    path.write_text(COCO_JSON.read_text()[:500])
    return path


def test_truncated_json_in_stats_eval_and_preview(capsys, truncated, tmp_path):
    for argv in (
        ["data", "stats", str(truncated)],
        ["eval", "--gt", str(truncated), "--pred", str(truncated)],
        ["data", "preview", "--data", str(truncated), "--images", str(COCO_IMAGES), "--out", str(tmp_path / "p")],
    ):
        line = _error(capsys, argv)
        assert str(truncated) in line and "not valid JSON" in line and "complete" in line


def test_json_that_is_not_coco(capsys, tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    line = _error(capsys, ["data", "stats", str(path)])
    assert str(path) in line and "not a COCO instances file" in line and "'categories'" in line


def test_stats_rejects_an_annotation_whose_image_does_not_exist(capsys, tmp_path):
    anns = [{"id": 11, "image_id": 99, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0}]
    ann, _ = write_tiny_coco(tmp_path, anns)
    line = _error(capsys, ["data", "stats", str(ann)])
    assert "annotation id 11" in line and "image_id 99 is not in 'images'" in line and "--skip-invalid" in line
    assert "skip_invalid=True" not in line
    # --skip-invalid counts it instead, as the loader would.
    assert main(["data", "stats", str(ann), "--skip-invalid"]) == 0
    assert "skipped              1 invalid annotations" in capsys.readouterr().out


def test_stats_rejects_an_unknown_category_and_duplicate_ids(capsys, tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": SQUARE, "iscrowd": 0}]
    ann, _ = write_tiny_coco(tmp_path, anns)
    assert "category_id 7 is not in 'categories'" in _error(capsys, ["data", "stats", str(ann)])
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0}] * 2
    ann, _ = write_tiny_coco(tmp_path, anns)
    assert "annotation id 1 appears twice" in _error(capsys, ["data", "stats", str(ann)])


def test_stats_warns_when_images_hold_more_instances_than_max_dets(capsys, tmp_path):
    anns = [
        {"id": k, "image_id": 1, "category_id": 1, "segmentation": [[k, 0, k + 1, 0, k + 1, 1, k, 1]], "iscrowd": 0}
        for k in range(12)
    ]
    ann, _ = write_tiny_coco(tmp_path, anns)
    assert main(["data", "stats", str(ann), "--max-dets", "10"]) == 0
    err = capsys.readouterr().err
    assert "1 image(s) hold more than 10 instances (most: image id 1 with 12)" in err
    assert "eval.max_dets" in err
    assert main(["data", "stats", str(ann)]) == 0  # 12 <= 100: no warning
    assert "warning" not in capsys.readouterr().err


def test_missing_and_corrupt_images(capsys, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(COCO_IMAGES, images)
    (images / "000000000149.jpg").unlink()
    line = _error(capsys, ["data", "stats", str(COCO_JSON), "--images", str(images)])
    assert "000000000149.jpg" in line and "image id 149 not found" in line
    (images / "000000000149.jpg").write_bytes(b"not a jpeg")
    (images / "000000000250.jpg").write_bytes(b"")
    line = _error(capsys, ["data", "stats", str(COCO_JSON), "--images", str(images)])  # both at once
    assert line.startswith(f"iuq: error: 2 image file(s) of {COCO_JSON} cannot be used: ")
    assert "000000000149.jpg (image id 149): cannot read the image" in line
    assert "000000000250.jpg (image id 250): cannot read the image" in line
    assert main(["data", "stats", str(COCO_JSON), "--images", str(images), "--skip-invalid"]) == 0
    assert "skipped              " in capsys.readouterr().out
    line = _error(capsys, ["data", "stats", str(COCO_JSON), "--images", str(tmp_path / "no-such-folder")])
    assert "no-such-folder" in line and "image folder" in line


def test_missing_paths(capsys, tmp_path):
    line = _error(capsys, ["data", "stats", str(tmp_path / "nope.json")])
    assert "nope.json" in line and "not found" in line
    line = _error(capsys, ["eval", str(tmp_path / "run" / "last.ckpt"), "--data", str(COCO_JSON), "--images", "x"])
    assert "last.ckpt" in line and "no such checkpoint or model directory" in line
    line = _error(capsys, ["predict", str(tmp_path), str(COCO_IMAGES / "000000000034.jpg"), "--out", str(tmp_path)])
    assert "no config.json" in line
    line = _error(capsys, ["train", str(tmp_path / "none.yaml")])
    assert "none.yaml" in line and "does not exist" in line


def test_broken_yaml_and_bad_keys(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [0.1\n")
    line = _error(capsys, ["train", str(path)])
    assert "broken.yaml" in line and "not valid YAML" in line
    path.write_text("train:\n  max_stesp: 10\n")
    assert "train.max_stesp" in _error(capsys, ["train", str(path)])
    line = _error(capsys, ["train", "--set", "eval.max_dets=0", "--set", "data.train_ann=/nonexistent.json"])
    assert "eval.max_dets" in line


def test_missing_training_data_names_the_config_key(capsys, tmp_path):
    line = _error(capsys, ["train", "--set", f"data.train_ann={tmp_path}/a.json", "--out", str(tmp_path / "r")])
    assert "a.json" in line and "data.*" in line


def test_training_data_error_names_the_config_key_not_a_python_argument(capsys, tmp_path):
    anns = [{"id": 11, "image_id": 99, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0}]
    ann, images = write_tiny_coco(tmp_path, anns)
    argv = ["train", "--set", f"data.train_ann={ann}", "--set", f"data.train_images={images}"]
    line = _error(capsys, [*argv, "--set", "data.val_ann=null", "--out", str(tmp_path / "r")])
    assert "annotation id 11" in line and "data.skip_invalid" in line and "skip_invalid=True" not in line


def test_corrupt_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"\x00" * 100)
    line = _error(capsys, ["predict", str(ckpt), str(COCO_IMAGES / "000000000034.jpg"), "--out", str(tmp_path)])
    assert "last.ckpt" in line and "cannot be read as an iuq checkpoint" in line


def test_malformed_results_file(capsys, tmp_path):
    pred = tmp_path / "r.json"
    pred.write_text(json.dumps([{"image_id": 34, "category_id": 24, "score": 0.5}]))
    line = _error(capsys, ["eval", "--gt", str(COCO_JSON), "--pred", str(pred)])
    assert "r.json" in line and "entry 0" in line and "segmentation" in line
    pred.write_text(json.dumps({"not": "a list"}))
    assert "expected a JSON list" in _error(capsys, ["eval", "--gt", str(COCO_JSON), "--pred", str(pred)])
    rle = {"size": [10, 10], "counts": [100]}
    pred.write_text(json.dumps([{"image_id": 5, "category_id": 24, "segmentation": rle, "score": 1.0}]))
    line = _error(capsys, ["eval", "--gt", str(COCO_JSON), "--pred", str(pred)])
    assert "image ids that are not in the ground truth: [5]" in line


@pytest.mark.parametrize(
    ("counts", "why"),
    [
        ("zzzz9999", "character 'z' at 0 is not in compressed RLE's alphabet"),  # used to hang pycocotools
        ("0`", "end in the middle of a number (truncated?)"),
        ("9999", "runs cover 45 pixels, the mask has 100 (truncated?)"),
        ("n3", "runs cover more than the 100 pixels"),
        ([50, -1, 51], "non-negative integers"),
    ],
)
def test_a_corrupt_rle_in_a_results_file_is_named_before_decoding(capsys, tmp_path, counts, why):
    good = {"image_id": 34, "category_id": 24, "segmentation": {"size": [10, 10], "counts": [100]}, "score": 1.0}
    bad = {**good, "segmentation": {"size": [10, 10], "counts": counts}}
    pred = tmp_path / "r.json"
    pred.write_text(json.dumps([good, bad]))
    line = _error(capsys, ["eval", "--gt", str(COCO_JSON), "--pred", str(pred)])
    assert line.startswith(f"iuq: error: {pred}: entry 1: segmentation counts: ") and why in line


def test_rle_runs_match_pycocotools_encoder():
    """The checker reads every run exactly as pycocotools wrote it (column-major, 0s first)."""
    import torch

    from iuq.data.rle import rle_runs
    from iuq.evaluation.coco_eval import encode_masks

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        h, w = (int(v) for v in torch.randint(1, 60, (2,), generator=g))
        mask = torch.rand(1, h, w, generator=g) > torch.rand(1, generator=g)
        flat = mask[0].t().flatten().tolist()
        expected, value, n = [], False, 0
        for v in flat:
            if v == value:
                n += 1
            else:
                expected.append(n)
                value, n = v, 1
        expected.append(n)
        assert rle_runs(encode_masks(mask)[0]["counts"], h * w) == expected


def test_debug_shows_the_traceback(tmp_path):
    from iuq.data.coco import DatasetError

    with pytest.raises(DatasetError):
        main(["--debug", "data", "stats", str(tmp_path / "nope.json")])


def test_predict_on_a_corrupt_image_names_it(capsys, tmp_path):
    from iuq.engine.inference import save_model_dir
    from iuq.models.config import ModelConfig
    from iuq.models.mask2former import Mask2FormerAdapter, build_mask2former

    cfg = ModelConfig(backbone="resnet", backbone_widths=[8, 16, 16, 16], num_labels=1, num_queries=4)
    save_model_dir(Mask2FormerAdapter(build_mask2former(cfg)), tmp_path / "model", [1], ["nucleus"], 64, 64)
    bad = tmp_path / "tile.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    line = _error(capsys, ["predict", str(tmp_path / "model"), str(bad), "--out", str(tmp_path / "p")])
    assert "tile.png" in line and "cannot read" in line
    line = _error(capsys, ["predict", str(tmp_path / "model"), str(tmp_path / "gone.png"), "--out", str(tmp_path)])
    assert "gone.png" in line


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.max_steps=0", "train.max_steps: must be >= 1, got 0"),
        ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
        ("train.max_epochs=-2", "train.max_epochs: must be >= 1, got -2"),
        ("data.flip_p=1.5", "data.flip_p: must be in [0, 1], got 1.5"),
        ("eval.batch_size=0", "eval.batch_size: must be >= 1, got 0"),
        ("train.print_every_steps=0", "train.print_every_steps: must be >= 1, got 0"),
        ("data.train_short_side=[900,800]", "data.train_short_side: need [lo, hi] with 1 <= lo <= hi"),
    ],
)
def test_out_of_range_settings_name_the_key(capsys, tmp_path, setting, message):
    line = _error(capsys, ["train", "--set", setting, "--out", str(tmp_path / "run")])
    assert line == f"iuq: error: {message}" or (line.startswith("iuq: error: ") and message in line)
    assert not (tmp_path / "run").exists()


def test_lvis_metric_needs_the_faster_backend_and_lvis_frequencies(capsys, tmp_path):
    pred = tmp_path / "pred.json"
    pred.write_text("[]")
    line = _error(capsys, ["eval", "--gt", str(COCO_JSON), "--pred", str(pred), "--metric", "lvis", "--backend",
                           "pycocotools"])  # fmt: skip
    assert "--metric lvis" in line and "--backend faster" in line
    line = _error(capsys, ["eval", "--gt", str(COCO_JSON), "--pred", str(pred), "--metric", "lvis"])
    assert "have no 'frequency'" in line and "LVIS v1" in line
