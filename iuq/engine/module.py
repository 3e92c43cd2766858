"""The LightningModule: a base segmenter (`model.type`) trained with or without IUQ.

Per step: `iuq.engine.step.training_step` (views, one forward, base + IUQ losses), a finiteness
check of every term, logging, and, after the optimiser step, the memory update. The randomness of a
step (the model's point sampling, G, pixel sampling) is seeded from (seed, global step, rank), so a
run resumed from a checkpoint replays the same steps as an uninterrupted one.
"""

from __future__ import annotations

import functools
import math

import lightning as L
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from iuq.config import ConfigError, RunConfig, from_dict
from iuq.engine.step import build_criterion, check_finite, training_step
from iuq.evaluation.coco_eval import CocoMaskEvaluator, evaluate_results
from iuq.models.build import build_model
from iuq.models.interface import batch_instances


def lr_factor(step: int, total: int, cfg) -> float:
    """Multiplier of the base lr at optimiser step `step` of `total` (warm-up, then the schedule)."""
    if cfg.schedule == "poly":
        factor = (1 - min(step, total) / max(total, 1)) ** cfg.poly_power
    elif cfg.schedule == "step":
        factor = cfg.step_gamma ** sum(step >= m * total for m in cfg.step_milestones)
    else:
        factor = 1.0
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


class IUQModule(L.LightningModule):
    """Args:
    config: a `RunConfig` as a plain dict (kept in the checkpoint's hyper-parameters).
    label_to_category: COCO category id of each contiguous label (from the training set).
    class_names: name of each label.
    hf_config: the HF model config a Mask2Former checkpoint holds; given, the model is built from it.
    load_weights: load pretrained weights when building the model (False when a checkpoint's
        weights are about to fill it: no hub or weights package is involved).
    """

    def __init__(
        self,
        config: dict,
        label_to_category: list[int],
        class_names: list[str],
        hf_config: dict | None = None,
        load_weights: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["hf_config", "load_weights"])
        self.cfg: RunConfig = from_dict(RunConfig, config)
        self.cfg.model.num_labels = len(label_to_category)
        self.model = build_model(self.cfg.model, load_weights and hf_config is None, hf_config)
        iuq = self.cfg.iuq
        self.criterion = None
        if iuq.inter or iuq.equi:
            m = self.model
            self.criterion = build_criterion(iuq, m)
            # The memory (100 MB-1 GB) is kept equal on all ranks by its own all-gather, the running
            # mean by its all-reduce: DDP must not re-broadcast them from rank 0 before every forward.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self, [f"criterion.{name}" for name, _ in self.criterion.named_buffers()]
            )
        self.label_to_category = list(label_to_category)
        self.class_names = list(class_names)
        self.evaluator: CocoMaskEvaluator | None = None  # set by the trainer when there is a val split
        self._pending_samples = None
        self.total_steps: int | None = None  # optimiser steps of the whole run, for the LR schedule
        self.steps_per_epoch: int | None = None  # optimiser steps of one pass over the training set

    # -- training ---------------------------------------------------------------------------------
    def _step_seed(self) -> int:
        return (self.cfg.train.seed * 1_000_003 + self.global_step) * 1009 + self.global_rank

    def training_step(self, batch, batch_idx):
        seed = self._step_seed()
        torch.manual_seed(seed)  # the model's own matcher and point sampling draw from the global RNG
        generator = torch.Generator().manual_seed(seed)
        targets = batch["targets"]
        image_ids = torch.tensor([t["image_id"] for t in targets], device=self.device)
        every = self.cfg.train.log_grad_share_every
        result = training_step(
            self.model,
            self.criterion,
            batch["images"],
            batch["pixel_mask"],
            targets,
            image_ids,
            generator,
            cfg=self.cfg.iuq,
            diagnose=every > 0 and self.global_step % every == 0,
            step=self.global_step,
        )
        check_finite(  # the terms before their sum, so the message names the term
            {**result.terms, "loss": result.loss},
            self.global_step,
            "The last good checkpoint is checkpoints/last.ckpt in the run directory; lower "
            "train.lr or raise train.warmup_steps before resuming.",
        )
        b = len(targets)
        self.log("train/loss", result.loss.detach(), prog_bar=True, batch_size=b)
        for name, value in result.terms.items():  # every term, auxiliary layers' included
            self.log(f"train/{name}", value.detach(), prog_bar=name in ("loss_inter", "loss_equi"), batch_size=b)
        for name, value in result.diagnostics.items():
            self.log(f"diag/{name}", value.detach().float(), batch_size=b)
        if self.criterion is not None and self.criterion.memory is not None:
            memory = self.criterion.memory
            self.log("train/memory_fill", memory.count.float() / memory.capacity, batch_size=b)
        self._pending_samples = result.samples
        return result.loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint.update(self.model.checkpoint_extras())  # e.g. Mask2Former's HF architecture

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the step, before any callback (a step checkpoint must hold the updated memory);
        # the batch never meets its own entries in its loss.
        if self.criterion is not None and self._pending_samples is not None:
            self.criterion.update_memory(self._pending_samples)
        self._pending_samples = None

    def configure_optimizers(self):
        t = self.cfg.train
        backbone = [p for p in self.model.backbone_module().parameters() if p.requires_grad]
        ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest, "lr": t.lr}, {"params": backbone, "lr": t.lr * t.backbone_lr_mult}]
        if t.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        else:
            optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        # `estimated_stepping_batches` opens the train loader before a checkpoint's loop state is
        # restored, and Lightning then skips restoring the loader's position; so the trainer of a
        # run sets `total_steps` from the config and the dataset size instead.
        total = self.total_steps or self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ConfigError("cannot size the LR schedule: set train.max_steps or train.max_epochs")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, total=int(total), cfg=t))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- evaluation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.evaluator is not None:
            self.evaluator.reset()

    def validation_step(self, batch, batch_idx):
        predictions = batch_instances(self.model, batch, self.cfg.eval.detections)
        if self.evaluator is not None:
            self.evaluator.process([t["image_id"] for t in batch["targets"]], predictions)

    def on_validation_epoch_end(self) -> None:
        if self.evaluator is None:
            return
        metrics = evaluate_across_ranks(self.evaluator)
        for key, value in metrics.items():
            self.log(f"val/{key}", value, rank_zero_only=False, sync_dist=False)


def evaluate_across_ranks(evaluator: CocoMaskEvaluator) -> dict[str, float]:
    """COCO metrics over every rank's results (each rank saw a disjoint share of the images)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, evaluator.results)
        results = [r for shard in shards for r in shard]
        metrics = [
            evaluate_results(evaluator.coco_gt, results, evaluator.backend, evaluator.max_dets, evaluator.metric)
            if dist.get_rank() == 0
            else None
        ]
        dist.broadcast_object_list(metrics, src=0)
        return metrics[0]
    return evaluator.evaluate()
