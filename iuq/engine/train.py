"""`iuq train`: one run from a `RunConfig` to a run directory.

OUT/config.yaml             the resolved configuration
OUT/checkpoints/last.ckpt   model, optimiser, schedule, loop state and the IUQ memory
OUT/logs/                   metrics.csv (CSV) and TensorBoard events of every loss term
OUT/metrics.json            final COCO mask AP on the val split (keys as `iuq eval`)
OUT/timing.json             mean s/step of the training steps (evaluation left out), final step
OUT/environment.json        code commit and library versions, one record per start (iuq.engine.provenance)
OUT/model/                  the trained model, `save_pretrained` (loads in plain transformers)
OUT/predictions/*.png       a few val predictions drawn over the images
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from iuq.config import ConfigError, RunConfig, save_config
from iuq.data.coco import CocoInstances, DatasetError
from iuq.data.holdout import HoldoutConfig, write_holdout
from iuq.data.paste import PasteConfig, generate_paste
from iuq.data.synthetic import SynthConfig, generate
from iuq.engine.console import ProgressPrinter, StepTimer, run_summary, silence_third_party_noise
from iuq.engine.data import open_split, test_loader, train_loader, train_sampler
from iuq.engine.inference import TrainedModel, evaluate, predict, save_model_dir
from iuq.engine.interrupt import GracefulStop
from iuq.engine.module import IUQModule
from iuq.engine.provenance import record_start
from iuq.engine.run_dir import (
    ContinuingCSVLogger,
    LogStepFromOptimiser,
    RunLock,
    check_resume_config,
    checkpoint_step,
    ensure_writable,
)
from iuq.evaluation.coco_eval import CocoMaskEvaluator, format_table, write_metrics
from iuq.models.build import model_spec
from iuq.models.paste import paste_masks, select
from iuq.visualize import draw_instances, save_png, side_by_side


class RunData(L.LightningDataModule):
    """Train / val loaders of already opened splits; sharding follows the trainer's rank."""

    def __init__(self, cfg: RunConfig, train: CocoInstances, val: CocoInstances | None):
        super().__init__()
        self.cfg, self.train, self.val = cfg, train, val

    def train_dataloader(self):
        t = self.trainer

        def steps_done() -> int:
            return t.global_step

        return train_loader(self.train, self.cfg.data, self.cfg.train.seed, t.global_rank, t.world_size, steps_done)

    def val_dataloader(self):
        d, t = self.cfg.data, self.trainer
        return test_loader(
            self.val,
            d.test_short_side,
            d.max_size,
            self.cfg.eval.batch_size,
            d.num_workers,
            t.global_rank,
            t.world_size,
        )


def prepare_data(cfg: RunConfig) -> None:
    """Generate the embedded synthetic dataset, the pasted-object scenes or a held-out dev split when
    the config asks for them and the training annotations are absent."""
    if Path(cfg.data.train_ann).exists():
        return
    for key, spec, kind, make in (
        ("synthetic", cfg.data.synthetic, SynthConfig, generate),
        ("paste", cfg.data.paste, PasteConfig, generate_paste),
        ("holdout", cfg.data.holdout, HoldoutConfig, write_holdout),
    ):
        if spec is None:
            continue
        print(f"generating the {key} dataset into {spec.dir} ...", flush=True)
        make(spec.dir, kind(**{k: v for k, v in vars(spec).items() if k != "dir"}))
        if not Path(cfg.data.train_ann).exists():
            raise FileNotFoundError(
                f"data.train_ann {cfg.data.train_ann} is still missing after generating into data.{key}.dir "
                f"{spec.dir}; point data.train_ann into that folder"
            )
        return


def open_data(cfg: RunConfig) -> tuple[CocoInstances, CocoInstances | None]:
    d = cfg.data
    train = open_split(d.train_ann, d.train_images, d.skip_invalid, keep_empty=True)
    val = None
    if d.val_ann:
        if not d.val_images:
            raise ConfigError("data.val_images: required when data.val_ann is set")
        val = open_split(d.val_ann, d.val_images, d.skip_invalid, keep_empty=True)
        if sorted(val.category_ids) != sorted(train.category_ids):
            raise DatasetError(
                f"{d.val_ann}: categories {val.category_ids} differ from the training set's "
                f"{train.category_ids} ({d.train_ann})"
            )
    return train, val


