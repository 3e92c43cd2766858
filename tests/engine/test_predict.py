"""Prediction at any image size: masks pasted in chunks equal masks pasted at once; `iuq predict`
on folders, bad images and thresholds."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import iuq.models.paste as paste
from iuq.cli import main
from iuq.engine.inference import TrainedModel
from iuq.engine.predict import predict_files
from iuq.evaluation.coco_eval import CocoMaskEvaluator, encode_masks
from iuq.models.interface import SegmenterOutput
from iuq.models.mask2former import instance_predictions
from iuq.models.paste import low_res_prediction, mask_chunks, masks_to_image, paste_masks
from tests.conftest import COCO_JSON


def _prediction(n=7, seed=0, orig=(90, 70)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, 8, generator=g) * 4  # stride 4 on a 40 x 32 padded input
    return low_res_prediction(logits, torch.rand(n, generator=g), torch.zeros(n, dtype=torch.long), 4, (37, 30), orig)


def test_chunks_of_one_instance_equal_pasting_all_at_once(monkeypatch):
    pred = _prediction()
    whole = masks_to_image(pred["mask_logits"], 4, (37, 30), (90, 70)) > 0  # threshold 0.5
    monkeypatch.setattr(paste, "PASTE_BUDGET", 90 * 70)  # one instance per chunk
    chunks = list(mask_chunks(pred))
    assert [s for s, _ in chunks] == list(range(7)) and all(len(m) == 1 for _, m in chunks)
    assert torch.equal(torch.cat([m for _, m in chunks]), whole)
    assert torch.equal(paste_masks(pred), whole)
    assert paste_masks(pred, (45, 35)).shape == (7, 45, 35)


def test_mask2former_scores_do_not_depend_on_the_chunk_size(monkeypatch):
    g = torch.Generator().manual_seed(1)
    head = {"mask_logits": torch.randn(1, 5, 8, 8, generator=g) * 3, "class_logits": torch.randn(1, 5, 4, generator=g)}
    out = SegmenterOutput(None, {}, None, torch.zeros(1, 1, 8, 8), 4, head=head)
    (big,) = instance_predictions(out, sizes=[(32, 28)], orig_sizes=[(64, 56)], top_k=6)
    monkeypatch.setattr(paste, "PASTE_BUDGET", 64 * 56 * 2)  # two instances per chunk
    (small,) = instance_predictions(out, sizes=[(32, 28)], orig_sizes=[(64, 56)], top_k=6)
    assert torch.equal(big["scores"], small["scores"])
    # ... and equal the whole-image formula: class prob x mean mask prob inside the mask.
    logits = masks_to_image(big["mask_logits"], 4, (32, 28), (64, 56))
    inside = (logits.sigmoid() * (logits > 0)).flatten(1).sum(1) / (logits > 0).flatten(1).sum(1).clamp(min=1)
    probs = out.head["class_logits"][0].softmax(-1)[:, :3].flatten().topk(6).values
    torch.testing.assert_close(big["scores"], probs * inside)


def test_evaluator_encodes_chunks_as_it_would_the_whole_masks(monkeypatch):
    pred = _prediction(n=5, orig=(480, 640))
    monkeypatch.setattr(paste, "PASTE_BUDGET", 480 * 640 * 2)
    evaluator = CocoMaskEvaluator(COCO_JSON, [1, 2, 3])
    evaluator.process([34], [pred])
    rles = [r["segmentation"] for r in evaluator.results]
    assert rles == encode_masks(masks_to_image(pred["mask_logits"], 4, (37, 30), (480, 640)) > 0)


class _FixedModel(torch.nn.Module):
    """Predicts one square in the centre of every image (score 0.9) and a faint one (0.2)."""

    stride = 4

    def predict_instances(self, images, pixel_mask, sizes, orig_sizes, top_k=100):
        out = []
        for i in range(images.shape[0]):
            logits = torch.full((2, images.shape[-2] // 4, images.shape[-1] // 4), -10.0)
            h, w = sizes[i][0] // 4, sizes[i][1] // 4
            logits[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 10.0
            scores, labels = torch.tensor([0.9, 0.2]), torch.zeros(2, dtype=torch.long)
            out.append(low_res_prediction(logits, scores, labels, 4, sizes[i], orig_sizes[i]))
        return out


def _trained():
    return TrainedModel(_FixedModel(), [7], ["thing"], short_side=64, max_size=96)


def test_predict_files_takes_folders_skips_non_images_and_names_bad_images(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((300, 200, 3), 120, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((90, 160, 3), 30, np.uint8)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    report = predict_files(_trained(), [folder], tmp_path / "out", threshold=0.5)
    assert [p.name for p in report.skipped] == ["notes.txt"]
    assert "notes.txt: not an image file" in capsys.readouterr().err
    assert [p.name for p, _ in report.failed] == ["broken.png"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["file_name"].rsplit("/", 1)[-1] for r in results] == ["a.png", "a.png", "b.jpg", "b.jpg"]
    assert [r["score"] for r in results] == pytest.approx([0.9, 0.2, 0.9, 0.2])
    assert [r["image_id"] for r in results] == [1, 1, 2, 2]  # positions in the sorted folder: a, b, (broken)
    assert results[0]["segmentation"]["size"] == [300, 200] and results[2]["segmentation"]["size"] == [90, 160]
    assert results[0]["category_id"] == 7
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "b.png"]


def test_overlays_of_large_photos_are_capped(tmp_path):
    Image.fromarray(np.zeros((2500, 3000, 3), np.uint8)).save(tmp_path / "big.png")
    report = predict_files(_trained(), [tmp_path / "big.png"], tmp_path / "out")
    assert report.results[0]["segmentation"]["size"] == [2500, 3000]  # results at the original size
    with Image.open(tmp_path / "out" / "big.png") as im:
        assert max(im.size) <= 2048 + 64  # the preview (plus the title's margin)


def test_predict_cli_checks_threshold_and_reports_bad_images_after_writing_results(tmp_path, capsys, monkeypatch):
    import iuq.engine.inference as inference

    Image.fromarray(np.full((40, 40, 3), 9, np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"")
    monkeypatch.setattr(inference, "load_trained", lambda path: _trained())
    assert main(["predict", "RUN", str(tmp_path / "ok.png"), "--out", str(tmp_path / "o"), "--threshold", "1.5"]) == 2
    assert "--threshold: must be in [0, 1], got 1.5" in capsys.readouterr().err
    code = main(["predict", "RUN", str(tmp_path / "bad.png"), str(tmp_path / "ok.png"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "1 image(s) could not be read" in err and "bad.png" in err
    assert len(json.loads((tmp_path / "o" / "results.json").read_text())) == 2
    with pytest.raises(SystemExit):
        main(["predict"])
