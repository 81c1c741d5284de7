"""Patient-level k-fold cross-validation, made once per dataset and shared by every run.

Slices of one patient are strongly correlated; the original study split slices at random,
so the same patient sat in both sets. Here the unit is the patient and, as in nnU-Net, the
patients are dealt into ``folds`` validation folds (each patient validates exactly once);
fold k trains on the others. Optional held-out test patients sit outside every fold and
never choose an epoch or a checkpoint. Everything is seeded and stored as
``<dataset>/split.json``, so every run of a study compares on the same patients.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prostate_seg.errors import ConfigError, DataError
from prostate_seg.files import write_json

SPLIT_FILE = "split.json"
SPLIT_FORMAT = 2


@dataclass(frozen=True)
class SplitSettings:
    """What decides the split: the ``data.*`` keys of the same names."""

    folds: int = 5
    split_seed: int = 0
    test_patients: tuple[str, ...] | None = None
    test_fraction: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"folds": self.folds, "split_seed": self.split_seed,
                "test_patients": None if self.test_patients is None else list(self.test_patients),
                "test_fraction": self.test_fraction}


@dataclass(frozen=True)
class PatientSplit:
    """One fold: who trains, who validates (chooses the epoch and checkpoint), who is tested."""

    fold: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"fold": self.fold, "train": list(self.train), "val": list(self.val),
                "test": list(self.test)}


@dataclass(frozen=True)
class CrossValidation:
    settings: SplitSettings
    test: tuple[str, ...]
    val_folds: tuple[tuple[str, ...], ...]

    @property
    def patients(self) -> set[str]:
        return set(self.test).union(*self.val_folds)

    def fold(self, k: int) -> PatientSplit:
        if not 0 <= k < len(self.val_folds):
            raise ConfigError(f"data.fold={k}: must be in 0..{len(self.val_folds) - 1} "
                              f"(data.folds={len(self.val_folds)})")
        val = self.val_folds[k]
        train = tuple(p for j, fold in enumerate(self.val_folds) if j != k for p in fold)
        return PatientSplit(k, tuple(sorted(train)), val, self.test)

    def to_dict(self) -> dict[str, Any]:
        # "splits" as nnU-Net's splits_final.json: one {"train", "val"} per fold.
        return {"format": SPLIT_FORMAT, **self.settings.to_dict(), "test": list(self.test),
                "splits": [{"train": list(self.fold(k).train), "val": list(v)}
                           for k, v in enumerate(self.val_folds)]}


def make_folds(patients: Sequence[str], settings: SplitSettings) -> CrossValidation:
    """Seeded: choose the test patients (if any), then deal the rest into ``folds`` folds
    whose sizes differ by at most one."""
    unique = sorted(set(patients))
    rng = np.random.default_rng(settings.split_seed)
    if settings.test_patients is not None and settings.test_fraction:
        raise ConfigError("data.test_patients and data.test_fraction are both set; choose one")
    if settings.test_patients is not None:
        unknown = sorted(set(settings.test_patients) - set(unique))
        if unknown:
            raise ConfigError(f"data.test_patients: {', '.join(unknown)} not in the dataset")
        test = sorted(set(settings.test_patients))
    elif settings.test_fraction:
        n_test = max(1, round(settings.test_fraction * len(unique)))
        test = sorted(unique[i] for i in rng.permutation(len(unique))[:n_test])
    else:
        test = []
    rest = [p for p in unique if p not in set(test)]
    if len(rest) < settings.folds:
        raise DataError(f"data.folds={settings.folds}: needs at least {settings.folds} patients "
                        f"outside the test set, the dataset has {len(rest)}")
    shuffled = [rest[i] for i in rng.permutation(len(rest))]
    val_folds = tuple(tuple(sorted(shuffled[k::settings.folds])) for k in range(settings.folds))
    return CrossValidation(settings, tuple(test), val_folds)


def check_folds(cv: CrossValidation, source: str) -> None:
    """Every fold trains and validates on someone, nobody is in two roles, and each
    non-test patient validates exactly once (a hand-edited file is held to the same rules)."""
    seen: dict[str, int] = {}
    for k, val in enumerate(cv.val_folds):
        if not val:
            raise DataError(f"{source}: fold {k} has no validation patients")
        for patient in val:
            if patient in seen:
                raise DataError(f"{source}: patient {patient} validates in folds {seen[patient]} "
                                f"and {k}; each patient belongs to one validation fold")
            seen[patient] = k
    in_test = sorted(set(cv.test) & set(seen))
    if in_test:
        raise DataError(f"{source}: {', '.join(in_test)} both held out for test and in a fold")
    if len(cv.val_folds) < 2:
        raise DataError(f"{source}: {len(cv.val_folds)} fold; cross-validation needs >= 2")


def _from_file(path: Path) -> CrossValidation:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable split file ({exc}); delete it to make a new one") from None
    if isinstance(stored, dict) and "format" not in stored and {"train", "val"} <= set(stored):
        raise DataError(f"{path}: a split file of the old single-split format; this version "
                        "splits patients into cross-validation folds (data.folds): delete it to "
                        "make a new one")
    try:
        if stored["format"] != SPLIT_FORMAT:
            raise ValueError(f"format {stored['format']}, expected {SPLIT_FORMAT}")
        test_patients = stored["test_patients"]
        settings = SplitSettings(
            folds=int(stored["folds"]), split_seed=int(stored["split_seed"]),
            test_patients=None if test_patients is None else tuple(test_patients),
            test_fraction=float(stored["test_fraction"]))
        cv = CrossValidation(settings, tuple(stored["test"]),
                             tuple(tuple(entry["val"]) for entry in stored["splits"]))
        trains = [set(entry["train"]) for entry in stored["splits"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a valid split file ({exc}); delete it to make a new one") from None
    if len(cv.val_folds) != settings.folds:
        raise DataError(f"{path}: says folds={settings.folds} but lists {len(cv.val_folds)}")
    check_folds(cv, str(path))
    for k, train in enumerate(trains):  # hand edits: fold k trains on exactly the other folds
        overlap = sorted(train & set(cv.val_folds[k]))
        if overlap:
            raise DataError(f"{path}: fold {k} trains and validates on {', '.join(overlap)}")
        if train != set(cv.fold(k).train):
            raise DataError(f"{path}: fold {k}'s train patients are not the other folds' "
                            "validation patients; fix or delete the file")
    return cv


def _differences(stored: SplitSettings, wanted: SplitSettings) -> list[str]:
    ours, theirs = wanted.to_dict(), stored.to_dict()
    return [f"data.{key}={ours[key]} (stored: {theirs[key]})" for key in ours
            if not (ours[key] == theirs[key] or (isinstance(ours[key], float)
                    and math.isclose(ours[key], theirs[key])))]


def load_or_make_folds(data_dir: Path, patients: Sequence[str],
                       settings: SplitSettings) -> CrossValidation:
    """Read ``split.json`` if present (checking it fits the data and the settings), else make
    it and write it atomically (concurrent jobs write the same content)."""
    path = data_dir / SPLIT_FILE
    if not path.exists():
        cv = make_folds(patients, settings)
        check_folds(cv, "the new split")
        write_json(path, cv.to_dict())
        return cv
    cv = _from_file(path)
    differences = _differences(cv.settings, settings)
    if differences:
        raise ConfigError(f"{'; '.join(differences)} differ from the split stored in {path}; "
                          "every run on a dataset shares its split: use the stored settings, or "
                          "delete the file to make a new split")
    wanted = set(patients)
    if cv.patients != wanted:
        missing, new = sorted(cv.patients - wanted), sorted(wanted - cv.patients)
        raise DataError(f"{path}: its patients no longer match the dataset ({len(missing)} "
                        f"gone{': ' + ', '.join(missing[:3]) if missing else ''}; {len(new)} new"
                        f"{': ' + ', '.join(new[:3]) if new else ''}); the dataset was prepared "
                        "again: delete split.json to make a new split")
    return cv
