"""A run directory's guards: one writer at a time, a resume that cannot mix runs, logs that continue.

Everything here happens before a run writes anything into its directory, so a refused command
leaves the directory exactly as it was.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from iuq.config import ConfigError, RunConfig, from_dict


class RunDirError(ValueError):
    """The run directory cannot be used as asked (locked, not writable, another run's)."""


class RunInUse(RunDirError):
    """Another process holds the run directory's lock. `iuq train` exits with `exit_code` (EX_TEMPFAIL
    of sysexits.h) so that `iuq ablate` can tell "someone else trains this run" from a failed run."""

    exit_code = 75


# Keys a resumed run may change: how long it runs, where and how it prints, evaluates and loads
# data. Everything else (model, data, IUQ, seed, optimiser) decides the weights, so it must match.
_RESUMABLE_PREFIXES = ("train.max_steps", "train.max_epochs", "train.devices", "train.num_nodes",
                       "train.accelerator", "train.strategy", "train.threads", "train.print_every_steps",
                       "train.log_every_steps", "train.checkpoint_every_steps", "train.eval_every_epochs",
                       "train.log_grad_share_every", "data.num_workers", "eval.", "out")  # fmt: skip


def ensure_writable(out: Path) -> None:
    """Create `out` (and its parents) or fail with one line naming it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise RunDirError(
            f"--out {out}: cannot write there ({err.strerror or err}); choose a folder you can write to"
        ) from err


class RunLock:
    """An exclusive lock on a run directory (`OUT/.lock`, an OS file lock through `filelock`).

    The OS releases the lock when its holder exits, however it exits (kill -9 included), so a lock
    left by a dead process is simply taken over. `OUT/.lock.owner` says who holds it, for the
    message a second writer gets.

    `claim=True` is the lock `iuq ablate` holds while its `iuq train` child runs: a file beside the
    run directory (`.<name>.claim`), so that it covers the seconds before the child takes `OUT/.lock`
    and survives the removal of a run directory that failed before its first checkpoint.
    """

    def __init__(self, out: Path, claim: bool = False):
        self.out = out
        path = out.with_name(f".{out.name}.claim") if claim else out / ".lock"
        self._lock = FileLock(str(path))
        self._owner = path.with_name(path.name + ".owner")

    def acquire(self) -> RunLock:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise RunInUse(f"{self.out} is in use by {self.holder()}; wait for it or use another --out") from None
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        self._owner.write_text(json.dumps({"pid": os.getpid(), "started": started}))
        return self

    def holder(self) -> str:
        try:
            info = json.loads(self._owner.read_text())
            return f"another iuq process (pid {info['pid']}, started {info['started']})"
        except (OSError, ValueError, KeyError):
            return "another iuq process"

    def release(self) -> None:
        if self._lock.is_locked:
            self._owner.unlink(missing_ok=True)
            self._lock.release()


def checkpoint_config(path: Path) -> dict:
    """The run config a checkpoint was trained with."""
    return dict(_checkpoint_field(path, "hyper_parameters")["config"])


def checkpoint_step(path: Path) -> int:
    """The optimiser step a checkpoint was written at."""
    return int(_checkpoint_field(path, "global_step"))


def _checkpoint_field(path: Path, key: str):
    """One entry of a checkpoint, memory-mapped (the weights are not read)."""
    from iuq.engine.inference import CheckpointError

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[key]
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot be read as an iuq checkpoint ({type(e).__name__}: {e})") from e


def config_differences(saved: dict, given: dict) -> list[str]:
    """Dotted keys whose values differ between two config trees, except those a resume may change."""
    flat_saved, flat_given = _flatten(saved), _flatten(given)
    keys = sorted(set(flat_saved) | set(flat_given))
    return [k for k in keys if flat_saved.get(k) != flat_given.get(k) and not k.startswith(_RESUMABLE_PREFIXES)]


def check_resume_config(cfg: RunConfig, last: Path) -> None:
    """Refuse to resume `last` with a config that would train another model or on other data."""
    saved = checkpoint_config(last)
    try:  # keys added to iuq since the checkpoint was written take their defaults, as on load
        saved = from_dict(RunConfig, saved).to_dict()
    except ConfigError:
        pass  # a key since removed: compare as saved, the difference is then named
    differing = config_differences(saved, cfg.to_dict())
    if differing:
        shown = ", ".join(f"{k} ({_get(saved, k)!r} -> {_get(cfg.to_dict(), k)!r})" for k in differing[:6])
        more = f" and {len(differing) - 6} more" if len(differing) > 6 else ""
        raise ConfigError(
            f"--resume: the config differs from the run's own in {shown}{more}; resume with "
            f"`iuq train --resume --out {cfg.out}` (no config: the run's own) or start a new run with another --out"
        )


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; this one keeps the rows
    of the steps before `resume_step` (those after it are about to be replayed) and appends."""

    def __init__(self, log_dir: str, resume_step: int | None):
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by the base class's __init__
        path = Path(self.metrics_file_path)
        if self._resume_step is None or not path.is_file():
            path.unlink(missing_ok=True)
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") and int(float(r["step"])) < self._resume_step]
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = sorted(keys)


class ContinuingCSVLogger(CSVLogger):
    """`OUT/logs/metrics.csv`, one file across resumes, each step once; flushed at every log step so
    a killed run loses no row its checkpoint covers."""

    def __init__(self, out: Path, resume_step: int | None, flush_every: int):
        super().__init__(out, name="logs", version="", flush_logs_every_n_steps=flush_every)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._resume_step)
        return self._experiment


class LogStepFromOptimiser(L.Callback):
    """Log rows labelled by the optimiser step, also after a resume.

    Lightning labels rows with its own count of batches that stepped. Resumed from a checkpoint
    written at an epoch's end, that count comes back one ahead of the optimiser step, and every
    later row (training losses, val AP) would be labelled one step late. We take one optimiser
    step per batch (no gradient accumulation), so the two counts are equal by definition; this
    sets Lightning's to ours before each batch (after its loop's own restart bookkeeping).
    """

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
