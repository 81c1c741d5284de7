"""Data stage: scans -> display slices (volume, resize), PNG dataset, patient split, loaders."""

from prostate_seg.data.datamodule import SliceDataModule
from prostate_seg.data.dataset import SliceDataset, read_manifest
from prostate_seg.data.split import PatientSplit, load_or_make_split, make_split

__all__ = ["PatientSplit", "SliceDataModule", "SliceDataset", "load_or_make_split",
           "make_split", "read_manifest"]
