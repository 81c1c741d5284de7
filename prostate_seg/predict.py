"""Segment new scans: NIfTI in, uint8 gland mask NIfTI out, on the scan's own grid.

``python predict.py ckpt_path=CKPT input=SCAN.nii.gz output=MASK.nii.gz`` (or folders)
[save_probabilities=true tta=true largest_component=true overwrite=true]

The scan is preprocessed exactly like the training data (reoriented to display slices, its
own 0.5-99.5 percentile window, fitted to the dataset size, the run's validation transform);
the probabilities are mapped back to the original in-plane size and orientation, and the mask
is written with the input's shape, affine and header.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import DictConfig

from prostate_seg.data.volume import (
    from_slices,
    geometry_of,
    is_nifti,
    load_nifti,
    strip_nifti_suffix,
    to_slices,
    voxel_array,
    window_to_uint8,
)
from prostate_seg.errors import DataError
from prostate_seg.files import refuse_existing, replacing
from prostate_seg.inference import SlicePredictor, binarize, load_checkpoint, pick_device

log = logging.getLogger(__name__)


def _save(array: np.ndarray, like: nib.Nifti1Image, dtype: type, path: Path) -> None:
    """Write next to the target, then rename: an interrupted run leaves no half file."""
    header = like.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(array.astype(dtype), like.affine, header)
    img.set_qform(like.get_qform(), code=int(like.header["qform_code"]))
    img.set_sform(like.get_sform(), code=int(like.header["sform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    with replacing(path) as tmp:
        nib.save(img, str(tmp))


def probability_path(output: Path) -> Path:
    return output.with_name(f"{strip_nifti_suffix(output.name)}_prob.nii.gz")


def predict_scan(predictor: SlicePredictor, scan: Path, output: Path, keep_largest: bool,
                 save_probabilities: bool, overwrite: bool) -> Path:
    targets = [output] + ([probability_path(output)] if save_probabilities else [])
    for target in targets:
        refuse_existing(target, overwrite)
    img = load_nifti(scan)
    data = voxel_array(img, scan, predictor.image_channel)
    geometry = geometry_of(img, data.shape)
    slices = window_to_uint8(to_slices(data, geometry), scan, *predictor.window)
    stack = predictor.predict_volume(slices)
    prob = from_slices(stack, geometry)
    mask = from_slices(binarize(stack, keep_largest), geometry)
    output.parent.mkdir(parents=True, exist_ok=True)
    _save(mask, img, np.uint8, output)
    if save_probabilities:
        _save(prob, img, np.float32, targets[1])
    log.info("%s -> %s (%d gland voxels)", scan, output, int(mask.sum()))
    return output


def predict_paths(ckpt_path: str | Path, input: str | Path, output: str | Path,
                  keep_largest: bool = False, save_probabilities: bool = False,
                  tta: bool = False, overwrite: bool = False, device: str = "auto",
                  batch_size: int = 32) -> list[Path]:
    """Predict one scan (input and output files) or every NIfTI of a folder (both folders)."""
    source, target = Path(input), Path(output)
    if source.is_dir():
        scans = sorted(p for p in source.iterdir() if is_nifti(p))
        if not scans:
            raise DataError(f"input={source}: no .nii or .nii.gz files in this folder")
        pairs = [(s, target / f"{strip_nifti_suffix(s.name)}.nii.gz") for s in scans]
    elif source.exists():
        if not is_nifti(source):
            raise DataError(f"input={source}: expected a .nii or .nii.gz file (or a folder)")
        pairs = [(source, target)]
    else:
        raise DataError(f"input={source}: file or folder not found")
    predictor = SlicePredictor(load_checkpoint(ckpt_path, pick_device(device)), batch_size, tta)
    return [predict_scan(predictor, s, t, keep_largest, save_probabilities, overwrite)
            for s, t in pairs]


def run(cfg: DictConfig) -> list[Path]:
    return predict_paths(cfg.ckpt_path, cfg.input, cfg.output, cfg.largest_component,
                         cfg.save_probabilities, cfg.tta, cfg.overwrite, cfg.device,
                         cfg.batch_size)
