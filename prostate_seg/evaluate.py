"""Per-volume evaluation of a checkpoint on its validation patients, at the original size.

``python evaluate.py ckpt_path=PATH [data.dir=DIR subset=val largest_component=false tta=false]``

Slice predictions are put back together per patient, mapped back to the scan's in-plane size,
and compared with the gland mask stored by prepare at that size. Writes
``<checkpoint>.eval.csv`` next to the checkpoint (refused if it exists, unless overwrite=true).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from prostate_seg.data.dataset import read_manifest, read_png
from prostate_seg.data.split import load_or_make_split
from prostate_seg.errors import ConfigError, DataError
from prostate_seg.files import refuse_existing, write_csv
from prostate_seg.inference import SlicePredictor, binarize, load_checkpoint, pick_device
from prostate_seg.metrics import volume_scores

log = logging.getLogger(__name__)
SCORES = ("dice", "precision", "recall", "f1")


def _reference(data_dir: Path, patient: str) -> tuple[np.ndarray, tuple[float, ...], bool]:
    path = data_dir / "volumes" / f"{patient}.npz"
    if not path.exists():
        raise DataError(f"{path}: missing; prepare the dataset again with this version")
    with np.load(path) as stored:
        return stored["mask"].astype(bool), tuple(stored["spacing"]), bool(stored["spacing_known"])


def evaluate_checkpoint(
    ckpt_path: str | Path,
    data_dir: str | Path | None = None,
    subset: str = "val",
    keep_largest: bool = False,
    tta: bool = False,
    device: str = "auto",
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """One row per patient (plus nothing else): Dice, precision, recall, F1, HD95."""
    if subset not in ("val", "train", "all"):
        raise ConfigError(f"subset={subset}: choose val, train or all")
    module = load_checkpoint(ckpt_path, pick_device(device))
    cfg = module.cfg
    data_dir = Path(data_dir or cfg.data.dir)
    records = read_manifest(data_dir)
    split = load_or_make_split(data_dir, [r.patient for r in records], cfg.data.split_seed,
                               cfg.data.val_fraction)
    wanted = {"val": set(split.val), "train": set(split.train),
              "all": set(split.val) | set(split.train)}[subset]
    predictor = SlicePredictor(module, batch_size=batch_size, tta=tta)
    rows = []
    for patient in sorted(wanted):
        slices = [r for r in records if r.patient == patient]
        fitted = np.stack([read_png(r.image) for r in slices])
        prob = predictor.predict_fitted(fitted, slices[0].height, slices[0].width)
        truth, spacing, spacing_known = _reference(data_dir, patient)
        if truth.shape != prob.shape:
            raise DataError(f"{data_dir}/volumes/{patient}.npz: shape {truth.shape} != the "
                            f"manifest's slices {prob.shape}")
        scores = volume_scores(binarize(prob, keep_largest), truth,
                               spacing if spacing_known else (1.0, 1.0, 1.0))
        hd_key = "hd95_mm" if spacing_known else "hd95_px"
        rows.append({"patient": patient, "slices": len(slices),
                     **{k: scores[k] for k in SCORES}, hd_key: scores["hd95"]})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over patients of every score column (HD95 over patients where it is finite)."""
    summary: dict[str, Any] = {"patient": "mean", "slices": sum(r["slices"] for r in rows)}
    for key in rows[0]:
        if key in ("patient", "slices"):
            continue
        values = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        values = values[np.isfinite(values)]
        summary[key] = float(values.mean()) if len(values) else float("nan")
    return summary


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["  ".join(f"{k:>12}" for k in keys)]
    for row in rows:
        lines.append("  ".join(f"{row[k]:>12.4f}" if isinstance(row[k], float)
                               else f"{row[k]!s:>12}" for k in keys))
    return "\n".join(lines)


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    output = Path(cfg.output) if cfg.output else Path(f"{cfg.ckpt_path}.eval.csv")
    refuse_existing(output, cfg.overwrite)  # before the work, not after it
    rows = evaluate_checkpoint(cfg.ckpt_path, cfg.data.get("dir"), cfg.subset,
                               cfg.largest_component, cfg.tta, cfg.device, cfg.batch_size)
    table = rows + [summarize(rows)]
    write_csv(output, table, list(table[0]))
    print(format_table(table))
    print(f"per-patient metrics written to {output}")
    return table
