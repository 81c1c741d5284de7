"""MRI-like pelvis phantoms with a prostate-like gland, so everything runs with no download.

Fat rim, muscle, bladder, rectum, femoral heads and a lobulated gland of low contrast (brighter
peripheral zone, nodular transition zone); a bias field and Rician noise. Phantom ``i`` of seed
``s`` is the same on every machine.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import DictConfig
from scipy import ndimage

from prostate_seg.data.prepare import LAYOUTS
from prostate_seg.errors import DataError
from prostate_seg.files import (check_writable_folder, parent_stops, refuse_existing,
                                replacing, sigterm_as_interrupt)
from prostate_seg.settings import check_values

FOLDERS = ("images", "masks")  # as prepare finds scans and their masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phantom:
    patient: str
    image: np.ndarray  # (Z, rows, cols) float32, display orientation
    mask: np.ndarray  # (Z, rows, cols) uint8
    spacing: tuple[float, float, float]  # (slice, row, col) mm


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float,
             rx: float) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def make_phantom(seed: int, index: int, size: int = 128) -> Phantom:
    """Build phantom ``index`` of the family ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, index])
    num_slices = int(rng.integers(15, 26))
    gland_slices = int(rng.integers(max(5, num_slices - 10), num_slices - 3))
    first = int(rng.integers(2, num_slices - gland_slices - 1 + 1))
    z_mid = first + (gland_slices - 1) / 2.0
    z_half = gland_slices / 2.0

    coords = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = np.meshgrid(coords, coords, indexing="ij")  # y: anterior (-) to posterior (+)
    theta = np.arctan2(y, x)

    body_ry, body_rx = rng.uniform(0.62, 0.75), rng.uniform(0.82, 0.95)
    gland_cy, gland_cx = rng.uniform(-0.05, 0.2), rng.uniform(-0.12, 0.12)
    gland_ry, gland_rx = rng.uniform(0.12, 0.22), rng.uniform(0.15, 0.28)
    lobes = [(k, rng.uniform(0.0, 0.12), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    twist = rng.uniform(-0.4, 0.4)
    head_cx = (-rng.uniform(0.52, 0.62), rng.uniform(0.52, 0.62))
    gland_level = rng.uniform(1.15, 1.4)  # relative to muscle: low contrast on purpose
    pz_level = gland_level + rng.uniform(0.2, 0.5)
    tz_texture = _smooth_noise(rng, (num_slices, size, size), sigma=(0.8, 2.5, 2.5))
    tissue_texture = _smooth_noise(rng, (num_slices, size, size), sigma=(1.0, 4.0, 4.0))

    image = np.zeros((num_slices, size, size), np.float32)
    mask = np.zeros((num_slices, size, size), np.uint8)
    for z in range(num_slices):
        body = _ellipse(y, x, 0.0, 0.0, body_ry, body_rx)
        inner = _ellipse(y, x, 0.0, 0.0, body_ry - 0.08, body_rx - 0.08)
        sl = np.where(body, 2.2, 0.05).astype(np.float32)  # fat rim is bright on T2
        sl[inner] = 1.0 + 0.08 * tissue_texture[z][inner]  # muscle / soft tissue
        for cx in head_cx:  # femoral heads: dark cortex, medium marrow
            sl[_ellipse(y, x, 0.05, cx, 0.17, 0.15)] = 0.25
            sl[_ellipse(y, x, 0.05, cx, 0.13, 0.11)] = 1.6
        rectum_cy = gland_cy + gland_ry + 0.17
        sl[_ellipse(y, x, rectum_cy, gland_cx, 0.13, 0.15)] = 0.35
        sl[_ellipse(y, x, rectum_cy, gland_cx, 0.06, 0.08)] = 1.8
        if z > z_mid:  # bladder above the gland's middle, anterior
            r = 0.15 + 0.3 * min(1.0, (z - z_mid) / max(z_half, 1.0))
            sl[_ellipse(y, x, gland_cy - gland_ry - r * 0.6, gland_cx, r * 0.7, r)] = 3.2

        dz = (z - z_mid) / z_half
        if abs(dz) < 1.0:
            scale = np.sqrt(1.0 - dz**2) * (1.0 + 0.1 * dz)
            wobble = 1.0 + sum(a * np.cos(k * (theta + twist * dz) + p) for k, a, p in lobes)
            r = np.sqrt(((y - gland_cy) / gland_ry) ** 2 + ((x - gland_cx) / gland_rx) ** 2)
            gland = r <= scale * wobble
            if gland.any():
                mask[z] = gland
                tz = r <= 0.65 * scale * wobble
                pz = gland & ~tz & (y > gland_cy - 0.3 * gland_ry)  # peripheral zone: posterior
                sl[gland] = gland_level + 0.12 * tz_texture[z][gland]
                sl[pz] = pz_level + 0.05 * tz_texture[z][pz]
                sl[tz] = gland_level - 0.1 + 0.25 * tz_texture[z][tz]
        image[z] = sl

    image = ndimage.gaussian_filter(image, (0.0, 0.7, 0.7))  # partial-volume blur
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, num_slices), coords, coords, indexing="ij")
    c = rng.uniform(-0.25, 0.25, size=4)
    bias = np.exp(c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * zz).astype(np.float32)
    sigma = rng.uniform(0.08, 0.16)
    real = image * bias + sigma * rng.standard_normal(image.shape)
    imag = sigma * rng.standard_normal(image.shape)
    image = np.sqrt(real**2 + imag**2) * 600.0  # Rician magnitude, scanner-like range

    pixel = float(rng.uniform(0.5, 0.8)) * 128.0 / size
    return Phantom(patient_name(index), image.astype(np.float32), mask,
                   (float(rng.uniform(3.0, 3.6)), pixel, pixel))


