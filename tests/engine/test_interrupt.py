"""Real signals: a run stopped by SIGINT, SIGTERM or SIGKILL in a subprocess resumes to the very
weights of an uninterrupted run; resume refuses another run's config; one writer per run folder."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iuq.config import ConfigError, load_config
from iuq.engine.inference import load_checkpoint
from iuq.engine.run_dir import RunDirError, RunLock
from iuq.engine.train import train
from tests.engine.test_train import tiny_data, tiny_overrides  # noqa: F401

# 8 training images, batch 4: an epoch is 2 steps, so 8 steps cross 4 epoch ends.
STEPS = {"train.max_steps": 8, "train.max_epochs": "null", "train.print_every_steps": 1, "eval.num_vis": 0}


def cli(data: Path, out: Path, *extra: str, **overrides) -> list[str]:
    sets = [a for kv in tiny_overrides(data, out, **{**STEPS, **overrides}) for a in ("--set", kv)]
    return [sys.executable, "-m", "iuq.cli", "train", *sets, "--out", str(out), *extra]


def run_until(cmd: list[str], step: int, signum: int) -> tuple[int, str]:
    """Start `cmd`, send `signum` once it reports `step`, return (exit code, its output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {step}/"):
            proc.send_signal(signum)
            break
    lines.extend(proc.stdout)
    return proc.wait(timeout=300), "".join(lines)


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(cli(tiny_data, out, **{"train.checkpoint_every_steps": 3}), check=True, capture_output=True)
    return load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and int(a["criterion.memory.count"]) > 0
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, rtol=0), key