def build_trainer(
    cfg: RunConfig, out: Path, has_val: bool, callbacks: list | None = None, resume_step: int | None = None
) -> L.Trainer:
    t = cfg.train
    # Both write checkpoints/last.ckpt (overwritten in place): one every N steps, one every epoch.
    # Lightning's own `save_last` only follows top-k saves, hence two plain "latest" checkpoints.
    checkpoints = [
        ModelCheckpoint(
            dirpath=out / "checkpoints",
            filename="last",
            enable_version_counter=False,
            every_n_train_steps=n,
            every_n_epochs=e,
            save_on_train_epoch_end=True,
        )
        for n, e in ((t.checkpoint_every_steps, 0), (None, 1))
        if n != 0
    ]
    loggers = [
        ContinuingCSVLogger(out, resume_step, flush_every=t.log_every_steps),
        TensorBoardLogger(out, name="logs", version=""),
    ]
    # The run's length is always a step count (set in `_train` from max_epochs when needed):
    # Lightning's epoch counter can be off by one after a resume from an epoch-end checkpoint, the
    # optimiser step count cannot.
    return L.Trainer(
        default_root_dir=out,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        max_epochs=-1,
        precision=t.precision,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        gradient_clip_val=t.grad_clip or None,
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every_steps,
        check_val_every_n_epoch=t.eval_every_epochs if has_val and t.eval_every_epochs > 0 else None,
        limit_val_batches=None if has_val and t.eval_every_epochs > 0 else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # our StepSampler shards and seeds by epoch itself
        callbacks=[
            *checkpoints,
            LogStepFromOptimiser(),  # before LearningRateMonitor, which logs at batch start
            LearningRateMonitor(logging_interval="step"),
            ProgressPrinter(t.print_every_steps),
            *(callbacks or []),
        ],
        logger=loggers,
        enable_model_summary=False,
        enable_progress_bar=False,  # ProgressPrinter's lines read well in terminals and log files alike
    )


def train(cfg: RunConfig, resume: bool = False, callbacks: list | None = None) -> dict[str, float] | None:
    """Train, evaluate and export one run; returns the final val metrics (None without a val split).

    callbacks: extra Lightning callbacks (early stopping, custom logging, ...).
    Raises `RunInterrupted` (after writing a checkpoint) when the run is stopped by SIGINT / SIGTERM.
    """
    out = Path(cfg.out)
    last = out / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: {last} does not exist; start the run without --resume")
        check_resume_config(cfg, last)  # before anything is written into the run directory
    ensure_writable(out)
    lock = RunLock(out) if rank_zero_only.rank == 0 else None  # the rank Lightning reads from torchrun / SLURM
    if lock is not None:
        lock.acquire()
    if not resume and last.is_file():
        if lock is not None:
            lock.release()
        raise FileExistsError(
            f"{out} already holds a run ({last}); pass --resume to continue it or --out to start a new one"
        )
    stop = GracefulStop(last, f"iuq train --resume --out {out}")
    stop.install()
    try:
        return _train(cfg, out, last, resume, stop, callbacks)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, out: Path, last: Path, resume: bool, stop, callbacks: list | None):
    silence_third_party_noise()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.tf32 and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls and convolutions on Ampere and later
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    prepare_data(cfg)
    train_set, val_set = open_data(cfg)
    module = IUQModule(cfg.to_dict(), train_set.category_ids, train_set.class_names)
    if val_set is not None:
        module.evaluator = CocoMaskEvaluator(
            val_set.ann_file, train_set.category_ids, cfg.eval.backend, cfg.eval.max_dets, cfg.eval.metric
        )
    resume_step = checkpoint_step(last) if resume else None
    timer = StepTimer()
    trainer = build_trainer(cfg, out, val_set is not None, [timer, stop, *(callbacks or [])], resume_step)
    epoch_size = train_sampler(train_set, cfg.data, cfg.train.seed).epoch_size  # > len under repeat factors
    steps_per_epoch = epoch_size // (cfg.data.batch_size * trainer.world_size)  # drop_last batches
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size: {len(train_set)} training images are fewer than one batch of "
            f"{cfg.data.batch_size} x {trainer.world_size} device(s); lower data.batch_size"
        )
    module.steps_per_epoch = steps_per_epoch
    if trainer.limit_val_batches > 0:
        # Evaluate every N optimiser steps counted from step 0, not at every k-th epoch end: an
        # interrupted run ends its epoch early and its resumed epochs would start from the
        # interruption, moving every later evaluation (and the study's late AP) off the schedule.
        trainer.val_check_interval = cfg.train.eval_every_epochs * steps_per_epoch
        trainer.check_val_every_n_epoch = None
    module.total_steps = cfg.train.max_steps or cfg.train.max_epochs * steps_per_epoch
    trainer.fit_loop.epoch_loop.max_steps = module.total_steps
    if trainer.is_global_zero:
        save_config(cfg, out / "config.yaml")
        record_start(out, resume_step or 0)
        device = str(trainer.strategy.root_device)
        print(run_summary(cfg, len(train_set), len(val_set) if val_set else None, device, trainer.world_size))
    trainer.fit(
        module, datamodule=RunData(cfg, train_set, val_set), ckpt_path=last if resume else None, weights_only=True
    )
    stop.restore()  # from here a signal interrupts at once: the final checkpoint is written below
    if stop.stopping:  # SIGINT / SIGTERM: the checkpoint is written, no evaluation or export
        raise stop.interrupted(trainer.global_step, saved=True)
    trainer.save_checkpoint(last, weights_only=False)  # the final state, also when max_steps ends mid-epoch
    if not trainer.is_global_zero:
        return None
    with open(out / "timing.json", "w") as f:  # read by `iuq ablate`; s/step of this process's steps
        timing = {"timed_steps": timer.timed_steps, "s_per_step": timer.seconds_per_step, "steps": trainer.global_step}
        json.dump(timing, f)
    # Lightning's teardown has moved the model back to the CPU; evaluate where it trained.
    return finish(cfg, module, val_set, out, trainer.strategy.root_device)


