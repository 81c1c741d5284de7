"""Segment new scans: NIfTI in, uint8 gland mask NIfTI out on the scan's own grid, preprocessed
as the training data were. Every output is checked before the checkpoint is loaded, and written
whole or not at all, so ``skip_existing=true`` finishes an interrupted folder."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import DictConfig

from prostate_seg.data.prepare import (check_on_error, dataset_holding, nnunet_cases,
                                       other_channel, patient_id, scan_slices, scans_in)
from prostate_seg.data.volume import from_slices, is_nifti, load_nifti, strip_nifti_suffix
from prostate_seg.errors import ConfigError, DataError
from prostate_seg.files import (check_name_fits, check_writable_folder, refuse_existing,
                                replacing, sigterm_as_interrupt)
from prostate_seg.inference.predictor import (SlicePredictor, TrainedModel, binarize,
                                              load_checkpoint, pick_device)

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


def _outputs(mask: Path, save_probabilities: bool) -> list[Path]:
    return [mask, probability_path(mask)] if save_probabilities else [mask]


def predict_scan(predictor: SlicePredictor, scan: Path, output: Path, largest_component: bool,
                 save_probabilities: bool) -> Path:
    img = load_nifti(scan)
    slices, geometry = scan_slices(img, scan, predictor.prep)
    stack = predictor.predict_volume(slices)
    prob = from_slices(stack, geometry)
    mask = from_slices(binarize(stack, largest_component), geometry)
    if save_probabilities:  # first: a mask that exists means its run got to the end
        _save(prob, img, np.float32, probability_path(output))
    _save(mask, img, np.uint8, output)
    log.info("%s -> %s (%d gland voxels)", scan, output, int(mask.sum()))
    return output


def _pairs(source: Path, target: Path, on_error: str) -> list[tuple[Path, Path]]:
    """(scan, mask output) for one scan or a folder of scans; names checked, nothing read.
    nnU-Net's other channels of a case are refused, or with ``on_error=skip`` left out, as
    prepare does."""
    if source.is_dir():
        if target.exists() and not target.is_dir():
            raise DataError(f"output={target}: exists and is not a folder (input={source} is a "
                            "folder, so output names one too)")
        real_in, real_out = source.resolve(), target.resolve()
        if real_out.is_relative_to(real_in):
            raise ConfigError(f"output={target} {'is' if real_out == real_in else 'lies inside'} "
                              f"input={source}: masks would mix with the scans; choose a folder "
                              "outside it")
        scans = scans_in(source, is_nifti, "not NIfTI (.nii, .nii.gz)")
        if not scans:
            inner = [d for d in sorted(source.iterdir()) if d.is_dir()
                     and any(is_nifti(f) for f in d.iterdir())]  # a dataset's root given
            likely = [d for d in inner if not re.search(r"mask|label|seg|truth|^gt$", d.name,
                                                        re.I)] or inner
            raise DataError(f"input={source}: no .nii or .nii.gz files in this folder" + (
                f" (there are some in {', '.join(d.name + '/' for d in inner)}: "
                f"input={likely[0]}?)" if inner else ""))
        cases = nnunet_cases(scans)
        channels = {scan: why for scan in scans if (why := other_channel(scan, cases))}
        if channels and on_error == "raise":  # a T2 network would segment ADC as a scan
            raise DataError(next(iter(channels.values())))
        for why in channels.values():
            log.warning("left out %s", why)
        scans = [scan for scan in scans if scan not in channels]
        return [(s, target / f"{strip_nifti_suffix(s.name)}.nii.gz") for s in scans]
    if not source.exists():
        raise DataError(f"input={source}: file or folder not found")
    if not is_nifti(source):
        raise DataError(f"input={source}: expected a .nii or .nii.gz file (or a folder)")
    if target.is_dir():
        raise DataError(f"output={target}: is a folder; for one scan give the mask's file name "
                        "(.nii.gz)")
    if not is_nifti(target):
        raise ConfigError(f"output={target}: a mask file name ends in .nii or .nii.gz")
    return [(source, target)]


def _check_outputs(pairs: list[tuple[Path, Path]], save_probabilities: bool) -> None:
    """No output replaces an input scan or another output (``x.nii`` and ``x.nii.gz``; ``a``'s
    probabilities and ``a_prob``'s mask) or goes into a prepared dataset's own folders, and
    every output folder can be written."""
    scans = {scan.resolve(): scan for scan, _ in pairs}
    written: dict[Path, Path] = {}
    for scan, output in pairs:
        for target in _outputs(output, save_probabilities):
            real = target.resolve()
            if real in scans:
                raise ConfigError(f"output {target} would replace the input scan {scans[real]}")
            if real in written:
                raise DataError(f"{written[real]} and {scan} would both be written to {target}; "
                                "rename or move one of them")
            written[real] = scan
            dataset = dataset_holding(target)
            if dataset:
                raise ConfigError(f"output {target} would change the prepared dataset "
                                  f"{dataset}; choose an output outside it")
            check_name_fits(target)
    for folder in sorted({output.parent for _, output in pairs}):
        check_writable_folder(folder)


def warn_seen_patients(scans: list[Path], model: TrainedModel) -> None:
    """Warn of scans of patients the checkpoint trained or chose its epoch on: their masks
    look better than a new patient's would."""
    split = model.cfg.get("split") or {}
    ids = [patient_id(scan) for scan in scans]
    seen = {role: sorted(set(ids) & set(split.get(role) or [])) for role in ("train", "select")}
    if any(seen.values()):
        parts = [f"{len(ids)} {'trained on' if role == 'train' else 'chose its epoch'} "
                 f"({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
                 for role, ids in seen.items() if ids]
        log.warning("%d of %d scans are patients this checkpoint has seen: %s; their masks are "
                    "no test of how it does on new patients", sum(map(len, seen.values())),
                    len(scans), "; ".join(parts))


def predict_paths(ckpt_path: str | Path, input: str | Path, output: str | Path,
                  largest_component: bool = False, save_probabilities: bool = False,
                  tta: bool = False, overwrite: bool = False, device: str = "auto",
                  batch_size: int = 32, on_error: str = "raise",
                  skip_existing: bool = False) -> list[Path]:
    """One scan or every NIfTI of a folder. With ``on_error=skip`` the scans that cannot be
    read are listed at the end and the call still raises, so a script sees masks missing.
    The network's own output unless ``tta`` and ``largest_component`` are given (the command line
    turns both on: conf/inference/default.yaml)."""
    check_on_error(on_error)
    if overwrite and skip_existing:
        raise ConfigError("overwrite=true and skip_existing=true: choose one (replace existing "
                          "outputs, or keep them and predict only the missing ones)")
    pairs = _pairs(Path(input), Path(output), on_error)
    _check_outputs(pairs, save_probabilities)
    done = [(s, t) for s, t in pairs
            if skip_existing and all(p.exists() for p in _outputs(t, save_probabilities))]
    todo = [pair for pair in pairs if pair not in done]
    for _, target in todo:
        for path in _outputs(target, save_probabilities):
            refuse_existing(path, overwrite or skip_existing)
    if done:
        log.info("%d of %d scans have their outputs already (skip_existing=true)", len(done),
                 len(pairs))
    if not todo:
        return [t for _, t in pairs]
    model = load_checkpoint(ckpt_path, pick_device(device))
    warn_seen_patients([scan for scan, _ in pairs], model)
    predictor = SlicePredictor(model, batch_size, tta)
    if on_error == "raise" and len(todo) > 1:  # a bad scan stops the run before any mask
        for scan, _ in todo:
            scan_slices(load_nifti(scan), scan, predictor.prep)
    written, skipped = [], []
    with sigterm_as_interrupt():  # a kill leaves no temporary beside a mask
        for scan, target in todo:
            try:
                written.append(predict_scan(predictor, scan, target, largest_component,
                                            save_probabilities))
            except DataError as exc:
                if on_error == "raise":
                    raise
                skipped.append((scan, str(exc)))
    if skipped:
        for scan, reason in skipped:
            log.warning("not segmented: %s (%s)", scan, reason)
        raise DataError(f"{len(skipped)} of {len(pairs)} scans could not be segmented (listed "
                        f"above; first: {skipped[0][1]}); the other masks are written, and a "
                        "rerun with skip_existing=true does only the missing ones")
    return [t for s, t in pairs if (s, t) in done] + written


def run(cfg: DictConfig) -> list[Path]:
    pick_device(cfg.device)  # a device this machine lacks, said before the scans are looked at
    return predict_paths(cfg.ckpt_path, cfg.input, cfg.output, cfg.largest_component,
                         cfg.save_probabilities, cfg.tta, cfg.overwrite, cfg.device,
                         cfg.batch_size, cfg.on_error, cfg.skip_existing)
