"""One DICOM MR series from a folder -> a NIfTI image in memory, which prepare treats as a file.

Layout and RAS affine as DICOM-to-NIfTI converters make them: axis 0 along the row cosine,
axis 1 along the column cosine, axis 2 along the normal ``row x col`` in increasing position.
The masks' affine is compared with it, so a sorting or orientation error shows there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from prostate_seg.errors import DataError

ORIENTATION_TOLERANCE = 1e-4
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_REL = 0.01
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
T2_AXIAL_WORDS = ("tra", "ax")
Slices = list[tuple[Path, Any]]


def _floats(ds: Any, path: Path, keyword: str, count: int) -> np.ndarray:
    """A numeric multi-valued tag, or a DataError naming the file and the tag."""
    value = ds.get(keyword)
    try:
        values = np.asarray([float(v) for v in (value if value is not None else [])])
    except (TypeError, ValueError):
        raise DataError(f"{path}: malformed {keyword} {value!r}") from None
    if values.shape != (count,) or not np.isfinite(values).all():
        raise DataError(f"{path}: missing or malformed {keyword} (need {count} numbers, "
                        f"got {value!r})")
    return values


def _read_folder(folder: Path) -> dict[str, Slices]:
    """Every DICOM image under ``folder`` by SeriesInstanceUID."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise DataError(f"{folder}: reading DICOM needs pydicom: "
                        "pip install 'prostate-seg[dicom]'") from None
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM folder not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    groups: dict[str, Slices] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            continue
        except Exception as exc:  # pydicom raises many types for truncated or corrupt files
            raise DataError(f"{path}: unreadable DICOM file ({type(exc).__name__}: "
                            f"{exc})") from None
        uid = ds.get("SeriesInstanceUID")
        if uid and "PixelData" in ds:
            groups.setdefault(str(uid), []).append((path, ds))
            continue
        # pydicom reads a truncated file without complaint: an image class tells it apart from
        # DICOM that is no image (DICOMDIR, reports, presentation states).
        sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        if "Image Storage" in getattr(sop_class, "name", ""):
            raise DataError(f"{path}: DICOM image without SeriesInstanceUID or pixel data "
                            "(truncated file?)")
    if not groups:
        raise DataError(f"{folder}: no DICOM image series found ({len(files)} files, "
                        f"{len(files)} not DICOM images)")
    return groups


def _description(slices: Slices) -> str:
    return str(slices[0][1].get("SeriesDescription", "") or "")


def _choose_series(folder: Path, groups: dict[str, Slices], series: str | None) -> Slices:
    """The requested series, the only one, or the only T2 axial one (PROSTATEx's t2_tse_tra)."""
    found = "; ".join(f"{_description(s)!r} ({len(s)} files, SeriesInstanceUID {uid})"
                      for uid, s in sorted(groups.items(), key=lambda item: _description(item[1])))
    if series is not None:
        matches = [uid for uid, s in groups.items()
                   if uid == series or series.lower() in _description(s).lower()]
        if len(matches) != 1:
            which = "no series" if not matches else f"{len(matches)} series"
            raise DataError(f"{folder}: series={series!r} matches {which}; found: {found}")
        return groups[matches[0]]
    if len(groups) == 1:
        return next(iter(groups.values()))
    t2_axial = [uid for uid, s in groups.items()
                if "t2" in (d := _description(s).lower()) and any(w in d for w in T2_AXIAL_WORDS)]
    if len(t2_axial) == 1:
        return groups[t2_axial[0]]
    raise DataError(f"{folder}: {len(groups)} DICOM series and not exactly one T2 axial one "
                    f"(SeriesDescription with 't2' and 'tra' or 'ax'); found: {found}. Keep only "
                    "the wanted series in the folder, or pass series= (its SeriesInstanceUID or "
                    "part of its SeriesDescription)")


