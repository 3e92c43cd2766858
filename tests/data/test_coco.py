import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from iuq.data.coco import CocoInstances, DatasetError
from tests.conftest import COCO_IMAGES, COCO_JSON, write_tiny_coco

SQUARE = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]  # 10x10 square polygon


def test_coco_sample_counts_match_json():
    data = json.loads(COCO_JSON.read_text())
    ds = CocoInstances(COCO_JSON, COCO_IMAGES)
    assert len(ds) == len(data["images"]) == 6  # image 250 has no annotation and is kept
    n_crowd = sum(a["iscrowd"] for a in data["annotations"])
    assert n_crowd == 3
    assert sum(len(v) for v in ds.annotations.values()) == len(data["annotations"]) - n_crowd == 62
    assert len(ds.category_ids) == 80
    assert ds.annotations[250] == []


def test_coco_sample_polygon_areas_match_coco_area():
    ds = CocoInstances(COCO_JSON, COCO_IMAGES)
    ours, theirs = [], []
    for image_id in ds.image_ids:
        target = ds.load_target(image_id)
        ours += target["masks"].flatten(1).sum(1).tolist()
        theirs += [a["area"] for a in ds.annotations[image_id]]
    ours, theirs = np.array(ours, float), np.array(theirs, float)
    # Rasterisation shifts small polygons' areas more; large instances agree to 2% each.
    large = theirs >= 2000
    assert large.sum() == 7
    assert (np.abs(ours[large] - theirs[large]) / theirs[large]).max() < 0.02
    assert abs(ours.sum() - theirs.sum()) / theirs.sum() < 0.02


def test_coco_sample_target_layout():
    ds = CocoInstances(COCO_JSON, COCO_IMAGES)
    image, target = ds[0]
    info = ds.images[target["image_id"]]
    assert image.shape == (3, info["height"], info["width"]) and image.dtype == torch.float32
    k = len(ds.annotations[target["image_id"]])
    assert target["masks"].shape == (k, info["height"], info["width"]) and target["masks"].dtype == torch.bool
    assert target["labels"].shape == (k,) and target["boxes"].shape == (k, 4)
    # Labels map back to the annotations' category ids.
    cats = [ds.category_ids[int(label)] for label in target["labels"]]
    assert cats == [a["category_id"] for a in ds.annotations[target["image_id"]]]


def test_category_ids_map_to_contiguous_labels_and_back(tmp_path):
    anns = [
        {"id": 5, "image_id": 1, "category_id": 2, "segmentation": SQUARE, "iscrowd": 0},
        {"id": 6, "image_id": 1, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0},
    ]
    ann, imgs = write_tiny_coco(tmp_path, anns)
    ds = CocoInstances(ann, imgs)
    _, t = ds[0]
    assert t["labels"].tolist() == [1, 0]
    assert [ds.category_ids[i] for i in t["labels"]] == [2, 1]


def test_three_segmentation_formats_decode_to_the_same_mask(tmp_path):
    h, w = 20, 30
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[2:12, 2:12] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))
    compressed["counts"] = compressed["counts"].decode()
    # Uncompressed RLE: column-major run lengths starting with zeros.
    flat = mask.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0},
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "segmentation": {"size": [h, w], "counts": runs},
            "iscrowd": 0,
        },
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": compressed, "iscrowd": 0},
    ]
    ann, imgs = write_tiny_coco(tmp_path, anns, size=(h, w))
    _, t = CocoInstances(ann, imgs)[0]
    assert t["masks"].shape == (3, h, w)
    for k in range(3):
        assert torch.equal(t["masks"][k], torch.from_numpy(mask).bool())
    assert t["boxes"][1].tolist() == [2.0, 2.0, 12.0, 12.0]


def test_crowd_is_not_a_target_and_empty_images_are_kept_or_dropped(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": SQUARE, "iscrowd": 1}]
    images = [
        {"id": 1, "file_name": "a.png", "height": 20, "width": 30},
        {"id": 2, "file_name": "a.png", "height": 20, "width": 30},
    ]
    ann, imgs = write_tiny_coco(tmp_path, anns, images=images)
    ds = CocoInstances(ann, imgs)
    assert len(ds) == 2
    assert ds[0][1]["masks"].shape == (0, 20, 30) and ds[0][1]["boxes"].shape == (0, 4)
    assert len(CocoInstances(ann, imgs, keep_empty=False)) == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"image_id": 9}, "annotation id 1: image_id 9 is not in 'images'"),
        ({"category_id": 7}, "annotation id 1: category_id 7 is not in 'categories'"),
        ({"segmentation": [[1.0, 2.0, 3.0]]}, "annotation id 1: malformed segmentation"),
        (
            {"segmentation": {"size": [5, 5], "counts": "abc"}},
            "annotation id 1: malformed segmentation: RLE size",
        ),
        ({"segmentation": {"size": [20, 30], "counts": [3, 4]}}, "counts sum to 7"),
        ({"segmentation": 17}, "segmentation must be a polygon list or an RLE dict"),
    ],
)
def test_bad_annotation_raises_naming_file_and_id(tmp_path, bad, message):
    ann_dict = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0, **bad}
    ann, imgs = write_tiny_coco(tmp_path, [ann_dict])
    with pytest.raises(DatasetError) as err:
        CocoInstances(ann, imgs)
    assert str(ann) in str(err.value) and message in str(err.value)