@pytest.mark.parametrize(
    ("signum", "at_step", "code"),
    [(signal.SIGINT, 3, 130), (signal.SIGTERM, 4, 143), (signal.SIGKILL, 5, -9)],
    ids=["sigint-mid-epoch", "sigterm-at-epoch-end", "kill-9"],
)
def test_signal_then_resume_equals_the_uninterrupted_run(tiny_data, straight, tmp_path, signum, at_step, code):  # noqa: F811
    out = tmp_path / "run"
    returncode, output = run_until(cli(tiny_data, out, **{"train.checkpoint_every_steps": 3}), at_step, signum)
    assert returncode == code, output
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    if signum != signal.SIGKILL:
        assert f"resume with: iuq train --resume --out {out}" in output
        assert f"checkpoint of step {ckpt['global_step']} written" in output
    assert 0 < ckpt["global_step"] < 8
    # Resume as a user would: no config, the run's own.
    resumed = subprocess.run(
        [sys.executable, "-m", "iuq.cli", "train", "--resume", "--out", str(out)], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    chatter = resumed.stdout + resumed.stderr
    assert "will be deleted" not in chatter and "dataloader is not resumable" not in chatter
    assert "exists and is not empty" not in chatter
    assert_same_weights(straight, load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"])
    # One log row per step, those before the interruption included.
    import csv

    with open(out / "logs" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == list(range(8))


def test_resume_after_an_epoch_end_checkpoint_only(tiny_data, tmp_path):  # noqa: F811
    """Epoch-end checkpoints only: the resumed run labels and trains the next step as the straight run does."""
    straight = load_config(None, tiny_overrides(tiny_data, tmp_path / "straight", **STEPS))
    train(straight)
    out = tmp_path / "run"
    returncode, output = run_until(cli(tiny_data, out, **{"train.checkpoint_every_steps": 0}), 5, signal.SIGKILL)
    assert returncode == -9
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] in (2, 4, 6)
    train(load_config(out / "config.yaml"), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")["state_dict"]
    assert_same_weights(a, load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"])


def _rows(out: Path) -> tuple[list[int], list[int], list[tuple[int, str]]]:
    """Labels of the training-loss rows and learning-rate rows, and (label, val AP) of the val rows."""
    import csv

    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lr = next(k for k in rows[0] if k.startswith("lr-"))
    return (
        [int(r["step"]) for r in rows if r.get("train/loss")],
        [int(r["step"]) for r in rows if r.get(lr)],
        [(int(r["step"]), r["val/AP"]) for r in rows if r.get("val/AP")],
    )


def test_interrupted_runs_log_and_evaluate_at_the_straight_runs_steps(tiny_data, tmp_path):  # noqa: F811
    """Batch 2: an epoch is 4 steps, val after steps 4 and 8 (rows labelled 3 and 7). A SIGINT mid-epoch
    adds no evaluation and does not move the later ones; a resume from an epoch-end checkpoint labels
    its rows by the optimiser step, not one later."""
    every_epoch = {**STEPS, "data.batch_size": 2, "train.eval_every_epochs": 1}
    train(load_config(None, tiny_overrides(tiny_data, tmp_path / "straight", **every_epoch)))
    straight = _rows(tmp_path / "straight")
    assert straight[0] == straight[1] == list(range(8)) and [s for s, _ in straight[2]] == [3, 7]
    for name, signum, at_step, checkpoint_every in (("sigint", signal.SIGINT, 1, 0), ("kill", signal.SIGKILL, 5, 0)):
        out = tmp_path / name
        cmd = cli(tiny_data, out, **{**every_epoch, "train.checkpoint_every_steps": checkpoint_every})
        returncode, output = run_until(cmd, at_step, signum)
        assert returncode in (130, -9), output
        step = load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"]
        assert step in ((1, 2) if signum == signal.SIGINT else (4,)), step  # mid-epoch / an epoch's end
        resumed = subprocess.run(
            [sys.executable, "-m", "iuq.cli", "train", "--resume", "--out", str(out)], capture_output=True, text=True
        )
        assert resumed.returncode == 0, resumed.stderr
        assert _rows(out) == straight, name


def test_resume_with_another_config_is_refused_and_leaves_the_run_untouched(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_data, out, **{**STEPS, "train.max_steps": 2}))
    train(cfg)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = load_config(None, tiny_overrides(tiny_data, out, **{**STEPS, "model.hidden_dim": 64, "iuq.inter": False}))
    expected = r"differs from the run's own in iuq\.inter \(True -> False\), model\.hidden_dim \(32 -> 64\); resume"
    with pytest.raises(ConfigError, match=expected):
        train(other, resume=True)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    # A longer schedule of the same run is allowed (max_steps may change).
    longer = load_config(None, tiny_overrides(tiny_data, out, **{**STEPS, "train.max_steps": 3}))
    train(longer, resume=True)
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from iuq.engine.run_dir import RunLock; "
         "lock = RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=rf"in use by another iuq process \(pid {holder.pid}, started 20\d\d-"):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(tmp_path).acquire()  # the OS released the dead holder's lock
    assert f'"pid": {os.getpid()}' in (tmp_path / ".lock.owner").read_text()
    lock.release()


def test_a_run_in_an_unwritable_folder_fails_naming_it(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    from iuq.engine import run_dir

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_dir.Path, "touch", refuse)
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "ro" / "run"))
    with pytest.raises(RunDirError, match=r"--out .*ro/run: cannot write there \(Permission denied\)"):
        train(cfg)


def test_two_runs_started_together_one_is_refused(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    long_run = cli(tiny_data, out, **{"train.max_steps": 10_000})
    first = subprocess.Popen(long_run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in first.stdout:  # the first holds the lock once it prints its summary
        if line.startswith("data "):
            break
    second = subprocess.run(long_run, capture_output=True, text=True)
    first.kill()
    first.wait()
    assert second.returncode == 75  # RunInUse: `iuq ablate` leaves such a run to its holder
    assert f"is in use by another iuq process (pid {first.pid}" in second.stderr


def test_a_signal_before_the_first_step_stops_cleanly_and_the_run_can_start_again(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(tiny_data, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("out "):  # the summary's last line, printed just before training starts
            proc.send_signal(signal.SIGINT)
            break
    lines.extend(proc.stdout)
    assert proc.wait(timeout=300) == 130
    assert "iuq: SIGINT: stopped before the first step; nothing to resume, start the run again" in "".join(lines)
    assert not (out / "checkpoints" / "last.ckpt").exists()
    RunLock(out).acquire().release()  # the folder is free


def test_resume_check_fills_keys_added_since_the_checkpoint_and_names_real_differences(tmp_path):
    from iuq.engine.run_dir import check_resume_config

    cfg = load_config(None, [f"out={tmp_path}"])
    old = cfg.to_dict()
    del old["iuq"]["focal_alpha"]  # a checkpoint written before this key existed
    torch.save({"hyper_parameters": {"config": old}, "global_step": 3}, tmp_path / "last.ckpt")
    check_resume_config(cfg, tmp_path / "last.ckpt")  # the default fills the gap: no difference
    longer = load_config(None, [f"out={tmp_path}", "train.max_steps=900", "data.num_workers=0"])
    check_resume_config(longer, tmp_path / "last.ckpt")  # length and loader workers may change
    other = load_config(None, [f"out={tmp_path}", "train.seed=1", "iuq.focal_alpha=0.9"])
    with pytest.raises(ConfigError, match=r"in iuq\.focal_alpha \(0\.1 -> 0\.9\), train\.seed \(0 -> 1\); resume"):
        check_resume_config(other, tmp_path / "last.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"truncated")
    from iuq.engine.inference import CheckpointError

    with pytest.raises(CheckpointError, match="bad.ckpt: cannot be read as an iuq checkpoint"):
        check_resume_config(cfg, tmp_path / "bad.ckpt")
