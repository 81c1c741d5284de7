"""Per-patient scores of a checkpoint at the scan's original size, on the patients of the split
it stores and data prepared and split as its own were: never on patients it trained on."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from prostate_seg.data.dataset import read_manifest, read_png
from prostate_seg.data.split import ROLES, SPLIT_FILE, PatientSplit, read_folds
from prostate_seg.errors import ConfigError, DataError
from prostate_seg.settings import shown
from prostate_seg.files import (PREPARE_FILE, check_data_dir, check_name_fits,
                                check_writable_folder, refuse_existing, write_csv)
from prostate_seg.data.prepare import PrepareSettings, dataset_holding
from prostate_seg.inference.metrics import volume_scores
from prostate_seg.inference.predictor import (SlicePredictor, TrainedModel, binarize,
                                              load_checkpoint, pick_device)

SUBSETS = ("val", "test", "select", "train", "all")
PER_PATIENT_FIELDS = ["patient", "split", "dice", "precision", "recall", "hd95", "hd95_failed",
                      "hd95_unit", "voxels_pred", "voxels_true", "voxels_total", "slices"]


def _reference(data_dir: Path, patient: str) -> tuple[np.ndarray, tuple[float, ...], bool]:
    path = data_dir / "volumes" / f"{patient}.npz"
    if not path.exists():
        raise DataError(f"{path}: missing; prepare the dataset again with this version")
    try:
        with np.load(path) as stored:
            return (stored["mask"].astype(bool), tuple(stored["spacing"]),
                    bool(stored["spacing_known"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc}); prepare the dataset "
                        "again") from None


def check_references(data_dir: Path, patients: Iterable[str]) -> None:
    """Every patient to be scored has its original-size mask, readable: a run finds a missing or
    damaged one before it trains, not when it scores."""
    for patient in patients:
        _reference(data_dir, patient)


def stored_split(module: TrainedModel, ckpt_path: str | Path) -> PatientSplit:
    stored = module.cfg.get("split")
    if not stored:
        raise DataError(f"ckpt_path={ckpt_path}: the checkpoint stores no patient split "
                        "(made by an older version); train it again to evaluate it per patient")
    return PatientSplit(int(stored["fold"]), *(tuple(stored[role]) for role in ROLES + ("test",)))


def check_same_dataset(data_dir: Path, module: TrainedModel, split: PatientSplit) -> None:
    """Refuse a data folder prepared or split otherwise than the checkpoint's training data."""
    stored = module.cfg.get("preprocessing")
    prepare_json = data_dir / PREPARE_FILE
    if stored:
        here = asdict(PrepareSettings.from_config(json.loads(prepare_json.read_text())))
        trained = asdict(PrepareSettings.from_config(stored))
        differ = [f"{k}={v} (checkpoint: {trained[k]})" for k, v in here.items() if v != trained[k]]
        if differ:
            raise DataError(f"data.dir={data_dir}: prepared with {', '.join(differ)}; the "
                            "checkpoint was trained on data prepared otherwise")
    split_json = data_dir / SPLIT_FILE
    if split_json.exists():
        here = read_folds(split_json)
        if (split.fold >= len(here.folds) or set(here.test) != set(split.test)
                or set(here.folds[split.fold].val) != set(split.val)):  # who may be scored
            raise DataError(f"{split_json}: fold {split.fold} differs from the split the "
                            "checkpoint was trained with; evaluating with it would score "
                            "patients the model trained on")


def evaluate_patients(module: TrainedModel, data_dir: Path,
                      patients: Mapping[str, Sequence[str]], largest_component: bool = False,
                      tta: bool = False, batch_size: int = 32) -> list[dict[str, Any]]:
    """One row per patient (``patients`` maps a split name to its patient ids)."""
    references = {p: _reference(data_dir, p) for ids in patients.values() for p in ids}  # first
    by_patient = {p: list(g) for p, g in groupby(read_manifest(data_dir), lambda r: r.patient)}
    predictor = SlicePredictor(module, batch_size=batch_size, tta=tta)
    rows = []
    for split, ids in patients.items():
        for patient in sorted(ids):
            slices = by_patient.get(patient)
            if not slices:
                raise DataError(f"{data_dir}/manifest.csv: no slices of patient {patient}")
            fitted = np.stack([read_png(r.image) for r in slices])
            prob = predictor.predict_fitted(fitted, slices[0].height, slices[0].width)
            truth, spacing, spacing_known = references[patient]
            if truth.shape != prob.shape:
                raise DataError(f"{data_dir}/volumes/{patient}.npz: shape {truth.shape} != the "
                                f"manifest's slices {prob.shape}")
            scores = volume_scores(binarize(prob, largest_component), truth,
                                   spacing if spacing_known else (1.0, 1.0, 1.0))
            rows.append({"patient": patient, "split": split, **scores,
                         "hd95_unit": "mm" if spacing_known else "px", "slices": len(slices)})
    return [{k: row[k] for k in PER_PATIENT_FIELDS} for row in rows]


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Over patients: the mean Dice, precision and recall; HD95 as the median (a patient scored
    at the image diagonal would dominate a mean), its failures counted, never dropped."""
    column = lambda key: np.array([float(r[key]) for r in rows])  # noqa: E731
    return {"dice": float(column("dice").mean()), "precision": float(column("precision").mean()),
            "recall": float(column("recall").mean()), "hd95": float(np.median(column("hd95"))),
            "hd95_failed": int(column("hd95_failed").sum())}


def split_scores(rows: list[dict[str, Any]], split: str) -> dict[str, float | int]:
    """One split's ``aggregate``, named as results.json holds it (``val/dice_original``, ...)."""
    chosen = [r for r in rows if r["split"] == split]
    if not chosen:
        return {}
    scores = aggregate(chosen)
    failed = scores.pop("hd95_failed")
    return {**{f"{split}/{key}_original": value for key, value in scores.items()},
            f"{split}/hd95_failed": failed, f"{split}/patients": len(chosen)}