def test_skip_invalid_counts_instead_of_raising(tmp_path, caplog):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": SQUARE, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0},
    ]
    ann, imgs = write_tiny_coco(tmp_path, anns)
    ds = CocoInstances(ann, imgs, skip_invalid=True)
    assert [i for i, _ in ds.skipped.annotations] == [1]
    assert ds[0][1]["masks"].shape[0] == 1
    assert "skipped 1 invalid annotations" in caplog.text


def test_not_coco_json_and_missing_or_corrupt_image(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="not a COCO instances file"):
        CocoInstances(bad, tmp_path)
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoInstances(bad, tmp_path)

    images = [{"id": 1, "file_name": "missing.png", "height": 20, "width": 30}]
    ann, imgs = write_tiny_coco(tmp_path, [], images=images)
    with pytest.raises(DatasetError, match="missing.png: image file of image id 1 not found"):
        CocoInstances(ann, imgs)

    ann, imgs = write_tiny_coco(tmp_path, [])
    (imgs / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"1 image file\(s\) of .*a.png \(image id 1\): cannot read the image"):
        CocoInstances(ann, imgs)


def _coco_with_images(tmp_path, files: dict, size=(20, 30)) -> tuple:
    """A COCO JSON naming `files` (name -> bytes, or None for a good 8-bit PNG), one instance each."""
    import io

    from PIL import Image

    h, w = size
    folder = tmp_path / "imgs"
    folder.mkdir()
    images, anns = [], []
    for i, (name, content) in enumerate(files.items(), start=1):
        if content is None:
            buf = io.BytesIO()
            Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(buf, format="PNG")
            content = buf.getvalue()
        (folder / name).write_bytes(content)
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        anns.append({"id": i, "image_id": i, "category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return ann, folder


def test_every_bad_image_is_reported_at_once_before_training_and_skip_invalid_skips_them(tmp_path):
    import io

    from PIL import Image

    wrong = io.BytesIO()
    Image.fromarray(np.zeros((21, 30, 3), np.uint8)).save(wrong, format="PNG")
    floats = io.BytesIO()
    Image.fromarray(np.zeros((20, 30), np.float32)).save(floats, format="TIFF")
    files = {"good.png": None, "empty.png": b"", "wrong.png": wrong.getvalue(), "float.tif": floats.getvalue()}
    ann, folder = _coco_with_images(tmp_path, files)
    with pytest.raises(DatasetError) as err:
        CocoInstances(ann, folder)
    message = str(err.value)
    assert message.startswith(f"3 image file(s) of {ann} cannot be used: ")
    assert "empty.png (image id 2): cannot read the image" in message
    assert "wrong.png (image id 3): image is 30x21 but the JSON says 30x20" in message
    assert "float.tif (image id 4): floating-point pixels (mode F)" in message
    ds = CocoInstances(ann, folder, skip_invalid=True)
    assert ds.image_ids == [1] and [i for i, _ in ds.skipped.images] == [2, 3, 4]
    assert [i for i, _ in ds.skipped.annotations] == [2, 3, 4]  # their annotations go with them
    assert "its image was skipped" in ds.skipped.annotations[0][1]


def test_sixteen_bit_images_are_scaled_not_clipped_and_other_modes_converted(tmp_path):
    import io

    from PIL import Image

    from iuq.data.coco import read_image

    gray16 = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)  # up to 59900
    Image.fromarray(gray16).save(tmp_path / "g16.tif")
    image = read_image(tmp_path / "g16.tif")
    assert image.shape == (3, 20, 30)
    assert torch.allclose(image[0], torch.from_numpy(gray16.astype(np.float32) / 65535.0))
    assert torch.equal(image[0], image[2]) and float(image.max()) < 0.92  # 59900 / 65535, not white
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 30])
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[:, 0, 0].mul(255).round().tolist() == [200.0, 10.0, 30.0]
    buf = io.BytesIO()
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(buf, format="JPEG")
    (tmp_path / "c.jpg").write_bytes(buf.getvalue())
    assert float(read_image(tmp_path / "c.jpg").min()) > 0.95  # CMYK (0, 0, 0, 0) is white


def test_ids_must_be_integers(tmp_path):
    ann, imgs = write_tiny_coco(tmp_path, [], images=[{"id": "a1", "file_name": "a.png", "height": 20, "width": 30}])
    with pytest.raises(DatasetError, match=r"image id 'a1' must be an integer"):
        CocoInstances(ann, imgs)
    seg = [[1, 1, 5, 1, 5, 5]]
    ann, imgs = write_tiny_coco(tmp_path, [{"id": "x", "image_id": 1, "category_id": 1, "segmentation": seg}])
    with pytest.raises(DatasetError, match=r"annotation id x: 'id' must be an integer, got 'x'"):
        CocoInstances(ann, imgs)


def test_the_package_exports_the_dataset():
    import iuq.data

    assert iuq.data.CocoInstances is CocoInstances and iuq.data.DatasetError is DatasetError
    ds = iuq.data.CocoInstances(COCO_JSON, COCO_IMAGES)
    assert len(ds) == 6 and ds[0][0].shape[0] == 3
