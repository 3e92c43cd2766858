"""Datasets and loaders of a run, with randomness that is a function of (seed, epoch, image).

Resuming from a checkpoint must replay exactly what an uninterrupted run would have seen, so
neither the shuffling nor the augmentation may depend on a process-global random state:

- `StepSampler` shuffles with a generator seeded by (seed, epoch), shards the permutation across
  ranks and starts at the trainer's optimiser step; it yields (index, epoch) pairs.
- `AugmentedDataset` applies its transform under a torch RNG seeded by (seed, epoch, index), so a
  sample's augmentation is the same in any worker, on any rank, before or after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from iuq.config import ConfigError
from iuq.data.coco import CocoInstances
from iuq.data.lvis import repeat_factors, repeated_indices
from iuq.data.transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResize,
    collate,
    resize,
    resize_output_size,
)


class StepSampler(Sampler):
    """One rank's indices from the run's current optimiser step to the end of that step's epoch.

    The data epoch of step s is s // batches_per_epoch; its order is a permutation seeded by
    (seed, epoch), sharded across ranks. The position is read from the trainer (`steps_done()`)
    each time the loader is opened, never from Lightning's epoch counter: a run resumed from any
    checkpoint (mid-epoch, at an epoch's end, after SIGINT or kill -9) sees the very batches an
    uninterrupted run sees, whatever epoch Lightning believes it is in.

    drop_last keeps every rank at the same number of steps (DDP needs it) and every batch full.

    repeat: [size] repeat factor of each image (LVIS repeat-factor sampling, `iuq.data.lvis`): an
    epoch then holds image i floor(r_i) or ceil(r_i) times (stochastic rounding seeded by (seed,
    epoch)), shuffled and cut or wrapped to the fixed length round(sum r), so that every epoch has
    the same number of steps and the step -> (epoch, batch) map stays exact.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        steps_done: Callable[[], int] = lambda: 0,
        repeat: torch.Tensor | None = None,
    ):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.steps_done = rank, world_size, steps_done
        self.repeat = repeat
        self.epoch_size = size if repeat is None else round(float(repeat.double().sum()))
        self.per_rank = (self.epoch_size // (world_size * batch_size)) * batch_size
        if self.per_rank == 0:
            raise ConfigError(
                f"{size} training images are fewer than one batch per device "
                f"({batch_size} x {world_size} devices); lower data.batch_size"
            )
        self.batches_per_epoch = self.per_rank // batch_size

    def set_epoch(self, epoch: int) -> None:
        """Lightning's epoch counter is a label only; the position comes from `steps_done`."""

    def __len__(self) -> int:
        return self.per_rank

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's indices of data epoch `epoch`, in order."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.repeat is None:
            order = torch.randperm(self.size, generator=g)
        else:
            drawn = repeated_indices(self.repeat, g)
            drawn = drawn[torch.randperm(len(drawn), generator=g)]
            order = drawn.repeat(math.ceil(self.epoch_size / max(len(drawn), 1)))[: self.epoch_size]
        return order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank].tolist()

    def __iter__(self):
        epoch, batch = divmod(int(self.steps_done()), self.batches_per_epoch)
        return iter([(i, epoch) for i in self.epoch_order(epoch)[batch * self.batch_size :]])


class AugmentedDataset(Dataset):
    """A `CocoInstances` whose item (index, epoch) is augmented under its own seeded RNG."""

    def __init__(self, dataset: CocoInstances, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        image, target = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.transform(image, target)


class ResizeShortSide:
    """Deterministic test-time resize: shortest side to `short_side`, long side at most `max_size`."""

    def __init__(self, short_side: int, max_size: int | None):
        self.short_side, self.max_size = short_side, max_size

    def __call__(self, image, target):
        size = resize_output_size(image.shape[-2], image.shape[-1], self.short_side, self.max_size)
        return resize(image, target, size)


class TestDataset(Dataset):
    def __init__(self, dataset: CocoInstances, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.transform(*self.dataset[index])


def train_transform(data_cfg) -> Compose:
    lo, hi = data_cfg.train_short_side
    steps = [RandomResize((lo, hi), data_cfg.max_size), RandomHorizontalFlip(data_cfg.flip_p)]
    if data_cfg.crop_p > 0:
        steps.append(RandomCrop((data_cfg.crop_min, data_cfg.crop_max), p=data_cfg.crop_p))
    return Compose(steps)


def open_split(ann: str, images: str, skip_invalid: bool, keep_empty: bool) -> CocoInstances:
    for path, what in ((ann, "annotations"), (images, "image folder")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} {path} does not exist; check data.* in the config")
    hint = "set data.skip_invalid: true in the config (or --set data.skip_invalid=true)"
    return CocoInstances(ann, images, skip_invalid=skip_invalid, keep_empty=keep_empty, skip_hint=hint)


def train_sampler(
    dataset: CocoInstances,
    data_cfg,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    steps_done: Callable[[], int] = lambda: 0,
) -> StepSampler:
    """The run's sampler, with repeat-factor sampling under `data.repeat_factor_threshold`."""
    repeat = None
    if data_cfg.repeat_factor_threshold is not None:
        categories = [{a["category_id"] for a in dataset.annotations[i]} for i in dataset.image_ids]
        repeat = repeat_factors(categories, data_cfg.repeat_factor_threshold)
    return StepSampler(len(dataset), data_cfg.batch_size, seed, rank, world_size, steps_done, repeat)


def train_loader(
    dataset: CocoInstances, data_cfg, seed: int, rank: int, world_size: int, steps_done: Callable[[], int]
) -> DataLoader:
    """steps_done: the trainer's count of optimiser steps so far (where the data stream resumes)."""
    sampler = train_sampler(dataset, data_cfg, seed, rank, world_size, steps_done)
    return DataLoader(
        AugmentedDataset(dataset, train_transform(data_cfg), seed),
        batch_size=data_cfg.batch_size,
        sampler=sampler,
        num_workers=data_cfg.num_workers,
        collate_fn=collate,
        persistent_workers=data_cfg.num_workers > 0,
        pin_memory=data_cfg.pin_memory and torch.cuda.is_available(),
        drop_last=True,
    )


def test_loader(
    dataset: CocoInstances,
    short_side: int,
    max_size: int | None,
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Every `world_size`-th image from `rank` (no padding: each image is evaluated exactly once)."""
    wrapped = TestDataset(dataset, ResizeShortSide(short_side, max_size))
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(
        torch.utils.data.Subset(wrapped, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(num_workers, math.ceil(len(indices) / batch_size)),
        collate_fn=collate,
    )
