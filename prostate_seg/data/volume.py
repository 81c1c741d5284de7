"""Scans <-> axial display slices ``(Z, rows, cols)``, one convention for every stage.

Reoriented to LPS from the affine (row 0 anterior, column 0 the patient's right); a header
without orientation (qform and sform codes 0) is taken as stored so, with unknown spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_lib
from nibabel.openers import ImageOpener

from prostate_seg.errors import DataError
from prostate_seg.files import not_found

DISPLAY_ORNT = ornt_lib.axcodes2ornt(("L", "P", "S"))
MIN_SPACING_MM = 1e-3  # a voxel axis shorter than a micrometre is a damaged header, not a scan
# A header's unit of distance (xyzt_units) in mm: some tools store metres or microns. "unknown"
# (code 0, what most files hold) is taken as mm, as nibabel and ITK take it.
MM_PER_UNIT = {"unknown": 1.0, "mm": 1.0, "meter": 1000.0, "micron": 1e-3}
MAX_VOXELS = 2**30  # 1 G voxels: far beyond any MRI volume, well inside this machine's memory
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class VolumeGeometry:
    """How a scan's array maps to the slice stack, so predictions can be mapped back."""

    source_shape: tuple[int, ...]  # the stored array's 3D shape
    source_ornt: np.ndarray  # nibabel orientation of the stored axes
    spacing: tuple[float, float, float]  # (slice, row, col) in mm
    spacing_known: bool


def strip_nifti_suffix(name: str) -> str:
    suffix = next((s for s in NIFTI_SUFFIXES if name.lower().endswith(s)), "")
    return name[:len(name) - len(suffix)]


def is_nifti(path: Path) -> bool:
    """By its name, in any case (``B.NII.GZ``, as some exporters write; nibabel reads it)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def load_nifti(path: Path) -> nib.Nifti1Image:
    """A NIfTI file with its voxels read: whatever a damaged file makes nibabel, gzip or numpy
    raise is one problem for the user (this file cannot be read), so one DataError; so is a
    geometry that cannot be right (geometry_of), which would pass as nan or guessed mm or fail
    only when a mask is saved."""
    if not path.is_file():
        raise DataError(f"{path}: {not_found(path)}")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataError(f"{path}: not a NIfTI image ({type(img).__name__})")
        with ImageOpener(str(path)) as stored:  # as written: nibabel turns a 0 spacing into 1
            pixdim = type(img.header).from_fileobj(stored, check=False)["pixdim"][1:4]
        if not (np.isfinite(pixdim).all() and np.isfinite(img.affine).all()):
            raise DataError(f"{path}: header has NaN or infinite voxel spacing "
                            f"{tuple(pixdim.tolist())} or affine; the scan's geometry (and "
                            "every distance in mm) is unknown")
        if _spatial_unit(img) not in MM_PER_UNIT:
            raise DataError(f"{path}: header's unit of distance (xyzt_units "
                            f"{int(img.header['xyzt_units'])}) is none NIfTI defines (metre, mm, "
                            "micron); the scan's size is unknown")
        # a 0 matters where the affine is the qform's, built from pixdim (an sform is whole)
        if int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) == 0 and (
                pixdim == 0).any():
            raise DataError(f"{path}: header has a voxel spacing of 0 (pixdim "
                            f"{tuple(pixdim.tolist())}), which nibabel reads as 1 mm and other "
                            "tools otherwise; the scan's geometry is unknown")
        voxels = int(np.prod(img.shape, dtype=np.float64))
        if voxels > MAX_VOXELS:
            raise DataError(f"{path}: header claims {img.shape} = {voxels:.3g} voxels, "
                            "implausible for a scan (damaged header?)")
        img.get_fdata(dtype=np.float32)  # reads the voxels now, so truncation shows here
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return img


def voxel_array(img: nib.Nifti1Image, path: Path, channel: int | None = None) -> np.ndarray:
    """The 3D array; a 4D image gives ``channel``. A mask (``channel=None``) must have one
    volume along a 4th axis: taking the first of several label maps would pick one silently."""
    data = img.get_fdata(dtype=np.float32)
    if data.ndim == 4:
        if channel is None:
            if data.shape[3] != 1:
                raise DataError(f"{path}: 4D volume of shape {data.shape} has {data.shape[3]} "
                                "volumes along its 4th axis; a mask must be one 3D label map")
            channel = 0
        if not 0 <= channel < data.shape[3]:
            raise DataError(f"{path}: 4D image has {data.shape[3]} channels, "
                            f"image_channel={channel}")
        data = data[..., channel]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if data.size == 0:
        raise DataError(f"{path}: empty volume of shape {data.shape}")
    return data


def _spatial_unit(img: nib.Nifti1Image) -> str | None:
    """The header's unit of distance; None for a code NIfTI does not define (nibabel raises)."""
    try:
        return img.header.get_xyzt_units()[0]
    except KeyError:
        return None


