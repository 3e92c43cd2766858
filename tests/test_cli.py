import json

from iuq.cli import main
from tests.conftest import COCO128_IMAGES, COCO128_JSON


def test_eval_of_ground_truth_results_is_100(tmp_path, capsys):
    pred, out = tmp_path / "r.json", tmp_path / "m.json"
    assert main(["data", "as-results", str(COCO128_JSON), "--images", str(COCO128_IMAGES), "--out", str(pred)]) == 0
    assert len(json.loads(pred.read_text())) == 929
    assert main(["eval", "--gt", str(COCO128_JSON), "--pred", str(pred), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {k: 100.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert "COCO mask AP" in capsys.readouterr().out


def test_synth_stats_and_preview(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--images", "5", "--seed", "3", "--size", "96"]) == 0
    ann = tmp_path / "s" / "annotations" / "instances_train.json"
    n_ann = len(json.loads(ann.read_text())["annotations"])
    assert main(["data", "stats", str(ann)]) == 0
    out = capsys.readouterr().out
    assert "images               4" in out and f"instances            {n_ann}  (+0 crowd)" in out
    assert (
        main(
            [
                "data",
                "preview",
                "--data",
                str(ann),
                "--images",
                str(tmp_path / "s" / "train"),
                "--out",
                str(tmp_path / "p"),
                "--num",
                "2",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["gt_1.png", "gt_2.png"]


def test_data_error_is_reported_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["data", "preview", "--data", str(bad), "--images", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert f"{bad}: not a COCO instances file" in capsys.readouterr().err
