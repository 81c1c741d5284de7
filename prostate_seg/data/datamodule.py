"""LightningDataModule over a prepared PNG dataset, split by patient."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, RandomSampler

from prostate_seg.data.dataset import SliceDataset, check_files, init_worker, read_manifest
from prostate_seg.data.split import CrossValidation, PatientSplit, SplitSettings, load_or_make_folds
from prostate_seg.config import prepared_size
from prostate_seg.errors import ConfigError

log = logging.getLogger(__name__)


class SliceDataModule(pl.LightningDataModule):
    """Fold ``fold`` of a prepared dataset: Lightning trains on its ``train`` patients and
    validates (early stopping, checkpoint) on its ``select`` ones; ``val_set`` and the test
    patients are scored only at the end. ``seed`` (the run's) alone decides the data's draws."""

    def __init__(self, dir: str, image_size: int = 384, batch_size: int = 16,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = True,
                 folds: int = 5, fold: int = 0, split_seed: int = 0, select_fraction: float = 0.15,
                 test_patients: Sequence[str] | None = None, test_fraction: float = 0.0,
                 context_slices: int = 0, cache: bool = False,
                 train_transform: A.BasicTransform | None = None,
                 val_transform: A.BasicTransform | None = None, seed: int = 0):
        super().__init__()
        self.dir = Path(dir)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.split_settings = SplitSettings(
            folds=folds, split_seed=split_seed, select_fraction=select_fraction,
            test_fraction=test_fraction,
            test_patients=None if test_patients is None else tuple(sorted(set(test_patients))))
        self.fold = fold
        self.context_slices = context_slices
        self.cache = cache
        self.train_transform = train_transform
        self.val_transform = val_transform
        self.seed = seed
        self.folds: CrossValidation | None = None
        self.split: PatientSplit | None = None
        self.train_set: SliceDataset | None = None
        self.select_set: SliceDataset | None = None
        self.val_set: SliceDataset | None = None

    def load_folds(self, store: bool = True) -> CrossValidation:
        """The dataset's split (made and, ``store``, stored on first use); reads only the
        manifest."""
        patients = [r.patient for r in read_manifest(self.dir)]
        self.folds = load_or_make_folds(self.dir, patients, self.split_settings, store)
        return self.folds

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        records = read_manifest(self.dir)  # the whole dataset checked before any worker starts
        stored = prepared_size(self.dir)
        check_files(records, stored)
        if stored is not None and self.image_size > stored:
            log.warning("data.image_size=%d but %s holds %d px slices: each is enlarged, which "
                        "costs time and adds no detail (set data.image_size=%d, or prepare at "
                        "%d)", self.image_size, self.dir, stored, stored, self.image_size)
        self.split = self.load_folds().fold(self.fold)

        def subset(patients: Sequence[str], transform: A.BasicTransform | None) -> SliceDataset:
            chosen = set(patients)
            return SliceDataset([r for r in records if r.patient in chosen], transform,
                                self.context_slices, self.cache)

        self.train_set = subset(self.split.train, self.train_transform)
        self.select_set = subset(self.split.select, self.val_transform)
        self.val_set = subset(self.split.val, self.val_transform)

    def _loader(self, dataset: SliceDataset, train: bool) -> DataLoader:
        """``batch_size`` is the global batch, divided over the DDP processes; validation slices
        are dealt out without the default sampler's padding, so each counts exactly once."""
        world, rank = (1, 0) if self.trainer is None else (self.trainer.world_size,
                                                            self.trainer.global_rank)
        if self.batch_size % world:
            raise ConfigError(f"data.batch_size={self.batch_size}: the global batch must divide "
                              f"evenly over the {world} DDP processes")
        batch_size = self.batch_size // world
        # Seed, rank and loader alone, never the model's global stream: the runs of one seed
        # see the same batches whatever their loss (common random numbers).
        if train:  # from the epoch Lightning will pass to set_epoch, where a resumed run starts
            epoch = 0 if self.trainer is None else (
                self.trainer.fit_loop.epoch_progress.current.processed)
            sampler = EpochSampler(dataset, [self.seed, rank], epoch)
        else:
            sampler = None if world == 1 else UnrepeatedDistributedSampler(dataset, world, rank,
                                                                           shuffle=False)
        return DataLoader(dataset, batch_size, sampler=sampler,
                          drop_last=train and len(dataset) > batch_size,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers, worker_init_fn=init_worker,
                          prefetch_factor=4 if self.num_workers > 0 else None,
                          generator=getattr(sampler, "workers", None))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Lightning's validation: the selection patients (they choose epoch and checkpoint)."""
        return self._loader(self.select_set, train=False)


class EpochSampler(RandomSampler):
    """Shuffles, and seeds the augmentation and the loader's workers, from (run seed, rank,
    epoch). Lightning calls ``set_epoch`` as each epoch starts, and a resumed run's loader is
    built at the epoch it resumes, so the resumed run draws what the uninterrupted one drew
    (persistent workers excepted: their streams start once). The order has a generator of its
    own, apart from the loader's (the worker seeds), which Lightning may draw before or after
    ``set_epoch``."""

    def __init__(self, dataset: SliceDataset, seeds: list[int], epoch: int = 0):
        super().__init__(dataset, generator=torch.Generator())
        self.seeds, self.workers = seeds, torch.Generator()
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        order, workers, augment = np.random.SeedSequence([*self.seeds, epoch]).generate_state(3)
        self.generator.manual_seed(int(order))
        self.workers.manual_seed(int(workers))
        self.data_source.reseed(int(augment))
