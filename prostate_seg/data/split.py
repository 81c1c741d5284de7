"""The patient-level train/validation split, made once per dataset and shared by every run.

Slices of one patient are strongly correlated; the original study split slices at random,
so the same patient sat in both sets. Here the unit is the patient, the split is seeded, and
it is stored as ``<dataset>/split.json`` so every run of a sweep compares on the same patients.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prostate_seg.errors import ConfigError, DataError
from prostate_seg.files import write_json

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class PatientSplit:
    train: tuple[str, ...]
    val: tuple[str, ...]
    split_seed: int
    val_fraction: float


def make_split(patients: list[str], split_seed: int, val_fraction: float) -> PatientSplit:
    """Shuffle the sorted patient ids with ``split_seed``; the first round(f*N) (>= 1) validate."""
    unique = sorted(set(patients))
    if len(unique) < 2:
        raise DataError(f"need at least 2 patients to split, found {len(unique)}")
    order = np.random.default_rng(split_seed).permutation(len(unique))
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    val = sorted(unique[i] for i in order[:n_val])
    train = sorted(unique[i] for i in order[n_val:])
    return PatientSplit(tuple(train), tuple(val), int(split_seed), float(val_fraction))


def load_or_make_split(data_dir: Path, patients: list[str], split_seed: int,
                       val_fraction: float) -> PatientSplit:
    """Read ``split.json`` if present (checking it fits), else make it and write it atomically."""
    path = data_dir / SPLIT_FILE
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            split = PatientSplit(tuple(stored["train"]), tuple(stored["val"]),
                                 int(stored["split_seed"]), float(stored["val_fraction"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a valid split file ({exc}); delete it to make a new one") from None
        if split.split_seed != split_seed or not np.isclose(split.val_fraction, val_fraction):
            raise ConfigError(
                f"data.split_seed={split_seed}, data.val_fraction={val_fraction} differ from the "
                f"split stored in {path} (split_seed={split.split_seed}, val_fraction="
                f"{split.val_fraction}); runs on one dataset share its split: delete the file "
                "to make a new one")
        if set(split.train) | set(split.val) != set(patients):
            raise DataError(f"{path}: its patients differ from the manifest's; the dataset was "
                            "prepared again: delete split.json to make a new split")
        return split
    split = make_split(patients, split_seed, val_fraction)
    # Concurrent jobs write the same content; the last rename wins.
    write_json(path, {"split_seed": split.split_seed, "val_fraction": split.val_fraction,
                      "train": list(split.train), "val": list(split.val)})
    return split
