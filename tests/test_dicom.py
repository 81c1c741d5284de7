"""DICOM series -> NIfTI: slice order, voxel layout and RAS affine, series choice, bad input."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from prostate_seg.data.dicom import load_dicom_series  # noqa: E402
from prostate_seg.errors import DataError  # noqa: E402
from prostate_seg.data.prepare import Case, PrepareSettings, load_case, prepare  # noqa: E402

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PIXEL_SPACING = (0.6, 0.5)  # (row spacing, column spacing), as DICOM orders them
SLICE_SPACING = 3.0
ROWS, COLS, NUM_SLICES = 6, 8, 4
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _ds(values) -> list[str]:
    """Decimal strings short enough for DICOM's 16-character DS limit."""
    return [f"{float(v):.10g}" for v in values]


def known_volume() -> np.ndarray:
    """Stored pixel values per slice, ``(slices, rows, cols)``; asymmetric so flips show."""
    volume = np.arange(NUM_SLICES * ROWS * COLS, dtype=np.uint16).reshape(NUM_SLICES, ROWS, COLS)
    volume[0, 0, COLS - 1] = 4000  # a marker: first slice, top row, last column
    return volume


def write_series(folder: Path, pixels: np.ndarray, *, origin=(-10.0, -20.0, 5.0),
                 orientation=AXIAL, slice_spacing: float = SLICE_SPACING,
                 positions: list[float] | None = None, description: str = "t2_tse_tra",
                 uid: str | None = None, slope: float = 2.0, intercept: float = -100.0,
                 reverse_instances: bool = False, seed: int = 0, pixel_spacing=PIXEL_SPACING,
                 thickness: str | None = None) -> list[np.ndarray]:
    """Write slice k at ``origin + positions[k] * normal``, in shuffled order with meaningless
    names (some in a nested folder, none with a .dcm suffix); returns each slice's position."""
    uid = uid or generate_uid()
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    if positions is None:
        positions = [k * slice_spacing for k in range(len(pixels))]
    ipps = [np.asarray(origin) + p * normal for p in positions]
    order = list(range(len(pixels)))
    random.Random(seed).shuffle(order)
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.SeriesInstanceUID = uid
        ds.SeriesDescription = description
        ds.InstanceNumber = len(pixels) - k if reverse_instances else k + 1
        ds.ImageOrientationPatient = _ds(orientation)
        ds.ImagePositionPatient = _ds(ipps[k])
        ds.PixelSpacing = _ds(pixel_spacing)
        ds.SliceThickness = thickness or _ds([slice_spacing])[0]
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = _ds([slope])[0], _ds([intercept])[0]
        ds.PixelData = pixels[k].astype("<u2").tobytes()
        target = folder / ("sub" if n % 2 else "") / f"{uid[-6:]}x{n:02d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    return ipps


def ras(lps_point) -> np.ndarray:
    return np.asarray(lps_point, dtype=float) * LPS_TO_RAS


def test_axial_series_voxels_affine_and_zooms(tmp_path):
    pixels = known_volume()
    ipps = write_series(tmp_path, pixels)
    (tmp_path / "README.txt").write_text("not a DICOM file")

    img = load_dicom_series(tmp_path)

    data = img.get_fdata(dtype=np.float32)
    assert data.shape == (COLS, ROWS, NUM_SLICES)
    expected = pixels.astype(np.float32) * 2.0 - 100.0
    for k in range(NUM_SLICES):
        np.testing.assert_array_equal(data[:, :, k], expected[k].T)
    assert data[COLS - 1, 0, 0] == 4000 * 2.0 - 100.0

    affine = img.affine
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [*ras(ipps[0]), 1], atol=1e-6)
    col_spacing = PIXEL_SPACING[1]
    np.testing.assert_allclose(affine @ [1, 0, 0, 1], [*ras(ipps[0] + [col_spacing, 0, 0]), 1],
                               atol=1e-6)
    np.testing.assert_allclose(affine @ [0, 1, 0, 1],
                               [*ras(ipps[0] + [0, PIXEL_SPACING[0], 0]), 1], atol=1e-6)
    np.testing.assert_allclose(affine @ [0, 0, 3, 1], [*ras(ipps[3]), 1], atol=1e-6)
    np.testing.assert_allclose(img.header.get_zooms(), (0.5, 0.6, SLICE_SPACING), atol=1e-6)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
    assert img.header.get_xyzt_units()[0] == "mm"
    assert nib.aff2axcodes(affine) == ("L", "P", "S")


