"""What a run prints: its own summary, progress and results, without third-party chatter.

Each filter below drops one known message by its text, nothing broader, so warnings about the
user's data or configuration (and any new third-party warning) still reach the console.
"""

from __future__ import annotations

import logging
import re
import time
import warnings

import lightning as L

from iuq.models.build import model_spec

# (logger name, message pattern) of log records that say nothing about the user's run.
_NOISE = [
    # Mask2Former's config lists Swin as its only tested backbone; ResNet and timm backbones work
    # (tests/models run and export them), so this note is a false alarm for every other backbone.
    ("transformers.models.mask2former.configuration_mask2former", r"Backbone \S+ is not a supported model"),
    # Lightning's hardware lines and an advertisement; the run prints its own device line.
    ("lightning.pytorch.utilities.rank_zero", r"^(GPU|TPU|HPU) available: "),
    ("lightning.pytorch.utilities.rank_zero", r"^💡 Tip: "),
    # The run's own progress line already says the last step was reached.
    ("lightning.pytorch.utilities.rank_zero", r"^`Trainer.fit` stopped: `max_(steps|epochs)=\d+` reached"),
]

# (category, message pattern) of Python warnings raised inside libraries, not by the user's input.
_NOISE_WARNINGS = [
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning 2.6 on torch 2.14
    # Lightning's advice to raise num_workers on a loader we size on purpose (CPU runs share cores).
    (UserWarning, r"The '\w+_dataloader' does not have many workers"),
    # The train loader resumes from the optimiser step (`StepSampler`), which Lightning cannot see.
    (UserWarning, r"You.re resuming from a checkpoint that ended before the epoch ended and your dataloader"),
    # A resumed run writes into its own checkpoint folder on purpose (a new run there is refused).
    (UserWarning, r"Checkpoint directory .* exists and is not empty"),
]


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_third_party_noise() -> None:
    """Install the filters; calling it again installs nothing twice (and restores warning filters
    that a `warnings.catch_warnings` block has since reset)."""
    for name, pattern in _NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessages(pattern))
    for category, pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)  # replaces an equal entry
    # transformers draws a progress bar for every save and load of a few-MB model ("Writing model
    # shards", "Loading weights"); the run reports those steps in its own lines.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_summary(cfg, train_size: int, val_size: int | None, device: str, world_size: int) -> str:
    """The few lines a run opens with: data, model, method, schedule, where it runs."""
    m, t, d, q = cfg.model, cfg.train, cfg.data, cfg.iuq
    if m.pretrained:
        start = f"whole checkpoint {m.pretrained}"
    elif m.backbone == "hf":
        start = f"backbone {m.backbone_checkpoint}"
    elif m.backbone in ("resnet50", "resnet101") and m.backbone_checkpoint:
        start = f"{m.backbone} ({m.backbone_checkpoint})"
    elif m.backbone.startswith("efficientnet") or m.backbone in ("resnet50", "resnet101"):
        start = f"{m.backbone} ({'ImageNet weights' if m.backbone_weights == 'imagenet' else 'random init'})"
    else:
        start = f"{m.backbone} (random init)"
    head = model_spec(m).describe(m)
    terms = [name for name, on in (("L_inter", q.inter), ("L_equi", q.equi)) if on]
    length = f"{t.max_steps} steps" if t.max_steps is not None else f"{t.max_epochs} epochs"
    val = f", val {val_size} images" if val_size is not None else ", no val split"
    return "\n".join(
        [
            f"data     train {train_size} images{val}; batch {d.batch_size} x {world_size} device(s)",
            f"model    {head}, {start}{', frozen BN' if m.freeze_bn else ''}"
            f"{f', stem + {m.frozen_stages()} stage(s) frozen' if m.frozen_stages() else ''}",
            f"method   {'IUQ: ' + ' + '.join(terms) if terms else 'baseline (IUQ off)'}",
            f"train    {length}, {t.optimizer} lr {t.lr:g} (backbone x{t.backbone_lr_mult:g}), {t.schedule}, "
            f"warm-up {t.warmup_steps}, seed {t.seed}, on {device}",
            f"out      {cfg.out}",
        ]
    )


class ProgressPrinter(L.Callback):
    """Plain progress lines (step, loss, speed, time left, val AP), readable in a terminal and in a
    log file alike; replaces Lightning's progress bar, which writes nothing useful to a file."""

    def __init__(self, every: int):
        self.every = every
        self._t0: float | None = None
        self._s0 = 0

    def on_train_start(self, trainer, module) -> None:
        self._t0, self._s0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self._t0 is None or step % self.every or step == self._s0:
            return
        rate = (time.perf_counter() - self._t0) / (step - self._s0)  # s per step since this process began
        total = getattr(module, "total_steps", None) or int(trainer.estimated_stepping_batches)
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f"  loss {float(loss):.3f}" if loss is not None else ""
        # The data epoch of the step just done (Lightning's own counter can lag after a resume).
        per_epoch = getattr(module, "steps_per_epoch", None)
        epoch = (step - 1) // per_epoch if per_epoch else trainer.current_epoch
        print(
            f"step {step}/{total}  epoch {epoch}{loss_text}  {rate:.2f} s/step  "
            f"{max(total - step, 0) * rate / 60:.1f} min left",
            flush=True,
        )

    def on_validation_end(self, trainer, module) -> None:
        ap = trainer.callback_metrics.get("val/AP")
        if trainer.is_global_zero and ap is not None and not trainer.sanity_checking:
            print(f"step {trainer.global_step}  val AP {float(ap):.2f}", flush=True)


class StepTimer(L.Callback):
    """Mean wall time of a training step (forward, backward, optimiser; evaluation left out), over
    the steps of this process after the first `skip` (warm-up: allocations, lazy inits); over all of
    them when the run is shorter than that."""

    def __init__(self, skip: int = 3):
        self.skip, self.times = skip, []
        self._t: float | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._t is not None:
            self.times.append(time.perf_counter() - self._t)

    @property
    def timed_steps(self) -> int:
        return len(self.times[self.skip :] or self.times)

    @property
    def seconds_per_step(self) -> float | None:
        times = self.times[self.skip :] or self.times
        return sum(times) / len(times) if times else None
