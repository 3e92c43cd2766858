"""A dev split held out by source image: nothing shared with training, clear errors."""

import json

import pytest

from iuq.cli import main
from iuq.config import load_config
from iuq.data.holdout import HoldoutConfig, HoldoutError, source_of, write_holdout


def _ann(tmp_path):
    names = [("0001", 0), ("0001", 1), ("0002", 0), ("0003", 0), ("0003", 1)]
    images = [{"id": i + 1, "file_name": f"{src}_{k}.jpg", "width": 8, "height": 8}
              for i, (src, k) in enumerate(names)]  # fmt: skip
    anns = [{"id": 10 + i, "image_id": im["id"], "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4,
             "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]], "iscrowd": 0} for i, im in enumerate(images)]  # fmt: skip
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "n"}]}))
    return path


def test_held_out_sources_become_dev_and_leave_training(tmp_path):
    path = _ann(tmp_path)
    counts = write_holdout(tmp_path / "out", HoldoutConfig(str(path), ["0001", "0003"]))
    assert counts == {"train": 1, "dev": 4}
    train = json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())
    dev = json.loads((tmp_path / "out" / "annotations" / "instances_dev.json").read_text())
    assert [im["file_name"] for im in train["images"]] == ["0002_0.jpg"]
    assert [a["image_id"] for a in train["annotations"]] == [3]
    assert {source_of(im["file_name"], "_") for im in dev["images"]} == {"0001", "0003"}
    assert sorted(a["id"] for a in dev["annotations"]) == [10, 11, 13, 14]
    assert train["categories"] == dev["categories"] == [{"id": 1, "name": "n"}]


def test_holdout_errors_name_the_problem(tmp_path):
    path = _ann(tmp_path)
    with pytest.raises(HoldoutError, match=r"no image comes from source\(s\) \['0009'\]; its sources are"):
        write_holdout(tmp_path / "o", HoldoutConfig(str(path), ["0001", "0009"]))
    with pytest.raises(HoldoutError, match="leaves nothing to train on"):
        write_holdout(tmp_path / "o", HoldoutConfig(str(path), ["0001", "0002", "0003"]))
    with pytest.raises(HoldoutError, match="hold_out: name at least one"):
        HoldoutConfig(str(path), [])


def test_cli_and_config_write_the_same_split(tmp_path, capsys):
    path = _ann(tmp_path)
    assert main(["data", "holdout", str(path), "--hold-out", "0002", "--out", str(tmp_path / "cli")]) == 0
    assert "dev:" in capsys.readouterr().out
    from iuq.engine.train import prepare_data

    cfg = load_config("configs/condinst_nuclei24_dev.yaml", [
        f"data.holdout.source_ann={path}", "data.holdout.hold_out=['0002']", f"data.holdout.dir={tmp_path / 'cfg'}",
        f"data.train_ann={tmp_path / 'cfg' / 'annotations' / 'instances_train.json'}",
    ])  # fmt: skip
    prepare_data(cfg)
    for split in ("train", "dev"):
        a = (tmp_path / "cli" / "annotations" / f"instances_{split}.json").read_text()
        assert a == (tmp_path / "cfg" / "annotations" / f"instances_{split}.json").read_text()
    assert main(["data", "holdout", str(path), "--hold-out", "0042", "--out", str(tmp_path / "x")]) == 2
    assert "0042" in capsys.readouterr().err
