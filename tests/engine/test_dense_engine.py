"""CondInst and SOLOv2 through the unchanged engine: resume, checkpoints, export, eval, DDP."""

import json
import subprocess
import sys

import pytest
import torch

from iuq.cli import main
from iuq.config import load_config
from iuq.data.coco import CocoInstances
from iuq.engine.inference import evaluate, load_checkpoint, load_trained
from iuq.engine.train import train
from tests.engine.test_train import KillAtStep, tiny_data, tiny_overrides  # noqa: F401 (fixture)
from tests.models.test_dense_training import DENSE, HEADS

M2F_ONLY = ("model.num_queries", "model.hidden_dim", "model.mask_feature_size", "model.encoder_layers",
            "model.decoder_layers", "model.heads", "model.ffn_dim", "model.train_num_points")  # fmt: skip


def dense_overrides(kind, data, out, **extra) -> list[str]:
    keep = [kv for kv in tiny_overrides(data, out, **extra) if kv.split("=")[0] not in M2F_ONLY]
    return [*keep, f"model.type={kind}", *HEADS[kind]]


@pytest.mark.parametrize("kind", [*DENSE, "queryinst"])
def test_resume_checkpoint_export_and_eval(kind, tiny_data, tmp_path):  # noqa: F811
    every_step = {"train.checkpoint_every_steps": 1, "train.eval_every_epochs": 1}
    straight = load_config(None, dense_overrides(kind, tiny_data, tmp_path / "straight", **every_step))
    metrics = train(straight)
    killed = load_config(None, dense_overrides(kind, tiny_data, tmp_path / "killed", **every_step))
    with pytest.raises(SystemExit):
        train(killed, callbacks=[KillAtStep(3)])
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.ckpt")["global_step"] == 3
    train(killed, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert "hf_config" not in a  # the architecture is the run config's
    assert int(a["state_dict"]["criterion.memory.count"]) > 0
    for key in a["state_dict"]:
        assert torch.allclose(a["state_dict"][key].float(), b["state_dict"][key].float(), atol=1e-6, rtol=0), key
    # The final metrics, the checkpoint and the exported model/ all score the same on the val split.
    val = CocoInstances(tiny_data / "annotations" / "instances_val.json", tiny_data / "val")
    assert json.loads((tmp_path / "straight" / "metrics.json").read_text()) == pytest.approx(metrics)
    for source in (tmp_path / "straight" / "checkpoints" / "last.ckpt", tmp_path / "straight" / "model"):
        scored, _ = evaluate(load_trained(source), val)
        assert scored == pytest.approx(metrics, abs=1e-9), source
    # The CLI on the run directory itself: eval on its own val split, predict with its model.
    run = tmp_path / "straight"
    assert main(["eval", str(run), "--out", str(tmp_path / "m.json"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(metrics, abs=1e-9)
    images = sorted((tiny_data / "val").glob("*.png"))
    assert main(["predict", str(run), *map(str, images), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == sorted(p.name for p in images)


def test_two_process_ddp_condinst(tiny_data, tmp_path):  # noqa: F811
    run = tmp_path / "ddp"
    overrides = dense_overrides("condinst", tiny_data, run, **{
        "train.max_epochs": 1, "train.accelerator": "cpu", "train.devices": 2, "train.strategy": "ddp",
        "train.eval_every_epochs": 1, "data.batch_size": 2, "train.threads": 1,
    })  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "iuq.cli",
           "train", *[a for kv in overrides for a in ("--set", kv)]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    count = int(state["criterion.memory.count"])
    assert len(set(state["criterion.memory.image_ids"][:count].tolist())) > 4  # both ranks' images
    assert set(json.loads((run / "metrics.json").read_text())) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