def finish(
    cfg: RunConfig, module: IUQModule, val_set: CocoInstances | None, out: Path, device: torch.device | None = None
) -> dict[str, float] | None:
    """Export the model, score it on the val split and draw a few predictions (rank 0), on `device`
    (default: where the model's weights are)."""
    d = cfg.data
    device = device if device is not None else next(module.model.parameters()).device
    adapter = module.model.to(device).eval()
    save_model_dir(adapter, out / "model", module.label_to_category, module.class_names, d.test_short_side, d.max_size)
    print(f"model written to {out / 'model'} ({model_spec(cfg.model).export_note})")
    if val_set is None:
        return None
    trained = TrainedModel(
        adapter, module.label_to_category, module.class_names, d.test_short_side, d.max_size, cfg.eval.detections
    )
    metrics, _ = evaluate(
        trained,
        val_set,
        cfg.eval.batch_size,
        backend=cfg.eval.backend,
        device=device,
        max_dets=cfg.eval.max_dets,
        metric=cfg.eval.metric,
    )
    write_metrics(metrics, out / "metrics.json")
    draw_predictions(trained, val_set, out / "predictions", cfg.eval.num_vis, cfg.eval.vis_threshold, device)
    print(format_table(metrics))
    print(f"run directory: {out.resolve()}  (metrics.json, model/, checkpoints/last.ckpt, logs/, predictions/)")
    return metrics


def draw_predictions(
    trained: TrainedModel, dataset: CocoInstances, out: Path, num: int, threshold: float, device
) -> None:
    """predictions/<image id>.png for the first `num` images: ground truth beside the predictions
    scoring at least `threshold`."""
    out.mkdir(parents=True, exist_ok=True)
    loader = test_loader(dataset, trained.short_side, trained.max_size, batch_size=1)
    for i, batch in enumerate(loader):
        if i >= num:
            break
        pred = predict(trained, batch, device)[0]
        keep = pred["scores"] >= threshold
        kept = select(pred, keep)
        masks = paste_masks(kept).cpu()
        image_id = batch["targets"][0]["image_id"]
        image = dataset.load_image(image_id)
        truth = dataset.load_target(image_id)
        panels = [
            (
                f"ground truth ({len(truth['labels'])})",
                draw_instances(image, truth["masks"], truth["labels"], trained.class_names),
            ),
            (
                f"prediction ({int(keep.sum())} with score >= {threshold:g})",
                draw_instances(image, masks, kept["labels"].cpu(), trained.class_names, kept["scores"].cpu()),
            ),
        ]
        save_png(side_by_side(panels), out / f"{image_id}.png")
