import json

from iuq.cli import main
from tests.conftest import COCO_IMAGES, COCO_JSON
from tests.engine.test_train import tiny_data, tiny_overrides  # noqa: F401 (fixture)


def test_eval_of_ground_truth_results_is_100(tmp_path, capsys):
    pred, out = tmp_path / "r.json", tmp_path / "m.json"
    assert main(["data", "as-results", str(COCO_JSON), "--images", str(COCO_IMAGES), "--out", str(pred)]) == 0
    assert len(json.loads(pred.read_text())) == 62
    assert main(["eval", "--gt", str(COCO_JSON), "--pred", str(pred), "--out", str(out)]) == 0
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


def test_train_eval_predict(tiny_data, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    overrides = [a for kv in tiny_overrides(tiny_data, run, **{"train.max_epochs": 1}) for a in ("--set", kv)]
    assert main(["train", *overrides]) == 0
    out = capsys.readouterr().out
    assert "COCO mask AP" in out and str(run.resolve()) in out
    for name in (
        "config.yaml",
        "checkpoints/last.ckpt",
        "metrics.json",
        "model/config.json",
        "model/model.safetensors",
        "model/preprocessor_config.json",
        "logs/metrics.csv",
    ):
        assert (run / name).is_file(), name
    assert len(list((run / "predictions").glob("*.png"))) == 1
    header = (run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    for term in ("loss_cross_entropy", "loss_mask", "loss_dice", "loss_inter", "loss_equi", "memory_fill"):
        assert f"train/{term}" in header, term
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}

    # A second `iuq train` into the same directory refuses to overwrite the run.
    assert main(["train", *overrides]) == 2
    assert "--resume" in capsys.readouterr().err

    # The checkpoint and the exported model give the same metrics, equal to the run's own.
    data = ["--data", str(tiny_data / "annotations" / "instances_val.json"), "--images", str(tiny_data / "val")]
    for model in (run / "checkpoints" / "last.ckpt", run / "model"):
        assert main(["eval", str(model), *data, "--out", str(tmp_path / "m.json"), "--device", "cpu"]) == 0
        assert json.loads((tmp_path / "m.json").read_text()) == metrics

    images = sorted((tiny_data / "val").glob("*.png"))
    pred = tmp_path / "pred"
    assert main(["predict", str(run / "model"), *map(str, images), "--out", str(pred), "--device", "cpu"]) == 0
    assert sorted(p.name for p in pred.glob("*.png")) == sorted(p.name for p in images)
    results = json.loads((pred / "results.json").read_text())
    assert results and {r["image_id"] for r in results} == {1, 2}
    assert {"segmentation", "score", "category_id", "file_name"} <= set(results[0])


def test_config_typo_fails_before_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_szie: 4\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "data.batch_szie" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_from_a_pretrained_checkpoint_is_quiet_and_trains_every_module(tiny_data, tmp_path, capfd, caplog):  # noqa: F811
    """model.pretrained (from_pretrained gives an eval-mode model): no eval-mode warning, no
    third-party noise; the run prints its summary, progress and the AP table."""
    import warnings

    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    from iuq.models.backbones import timm_backbone_config

    config = Mask2FormerConfig(
        backbone_config=timm_backbone_config("efficientnet_lite0"),
        num_labels=3,
        num_queries=6,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(tmp_path / "m2f")
    capfd.readouterr()
    caplog.clear()
    run = tmp_path / "run"
    extra = {"train.max_epochs": "null", "train.max_steps": 4, "train.print_every_steps": 2}
    overrides = [a for kv in tiny_overrides(tiny_data, run, **extra) for a in ("--set", kv)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", *overrides, "--set", f"model.pretrained={tmp_path / 'm2f'}"]) == 0
    out, err = capfd.readouterr()
    text = out + err + "\n".join(r.getMessage() for r in caplog.records) + "\n".join(str(w.message) for w in caught)
    for noise in (
        "eval mode",
        "is not a supported model",
        "litlogger",
        "LeafSpec",
        "GPU available",
        "TPU available",
        "Trainer.fit` stopped",
        "Writing model shards",
        "Loading weights",
    ):
        assert noise not in text, noise
    assert f"model    Mask2Former, 6 queries, whole checkpoint {tmp_path / 'm2f'}" in out
    assert "step 2/4" in out and "step 4/4" in out and "COCO mask AP" in out


def test_a_corrupt_training_image_stops_the_run_with_one_line(tiny_data, tmp_path, capsys):  # noqa: F811
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "train").glob("*.png"))[0]
    content = victim.read_bytes()
    victim.write_bytes(content[:40])  # no complete header: found before training starts
    extra = {"data.num_workers": 1, "train.max_epochs": 1}
    overrides = [a for kv in tiny_overrides(data, tmp_path / "run", **extra) for a in ("--set", kv)]
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("iuq: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"{victim.name} (image id " in lines[0] and "cannot read the image" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    # A header that reads but pixel data cut short is found when the image is loaded, in a loader worker.
    victim.write_bytes(content[: len(content) // 2])
    overrides = [a for kv in tiny_overrides(data, tmp_path / "run2", **extra) for a in ("--set", kv)]
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("iuq: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert victim.name in lines[0] and "cannot read image id" in lines[0]
