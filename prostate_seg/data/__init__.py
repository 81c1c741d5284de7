"""Data stage: scans -> display slices (volume, resize), PNG dataset, patient split, loaders."""

from prostate_seg.data.datamodule import SliceDataModule
from prostate_seg.data.dataset import SliceDataset, read_manifest
from prostate_seg.data.split import (
    CrossValidation,
    PatientSplit,
    SplitSettings,
    load_or_make_folds,
    make_folds,
)

__all__ = ["CrossValidation", "PatientSplit", "SliceDataModule", "SliceDataset", "SplitSettings",
           "load_or_make_folds", "make_folds", "read_manifest"]