def _rotation(yaw: float, tilt: float) -> np.ndarray:
    cz, sz, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(tilt), np.sin(tilt)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


def test_oblique_series_acquired_in_decreasing_position_is_sorted(tmp_path):
    rotation = _rotation(np.radians(25), np.radians(-15))
    orientation = (*rotation[:, 0], *rotation[:, 1])
    pixels = known_volume()
    # Slice k of the acquisition sits at -3k mm along the normal: storage must reverse it.
    positions = [-k * SLICE_SPACING for k in range(NUM_SLICES)]
    ipps = write_series(tmp_path, pixels, orientation=orientation, positions=positions,
                        reverse_instances=True, seed=3)

    img = load_dicom_series(tmp_path)

    data = img.get_fdata(dtype=np.float32)
    expected = pixels.astype(np.float32) * 2.0 - 100.0
    for k in range(NUM_SLICES):
        np.testing.assert_array_equal(data[:, :, k], expected[NUM_SLICES - 1 - k].T)
    row, col = rotation[:, 0], rotation[:, 1]
    for k in range(NUM_SLICES):  # every voxel lands where its DICOM slice says it is
        for i, j in [(0, 0), (COLS - 1, 0), (2, ROWS - 1)]:
            lps = ipps[NUM_SLICES - 1 - k] + i * PIXEL_SPACING[1] * row + j * PIXEL_SPACING[0] * col
            np.testing.assert_allclose(img.affine @ [i, j, k, 1], [*ras(lps), 1], atol=1e-5)
    np.testing.assert_allclose(img.header.get_zooms(), (0.5, 0.6, SLICE_SPACING), atol=1e-5)


def test_two_series_picks_t2_axial_or_the_one_asked_for(tmp_path):
    t2_uid, adc_uid = generate_uid(), generate_uid()
    write_series(tmp_path / "a", known_volume(), description="ep2d_diff_tra_ADC", uid=adc_uid,
                 intercept=0.0, slope=1.0)
    write_series(tmp_path / "b", known_volume(), description="T2_TSE_TRA", uid=t2_uid)
    write_series(tmp_path / "c", known_volume()[:2], description="t2_tse_sag")

    picked = load_dicom_series(tmp_path).get_fdata()
    assert picked[0, 0, 0] == -100.0  # the T2 series' rescale (slope 2, intercept -100)
    by_uid = load_dicom_series(tmp_path, series=adc_uid).get_fdata()
    assert by_uid[0, 0, 0] == 0.0 and by_uid.shape[2] == NUM_SLICES
    by_description = load_dicom_series(tmp_path, series="SAG").get_fdata()
    assert by_description.shape[2] == 2
    with pytest.raises(DataError, match="matches no series"):
        load_dicom_series(tmp_path, series="t1_vibe")
    with pytest.raises(DataError, match="matches 2 series"):
        load_dicom_series(tmp_path, series="t2_tse")


def test_ambiguous_series_is_an_error_listing_them(tmp_path):
    write_series(tmp_path / "a", known_volume(), description="t2_tse_tra")
    write_series(tmp_path / "b", known_volume(), description="t2_tse_tra_repeat")
    with pytest.raises(DataError, match="not exactly one T2 axial") as err:
        load_dicom_series(tmp_path)
    assert "'t2_tse_tra'" in str(err.value) and "'t2_tse_tra_repeat'" in str(err.value)
    assert "series=" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize("positions, message", [
    ([0.0, 3.0, 6.0, 10.0], "uneven slice spacing"),
    ([0.0, 3.0, 3.0, 6.0], "duplicate slice position"),
])
def test_bad_slice_positions(tmp_path, positions, message):
    write_series(tmp_path, known_volume(), positions=positions)
    with pytest.raises(DataError, match=message) as err:
        load_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("slices, settings, message", [
    (4, {"pixel_spacing": (0.0, 0.5)}, "PixelSpacing [0, 0.5] must be positive numbers"),
    (4, {"pixel_spacing": (-0.6, 0.5)}, "PixelSpacing [-0.6, 0.5] must be positive numbers"),
    (1, {"thickness": "0"}, "SliceThickness '0' is not a positive number of mm"),
    (1, {"thickness": "-3"}, "SliceThickness '-3' is not a positive number of mm"),
])
def test_a_spacing_that_is_not_positive_is_an_error(tmp_path, slices, settings, message):
    """0 places every voxel on a plane; < 0 mirrors the image or turns the stack over."""
    write_series(tmp_path, known_volume()[:slices], **settings)
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_slices_that_disagree_are_an_error(tmp_path):
    uid = generate_uid()
    write_series(tmp_path / "a", known_volume()[:2], uid=uid)
    write_series(tmp_path / "b", known_volume()[:2], uid=uid, positions=[6.0, 9.0],
                 orientation=(1.0, 0.0, 0.0, 0.0, 0.9998, 0.02))
    with pytest.raises(DataError, match="different ImageOrientationPatient"):
        load_dicom_series(tmp_path)