def mm_per_unit(img: nib.Nifti1Image) -> float:
    """What one unit of the affine and pixdim is in mm (the unit load_nifti checked)."""
    return MM_PER_UNIT[_spatial_unit(img)]


def oriented(img: nib.Nifti1Image) -> bool:
    """Whether the header places the scan in the patient (qform or sform code > 0)."""
    return int(img.header["qform_code"]) > 0 or int(img.header["sform_code"]) > 0


def geometry_of(img: nib.Nifti1Image, shape: tuple[int, ...], path: Path) -> VolumeGeometry:
    """Orientation and spacing from one source: the affine, whose voxel axes must have a length
    (a singular one, such as a DICOM PixelSpacing of 0, places every voxel on a plane); a header
    without orientation keeps its array as stored and its spacing unknown. In mm, whatever unit
    the header stores."""
    known = oriented(img)
    if not known:
        zooms = tuple(float(z) * mm_per_unit(img) for z in img.header.get_zooms()[:3])
        return VolumeGeometry(tuple(int(s) for s in shape[:3]), DISPLAY_ORNT,
                              (zooms[2], zooms[1], zooms[0]), False)
    sizes = nib.affines.voxel_sizes(img.affine) * mm_per_unit(img)
    if not (sizes > MIN_SPACING_MM).all():
        raise DataError(f"{path}: affine gives voxel axes of {np.round(sizes, 6).tolist()} mm; "
                        f"each must be longer than {MIN_SPACING_MM} mm (damaged header?)")
    source_ornt = ornt_lib.io_orientation(img.affine)
    lps_spacing = [0.0, 0.0, 0.0]
    for axis, (new_axis, _) in enumerate(ornt_lib.ornt_transform(source_ornt, DISPLAY_ORNT)):
        lps_spacing[int(new_axis)] = float(sizes[axis])
    return VolumeGeometry(tuple(int(s) for s in shape[:3]), source_ornt,
                          (lps_spacing[2], lps_spacing[1], lps_spacing[0]), True)


def display_affine(img: nib.Nifti1Image, geometry: VolumeGeometry) -> np.ndarray:
    """World affine of the reoriented array, in mm."""
    to_display = ornt_lib.ornt_transform(geometry.source_ornt, DISPLAY_ORNT)
    to_mm = np.diag([mm_per_unit(img)] * 3 + [1.0])
    return to_mm @ img.affine @ ornt_lib.inv_ornt_aff(to_display, geometry.source_shape)


def to_slices(array: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """Stored 3D array -> (Z, rows, cols) display slices."""
    to_display = ornt_lib.ornt_transform(geometry.source_ornt, DISPLAY_ORNT)
    return np.ascontiguousarray(ornt_lib.apply_orientation(array, to_display).transpose(2, 1, 0))


def from_slices(slices: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """(Z, rows, cols) display slices -> the stored array layout (inverse of ``to_slices``)."""
    back = ornt_lib.ornt_transform(DISPLAY_ORNT, geometry.source_ornt)
    return np.ascontiguousarray(ornt_lib.apply_orientation(slices.transpose(2, 1, 0), back))


INTENSITY_MODES = ("window", "landmarks")
LANDMARKS = 21  # percentiles from the window's low to its high end, in equal steps


def to_grey_levels(volume: np.ndarray, path: Path, low_pct: float, high_pct: float,
                   intensity: str = "window") -> np.ndarray:
    """A volume's grey levels 0..255 from its own percentiles. ``window`` (the study's): linear
    between the low and high percentile, clipped. ``landmarks``: piecewise linear through 21
    percentiles from low to high onto equal steps of grey (histogram standardisation as
    Nyul and Udupa's, onto a fixed scale instead of one learnt from training scans), so that
    any monotone change of a scanner's intensities (gain, offset, contrast curve) gives nearly
    the same input: MRI grey levels have no unit across centres and coils. ``intensity`` is
    one of INTENSITY_MODES, checked by PrepareSettings."""
    if not np.isfinite(volume).all():
        bad = int((~np.isfinite(volume)).sum())
        raise DataError(f"{path}: {bad} voxels are NaN or infinite")
    low, high = np.percentile(volume, [low_pct, high_pct])
    if high <= low:
        low, high = float(volume.min()), float(volume.max())
        if high <= low:
            raise DataError(f"{path}: constant image (every voxel is {low:g}); nothing to segment")
    if intensity == "landmarks":
        marks = np.percentile(volume, np.linspace(low_pct, high_pct, LANDMARKS))
        marks, first = np.unique(marks, return_index=True)
        if len(marks) > 2:  # tied percentiles: the lowest grey (background), the top at 255
            levels = np.append(np.linspace(0.0, 255.0, LANDMARKS)[first[:-1]], 255.0)
            return np.rint(np.interp(volume, marks, levels)).astype(np.uint8)
    scaled = (np.clip(volume, low, high) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)