def _slice_spacing(folder: Path, positions: np.ndarray, first: Any) -> float:
    """Distance between neighbouring slices, which must be the same all along the stack."""
    if len(positions) == 1:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = first.get(keyword)
            if value is None or value == "":
                continue
            try:
                spacing = float(value)
            except (TypeError, ValueError):
                spacing = math.nan
            if not (math.isfinite(spacing) and spacing > 0):  # <= 0 would turn the stack over
                raise DataError(f"{folder}: {keyword} {value!r} is not a positive number of mm")
            return spacing
        raise DataError(f"{folder}: a single slice without SliceThickness; slice spacing unknown")
    steps = np.diff(positions)
    if (steps <= SPACING_TOLERANCE_MM).any():
        k = int(np.argmax(steps <= SPACING_TOLERANCE_MM))
        raise DataError(f"{folder}: duplicate slice position {positions[k]:.3f} mm along the "
                        "slice normal (two images of the same slice)")
    spacing = float((positions[-1] - positions[0]) / (len(positions) - 1))
    if np.abs(steps - spacing).max() > max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * spacing):
        raise DataError(f"{folder}: uneven slice spacing (steps from {steps.min():.3f} to "
                        f"{steps.max():.3f} mm; a missing slice?)")
    return spacing


def _pixels(ds: Any, path: Path, rows: int, cols: int) -> np.ndarray:
    """One slice as float32 in physical units (rescale applied)."""
    try:
        pixels = np.asarray(ds.pixel_array, dtype=np.float32)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except Exception as exc:  # missing decoder, bad pixel tags, malformed rescale values
        raise DataError(f"{path}: cannot decode the pixel data ({type(exc).__name__}: "
                        f"{exc})") from None
    if pixels.shape != (rows, cols):
        raise DataError(f"{path}: pixel data of shape {pixels.shape}, expected a single "
                        f"{rows}x{cols} frame (multi-frame and colour images are not supported)")
    return pixels * slope + intercept


def load_dicom_series(folder: Path, series: str | None = None) -> nib.Nifti1Image:
    """One series under ``folder`` (searched recursively) as a RAS NIfTI image; ``series`` (a
    SeriesInstanceUID or part of a SeriesDescription) picks one of several."""
    folder = Path(folder)
    slices = _choose_series(folder, _read_folder(folder), series)
    first_path, first = slices[0]
    rows, cols = int(first.get("Rows") or 0), int(first.get("Columns") or 0)
    for keyword, count in (("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        wanted = _floats(first, first_path, keyword, count)
        for path, ds in slices:
            if not np.allclose(_floats(ds, path, keyword, count), wanted,
                               atol=ORIENTATION_TOLERANCE, rtol=0):
                raise DataError(f"{folder}: slices with different {keyword} "
                                f"({first_path.name} vs {path.name})")
    for path, ds in slices:
        if (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) != (rows, cols):
            raise DataError(f"{folder}: slices of different size ({first_path.name} is "
                            f"{rows}x{cols}, {path.name} is {ds.get('Rows')}x{ds.get('Columns')})")
    orientation = _floats(first, first_path, "ImageOrientationPatient", 6)
    row_cosine, col_cosine = orientation[:3], orientation[3:]
    if not np.allclose([row_cosine @ row_cosine, col_cosine @ col_cosine, row_cosine @ col_cosine],
                       [1, 1, 0], atol=1e-3):
        raise DataError(f"{first_path}: ImageOrientationPatient {orientation.tolist()} is not "
                        "two orthogonal unit vectors")
    normal = np.cross(row_cosine, col_cosine)

    origins = np.stack([_floats(ds, path, "ImagePositionPatient", 3) for path, ds in slices])
    order = np.argsort(origins @ normal, kind="stable")
    origins, slices = origins[order], [slices[k] for k in order]
    positions = origins @ normal
    slice_spacing = _slice_spacing(folder, positions, first)
    off_normal = origins - origins[0] - np.outer(positions - positions[0], normal)
    if np.abs(off_normal).max() > max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * slice_spacing):
        raise DataError(f"{folder}: slice positions do not lie along the slice normal "
                        "(a sheared stack, e.g. gantry tilt, is not supported)")

    volume = np.stack([_pixels(ds, path, rows, cols).T for path, ds in slices], axis=2)
    row_spacing, col_spacing = _floats(first, first_path, "PixelSpacing", 2)
    if not (row_spacing > 0 and col_spacing > 0):  # < 0 would mirror the image
        raise DataError(f"{first_path}: PixelSpacing {first.get('PixelSpacing')} must be "
                        "positive numbers of mm")
    lps = np.eye(4)
    lps[:3, :3] = np.column_stack([row_cosine * col_spacing, col_cosine * row_spacing,
                                   normal * slice_spacing])
    lps[:3, 3] = origins[0]
    img = nib.Nifti1Image(volume, LPS_TO_RAS @ lps)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    return img