@pytest.mark.parametrize("keep_bytes, message", [
    (400, "without SeriesInstanceUID or pixel data"),  # cut inside the header
    (-10, "cannot decode the pixel data"),  # cut inside the pixel data
])
def test_truncated_file_is_an_error_naming_it(tmp_path, keep_bytes, message):
    write_series(tmp_path, known_volume())
    victim = sorted(p for p in tmp_path.rglob("*") if p.is_file())[0]
    victim.write_bytes(victim.read_bytes()[:keep_bytes])
    with pytest.raises(DataError, match=message) as err:
        load_dicom_series(tmp_path)
    assert str(victim) in str(err.value)


def test_empty_or_non_dicom_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no DICOM image series") as err:
        load_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"1 files, 1 not DICOM"):
        load_dicom_series(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_dicom_series(tmp_path / "missing")


def test_without_pydicom_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(DataError, match=r"pip install 'prostate-seg\[dicom\]'"):
        load_dicom_series(tmp_path)


@pytest.mark.parametrize("row_sign, blob_left_half", [(1.0, True), (-1.0, False)])
def test_prepare_end_to_end_with_dicom_folder_and_nifti_mask(tmp_path, row_sign, blob_left_half):
    """The mask is on the DICOM grid (same RAS affine); the blob must land in the right place.

    Display puts the patient's right at column 0 and anterior at row 0. With the row cosine
    towards the patient's left (+x in LPS) column index 2..4 is near the patient's right, so
    the blob is in the PNG's left half; with the row cosine flipped it moves to the right half.
    """
    rng = np.random.default_rng(0)
    rows, cols, num_slices = 12, 16, 5
    pixels = rng.integers(100, 1000, size=(num_slices, rows, cols)).astype(np.uint16)
    orientation = (row_sign, 0.0, 0.0, 0.0, 1.0, 0.0)
    image_dir = tmp_path / "in" / "images" / "ProstateX-0001"
    ipps = write_series(image_dir, pixels, orientation=orientation, seed=5)
    write_series(image_dir / "other", pixels[:2], description="t2_tse_sag")

    affine = np.eye(4)
    affine[:3, 0] = ras([row_sign * PIXEL_SPACING[1], 0, 0])
    affine[:3, 1] = ras([0, PIXEL_SPACING[0], 0])
    affine[:3, 2] = ras([0, 0, row_sign * SLICE_SPACING])  # normal = row x col
    affine[:3, 3] = ras(ipps[0])  # slice 0 is first along the normal either way
    mask = np.zeros((cols, rows, num_slices), dtype=np.uint8)  # (column, row, slice)
    mask[2:5, 1:4, 1] = 1  # columns 2..4, rows 1..3 (anterior), second stored slice
    mask_path = tmp_path / "in" / "masks" / "ProstateX-0001.nii.gz"
    mask_path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask, affine), mask_path)

    out = tmp_path / "out"
    report = prepare(tmp_path / "in", out, PrepareSettings(image_size=32))

    assert report["patients"] == 1 and report["slices"] == num_slices
    blob_slice = 1 if row_sign > 0 else num_slices - 2  # display slices run inferior -> superior
    for k in range(num_slices):
        png = cv2.imread(str(out / "masks" / f"ProstateX-0001_{k:03d}.png"), cv2.IMREAD_GRAYSCALE)
        assert png.shape == (32, 32)
        assert (png.any()) == (k == blob_slice)
    png = cv2.imread(str(out / "masks" / f"ProstateX-0001_{blob_slice:03d}.png"),
                     cv2.IMREAD_GRAYSCALE)
    hit_rows, hit_cols = np.nonzero(png)
    assert hit_rows.max() < 16  # anterior half (row 0 is anterior)
    assert (hit_cols.max() < 16) if blob_left_half else (hit_cols.min() >= 16)

    image, gland, _ = load_case(Case("ProstateX-0001", image_dir, mask_path),
                                PrepareSettings(image_size=32))
    assert image.shape == gland.shape == (num_slices, rows, cols)
    assert int(gland.sum()) == 9
