"""Datasets and loaders of a run, with randomness that is a function of (seed, epoch, image).

Resuming from a checkpoint must replay exactly what an uninterrupted run would have seen, so
neither the shuffling nor the augmentation may depend on a process-global random state:

- `EpochSampler` shuffles with a generator seeded by (seed, epoch) and shards the permutation
  across ranks; it yields (index, epoch) pairs.
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
from iuq.data.transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResize,
    collate,
    resize,
    resize_output_size,
)


class EpochSampler(Sampler):
    """Shuffled indices of one rank's shard; Lightning calls `set_epoch` before every epoch.

    drop_last keeps every rank at the same number of steps (DDP needs it) and every batch full.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        # (epoch, batches) set by a mid-epoch resume: every pass over that epoch starts after those
        # batches (Lightning may open the loader more than once before training resumes).
        self.resume_at: tuple[int, int] | None = None
        self.per_rank = (size // (world_size * batch_size)) * batch_size
        if self.per_rank == 0:
            raise ConfigError(
                f"{size} training images are fewer than one batch per device "
                f"({batch_size} x {world_size} devices); lower data.batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)
        shard = order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        start = 0
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            start = self.resume_at[1] * self.batch_size
        return iter([(int(i), self.epoch) for i in shard[start:]])


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning saves in checkpoints and restores on resume.

    State: the epoch and the batches the trainer has finished in it (`batches_done()`, read from the
    trainer rather than counted here, because the loader runs ahead of training by its prefetch).
    A resume in mid-epoch then continues with the very batches an uninterrupted run would see.
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": int(self._batches_done())}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(state["epoch"])
        if state["batches_done"] < len(self):  # a finished epoch resumes at the next one, from its start
            self.sampler.resume_at = (state["epoch"], state["batches_done"])


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


def train_loader(
    dataset: CocoInstances, data_cfg, seed: int, rank: int, world_size: int, batches_done: Callable[[], int]
) -> ResumableLoader:
    """batches_done: the trainer's count of finished batches in the current epoch (for checkpoints)."""
    sampler = EpochSampler(len(dataset), data_cfg.batch_size, seed, rank, world_size)
    return ResumableLoader(
        AugmentedDataset(dataset, train_transform(data_cfg), seed),
        batch_size=data_cfg.batch_size,
        sampler=sampler,
        num_workers=data_cfg.num_workers,
        collate_fn=collate,
        persistent_workers=data_cfg.num_workers > 0,
        drop_last=True,
        batches_done=batches_done,
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
