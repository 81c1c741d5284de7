"""Patient-level k-fold cross-validation, made once per dataset (``split.json``) and shared by
every run, so a study compares its losses on the same patients (docs/STUDY.md).

Roles in fold k: ``train`` (gradients), ``select`` (epoch and checkpoint: a few training
patients, so the validation patients choose nothing), ``val`` (fold k's patients, each
validated exactly once), ``test`` (outside every fold, scored by every fold's model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prostate_seg.errors import ConfigError, DataError
from prostate_seg.files import write_json

SPLIT_FILE = "split.json"
SPLIT_FORMAT = 3
ROLES = ("train", "select", "val")


@dataclass(frozen=True)
class SplitSettings:
    """What decides the split: the ``data.*`` keys of the same names."""

    folds: int = 5
    split_seed: int = 0
    select_fraction: float = 0.15
    test_patients: tuple[str, ...] | None = None
    test_fraction: float = 0.0


@dataclass(frozen=True)
class PatientSplit:
    """One fold: who trains, who chooses the epoch and checkpoint, who is scored."""

    fold: int
    train: tuple[str, ...]
    select: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class CrossValidation:
    settings: SplitSettings
    test: tuple[str, ...]
    folds: tuple[PatientSplit, ...]

    def fold(self, k: int) -> PatientSplit:
        if not 0 <= k < len(self.folds):
            raise ConfigError(f"data.fold={k}: must be in 0..{len(self.folds) - 1} "
                              f"(data.folds={len(self.folds)})")
        return self.folds[k]

    def to_dict(self) -> dict[str, Any]:
        # "splits": one entry per fold, as in nnU-Net's splits_final.json (plus "select").
        return {"format": SPLIT_FORMAT, **asdict(self.settings), "test": list(self.test),
                "splits": [{role: list(getattr(fold, role)) for role in ROLES}
                           for fold in self.folds]}


def make_folds(patients: Sequence[str], settings: SplitSettings) -> CrossValidation:
    """Seeded: choose the test patients (if any), deal the rest into ``folds`` folds whose
    sizes differ by at most one, then set aside each fold's selection patients."""
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
    val_folds = [sorted(shuffled[k::settings.folds]) for k in range(settings.folds)]
    folds = []
    for k, val in enumerate(val_folds):
        others = sorted(p for j, fold in enumerate(val_folds) if j != k for p in fold)
        n_select = max(1, round(settings.select_fraction * len(others)))
        if n_select >= len(others):
            raise DataError(f"data.select_fraction={settings.select_fraction}: fold {k} would "
                            f"keep no training patient ({len(others)} outside its validation)")
        chosen = set(others[i] for i in rng.permutation(len(others))[:n_select])
        folds.append(PatientSplit(k, tuple(p for p in others if p not in chosen),
                                  tuple(sorted(chosen)), tuple(val), tuple(test)))
    return CrossValidation(settings, tuple(test), tuple(folds))


def check_folds(cv: CrossValidation, source: str) -> None:
    """Every fold has patients in every role and nobody in two; each non-test patient is
    validated exactly once; a fold trains and selects on exactly the other folds' patients.
    A hand-edited file is held to the same rules."""
    if len(cv.folds) < 2:
        raise DataError(f"{source}: {len(cv.folds)} fold; cross-validation needs >= 2")
    validated: dict[str, int] = {}
    for fold in cv.folds:
        k = fold.fold
        for role in ROLES:
            if not getattr(fold, role):
                raise DataError(f"{source}: fold {k} has no {role} patients")
        for a, b in (("train", "select"), ("train", "val"), ("select", "val")):
            both = sorted(set(getattr(fold, a)) & set(getattr(fold, b)))
            if both:
                raise DataError(f"{source}: fold {k} has {', '.join(both)} in both {a} and {b}")
        for patient in fold.val:
            if patient in validated:
                raise DataError(f"{source}: patient {patient} is validated in folds "
                                f"{validated[patient]} and {k}; each belongs to one fold")
            validated[patient] = k
    in_test = sorted(set(cv.test) & set(validated))
    if in_test:
        raise DataError(f"{source}: {', '.join(in_test)} both held out for test and in a fold")
    for fold in cv.folds:
        if set(fold.train) | set(fold.select) != set(validated) - set(fold.val):
            raise DataError(f"{source}: fold {fold.fold} does not train and select on exactly "
                            "the other folds' validation patients; fix or delete the file")


def read_folds(path: Path) -> CrossValidation:
    """A stored split, held to the rules of :func:`check_folds`."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable split file ({exc}); delete it to make a new "
                        "one") from None
    if not isinstance(stored, dict) or stored.get("format") != SPLIT_FORMAT:
        old = isinstance(stored, dict) and ({"train", "val"} <= set(stored) or "format" in stored)
        kind = "a split file of an older format" if old else "not a split file"
        raise DataError(f"{path}: {kind}; this version splits patients into cross-validation "
                        "folds with selection patients: delete it to make a new one")
    try:
        test_patients = stored["test_patients"]
        settings = SplitSettings(int(stored["folds"]), int(stored["split_seed"]),
                                 float(stored["select_fraction"]),
                                 None if test_patients is None else tuple(test_patients),
                                 float(stored["test_fraction"]))
        test = tuple(stored["test"])
        folds = tuple(PatientSplit(k, *(tuple(entry[role]) for role in ROLES), test)
                      for k, entry in enumerate(stored["splits"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a valid split file ({exc}); delete it to make a new "
                        "one") from None
    if len(folds) != settings.folds:
        raise DataError(f"{path}: says folds={settings.folds} but lists {len(folds)}")
    cv = CrossValidation(settings, test, folds)
    check_folds(cv, str(path))
    return cv


def _differences(stored: SplitSettings, wanted: SplitSettings) -> list[str]:
    ours, theirs = asdict(wanted), asdict(stored)
    return [f"data.{key}={ours[key]} (stored: {theirs[key]})" for key in ours
            if not (ours[key] == theirs[key] or (isinstance(ours[key], float)
                    and math.isclose(ours[key], theirs[key])))]


def load_or_make_folds(data_dir: Path, patients: Sequence[str], settings: SplitSettings,
                       store: bool = True) -> CrossValidation:
    """Read ``split.json`` if present (checking it fits the data and the settings), else make
    it and (``store``) write it atomically (concurrent jobs write the same content). A check
    before any job does not store it: a refused or dry-run sweep leaves the dataset as it was."""
    path = data_dir / SPLIT_FILE
    if not path.exists():
        cv = make_folds(patients, settings)
        if store:
            write_json(path, cv.to_dict())
        return cv
    cv = read_folds(path)
    differences = _differences(cv.settings, settings)
    if differences:
        raise ConfigError(f"{'; '.join(differences)} differ from the split stored in {path}; "
                          "every run on a dataset shares its split: use the stored settings, or "
                          "delete the file to make a new split")
    stored, wanted = set(cv.test).union(*(fold.val for fold in cv.folds)), set(patients)
    if stored != wanted:
        missing, new = sorted(stored - wanted), sorted(wanted - stored)
        raise DataError(f"{path}: its patients no longer match the dataset ({len(missing)} "
                        f"gone{': ' + ', '.join(missing[:3]) if missing else ''}; {len(new)} new"
                        f"{': ' + ', '.join(new[:3]) if new else ''}); the dataset was prepared "
                        "again: delete split.json to make a new split")
    return cv