PREFIX = "phantom"  # every phantom's patient id: phantom000, phantom001, ...


def patient_name(index: int) -> str:
    return f"{PREFIX}{index:03d}"


def is_phantom(path: Path) -> bool:
    """Named as this command names its phantoms (a scan ``phantom_x`` of the user's is not)."""
    return re.fullmatch(rf"{PREFIX}\d{{3,}}\.nii\.gz", path.name) is not None


def refuse_other_scans(output_dir: Path) -> None:
    """Phantoms written among real scans would pass for patients of that dataset."""
    for folder in sorted({folder for layout in LAYOUTS for folder in layout}):
        if not (output_dir / folder).is_dir():
            continue
        for path in sorted((output_dir / folder).iterdir()):
            if not path.name.startswith(".") and not is_phantom(path):
                raise DataError(f"{path}: output_dir={output_dir} holds files that are not "
                                "this command's phantoms; phantoms among them would pass for "
                                "patients: choose another folder")


def outputs(output_dir: Path, index: int) -> list[Path]:
    return [output_dir / folder / f"{patient_name(index)}.nii.gz" for folder in FOLDERS]


def _nifti(array: np.ndarray, dtype: type, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def write_phantom(phantom: Phantom, output_dir: Path) -> None:
    """A NIfTI pair with stored axes (x, y, z) = display (cols, rows, slices), LPS like most
    DICOM-derived NIfTI: x to the left, y to posterior. Both are written to temporaries and
    renamed at the end, the mask first: a stopped run leaves no half file and no image without
    its mask (which prepare would take for a patient)."""
    slice_mm, row_mm, col_mm = phantom.spacing
    affine = np.diag([-col_mm, -row_mm, slice_mm, 1.0])
    image_path, mask_path = (output_dir / folder / f"{phantom.patient}.nii.gz"
                             for folder in FOLDERS)
    image_path.unlink(missing_ok=True)  # replaced: never the new mask beside the old image
    with replacing(image_path) as image_tmp, replacing(mask_path) as mask_tmp:  # inner first
        nib.save(_nifti(np.rint(phantom.image), np.int16, affine), str(image_tmp))
        nib.save(_nifti(phantom.mask, np.uint8, affine), str(mask_tmp))


def _make_and_write(seed: int, index: int, size: int, output_dir: Path) -> str:
    phantom = make_phantom(seed, index, size)
    write_phantom(phantom, output_dir)
    return phantom.patient


def generate(output_dir: str | Path, num_patients: int, seed: int = 0, size: int = 128,
             workers: int = 0, overwrite: bool = False) -> list[str]:
    """Write ``num_patients`` phantoms (in ``workers`` processes); returns their patient ids.
    Phantoms already there are replaced only with ``overwrite``, which also removes those of an
    earlier, larger set: another seed or size under the same names would pass for the first."""
    check_values("synthetic", output_dir=output_dir, num_patients=num_patients, seed=seed,
                 size=size, workers=workers, overwrite=overwrite)
    output_dir = Path(output_dir)
    for folder in FOLDERS:
        check_writable_folder(output_dir / folder)
    refuse_other_scans(output_dir)
    written = {path for index in range(num_patients) for path in outputs(output_dir, index)}
    for path in sorted(written):
        refuse_existing(path, overwrite)
    if overwrite:  # the phantoms of an earlier, larger set would pass for this one's
        for folder in FOLDERS:
            for old in filter(is_phantom, (output_dir / folder).glob("*")):
                if old not in written:
                    old.unlink()
    jobs = [(seed, index, size, output_dir) for index in range(num_patients)]
    with sigterm_as_interrupt():  # a kill leaves no temporary either
        if workers > 1:
            with ProcessPoolExecutor(workers, initializer=parent_stops) as pool:
                patients = list(pool.map(_make_and_write, *zip(*jobs)))
        else:
            patients = [_make_and_write(*job) for job in jobs]
    log.info("wrote %d phantoms to %s", num_patients, output_dir)
    return patients


def run(cfg: DictConfig) -> list[str]:
    """The task of ``python -m prostate_seg synthetic``."""
    return generate(cfg.output_dir, cfg.num_patients, cfg.seed, cfg.size, cfg.workers,
                    cfg.overwrite)