def evaluate_checkpoint(ckpt_path: str | Path, data_dir: str | Path | None = None,
                        subset: str = "val", largest_component: bool = False, tta: bool = False,
                        device: str = "auto", batch_size: int = 32) -> list[dict[str, Any]]:
    """One row per patient of ``subset`` of the checkpoint's own split, of the network's own
    output unless ``tta`` and ``largest_component`` are given (as the command line's default)."""
    check_subset(subset)
    module = load_checkpoint(ckpt_path, pick_device(device))
    split = stored_split(module, ckpt_path)
    data_dir = Path(data_dir or module.cfg.data.dir)
    check_data_dir(data_dir)
    check_same_dataset(data_dir, module, split)
    groups = {"val": split.val, "test": split.test, "select": split.select, "train": split.train}
    chosen = groups if subset == "all" else {subset: groups[subset]}
    chosen = {name: ids for name, ids in chosen.items() if ids}
    if not chosen:
        raise ConfigError(f"subset={subset}: the checkpoint's split has no {subset} patients")
    return evaluate_patients(module, data_dir, chosen, largest_component, tta, batch_size)


def summarize(rows: list[dict[str, Any]], split: str = "") -> dict[str, Any]:
    """A last row over the patients, as ``aggregate`` (and results.json) has it."""
    return {"patient": "summary", "split": split, **aggregate(rows),
            "slices": sum(r["slices"] for r in rows)}


def summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per split: a mean over training and held-out patients together (subset=all)
    would be the one number read, and mean neither."""
    splits = dict.fromkeys(r["split"] for r in rows)
    return [summarize([r for r in rows if r["split"] == s], s) for s in splits]


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = ["patient", "split", "dice", "precision", "recall", "hd95", "hd95_failed"]
    units = sorted({str(r["hd95_unit"]) for r in rows if r.get("hd95_unit")})
    titles = {"hd95": f"hd95 ({'/'.join(units)})" if units else "hd95"}
    lines = ["  ".join(f"{titles.get(k, k):>12}" for k in keys)]
    for row in rows:
        lines.append("  ".join(f"{row.get(k, ''):>12.4f}" if isinstance(row.get(k), float)
                               else f"{row.get(k, '')!s:>12}" for k in keys))
    return "\n".join(lines)


def default_output(ckpt_path: str | Path, subset: str = "val", largest_component: bool = False,
                   tta: bool = False) -> Path:
    """``<checkpoint>.eval.csv``, named after any other subset or post-processing
    (``.eval-test-lcc-tta.csv``), so no evaluation replaces another."""
    parts = [subset] * (subset != "val") + ["lcc"] * largest_component + ["tta"] * tta
    return Path(f"{ckpt_path}.eval{''.join('-' + part for part in parts)}.csv")


def check_subset(subset: object) -> None:
    if subset not in SUBSETS:
        raise ConfigError(f"subset={shown(subset)}: choose one of {', '.join(SUBSETS)}")


def check_output(output: Path, ckpt_path: Path) -> None:
    """The table goes to a file of its own, whatever overwrite says: not onto a folder, the
    checkpoint, a file of a prepared dataset or into its slices (what the scores come from), nor
    a file of another kind (overwrite=true put a table over another run's last.ckpt, a scan)."""
    if output.is_dir():
        raise DataError(f"output={output}: is a folder; give the table's file name (.csv)")
    real = output.resolve()
    if real == ckpt_path.resolve():
        raise ConfigError(f"output={output} would replace the checkpoint it evaluates")
    dataset = dataset_holding(output)
    if dataset:
        raise ConfigError(f"output={output} would change the prepared dataset {dataset}; "
                          "choose a file outside it")
    if output.suffix.lower() != ".csv":
        raise ConfigError(f"output={output}: the table's name must end in .csv")


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    check_subset(cfg.subset)  # before it names the output
    pick_device(cfg.device)
    output = (Path(cfg.output) if cfg.output
              else default_output(cfg.ckpt_path, cfg.subset, cfg.largest_component, cfg.tta))
    check_output(output, Path(cfg.ckpt_path))
    refuse_existing(output, cfg.overwrite)  # before the work, not after it
    check_name_fits(output)
    check_writable_folder(output.parent)
    rows = evaluate_checkpoint(cfg.ckpt_path, cfg.data.get("dir"), cfg.subset,
                               cfg.largest_component, cfg.tta, cfg.device, cfg.batch_size)
    table = rows + summaries(rows)
    write_csv(output, table, PER_PATIENT_FIELDS)
    print(format_table(table))
    print(f"per-patient metrics written to {output}")
    return table
