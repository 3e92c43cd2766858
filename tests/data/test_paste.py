"""Pasted real-object scenes: deterministic by seed, split by source image, visible masks exact."""

import hashlib
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from iuq.cli import main
from iuq.config import load_config
from iuq.data.paste import PasteConfig, PasteError, generate_paste
from iuq.engine.train import prepare_data


def _source(synth_dir):
    return str(synth_dir / "annotations" / "instances_train.json"), str(synth_dir / "train")


def _cfg(synth_dir, **kw):
    ann, images = _source(synth_dir)
    base = {"coco_ann": ann, "coco_images": images, "size": 64, "scenes": [6, 3, 3], "min_instances": 3,
            "min_object_px": 40, "source_split": [0.5, 0.25, 0.25]}  # fmt: skip
    return PasteConfig(**{**base, **kw})


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_same_seed_same_bytes_other_seed_other_scenes(synth_dir, tmp_path):
    generate_paste(tmp_path / "a", _cfg(synth_dir))
    generate_paste(tmp_path / "b", _cfg(synth_dir))
    generate_paste(tmp_path / "c", _cfg(synth_dir, seed=1))
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 6 + 3 + 3 + 4  # 12 scenes, 3 instance files, sources.json
    assert a != c


def test_splits_share_no_source_image_and_masks_are_exact(synth_dir, tmp_path):
    out = tmp_path / "p"
    manifest = generate_paste(out, _cfg(synth_dir))
    src = json.loads(open(_source(synth_dir)[0]).read())
    splits = [set(manifest["source_images"][s]) for s in ("train", "dev", "val")]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert set().union(*splits) == {im["id"] for im in src["images"]}
    assert [len(s) for s in splits] == [4, 2, 2]  # 8 source images split 0.5 / 0.25 / 0.25
    names = {c["id"]: c["name"] for c in src["categories"]}
    for split in ("train", "dev", "val"):
        data = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in data["categories"]] == manifest["classes"]
        assert {a["category_id"] for a in data["annotations"]} <= {c["id"] for c in data["categories"]}
        assert set(manifest["classes"]) <= set(names.values())
        for image in data["images"]:
            assert Image.open(out / split / image["file_name"]).size == (64, 64)
            anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            masks = np.stack([mask_utils.decode(a["segmentation"]) for a in anns]) if anns else np.zeros((0, 64, 64))
            assert (masks.sum(0) <= 1).all()  # visible parts never overlap
            for a, m in zip(anns, masks, strict=True):
                assert a["area"] == int(m.sum()) > 0
                ys, xs = np.nonzero(m)
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_impossible_class_threshold_is_a_clear_error(synth_dir, tmp_path):
    with pytest.raises(PasteError, match="no class of .* has 1000 cut-outs"):
        generate_paste(tmp_path / "p", _cfg(synth_dir, min_instances=1000))
    with pytest.raises(PasteError, match="does not exist"):
        generate_paste(tmp_path / "p", _cfg(synth_dir, coco_images=str(tmp_path / "nowhere")))
    with pytest.raises(PasteError, match="paste objects"):
        _cfg(synth_dir, objects=[3, 1])


def test_cli_and_config_build_the_same_dataset(synth_dir, tmp_path, capsys):
    ann, images = _source(synth_dir)
    args = ["data", "paste", "--coco", ann, "--images", images, "--out", str(tmp_path / "cli"), "--size", "64",
            "--train", "6", "--dev", "3", "--val", "3", "--min-instances", "3", "--min-object-px", "40"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "classes kept" in printed and "train:" in printed and "source images" in printed
    sets = [f"data.paste.coco_ann={ann}", f"data.paste.coco_images={images}", "data.paste.size=64",
            "data.paste.scenes=[6,3,3]", "data.paste.min_instances=3", "data.paste.min_object_px=40",
            f"data.paste.dir={tmp_path / 'cfg'}",
            f"data.train_ann={tmp_path / 'cfg' / 'annotations' / 'instances_train.json'}"]  # fmt: skip
    cfg = load_config("configs/condinst_paste.yaml", sets)
    prepare_data(cfg)
    assert _digest(tmp_path / "cli") == _digest(tmp_path / "cfg")
