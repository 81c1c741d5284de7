"""prepare: NIfTI pairs -> PNG slices + manifest, with orientation taken from the affine."""

import csv
import json
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest

from prostate_seg.data.resize import fit_slice, unfit_slice
from prostate_seg.data.volume import geometry_of, to_slices, to_grey_levels
from prostate_seg.errors import DataError
from prostate_seg.data.prepare import PrepareSettings, content_digest, prepare


def _read(path):
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def test_round_trip_masks_equal_the_resized_volume_mask(phantoms, prepared):
    with open(prepared / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    patients = sorted({r["patient"] for r in rows})
    assert patients == sorted(p.name.split(".")[0] for p in (phantoms / "images").iterdir())
    for patient in patients[:3]:
        img = nib.load(phantoms / "masks" / f"{patient}.nii.gz")
        data = np.asarray(img.dataobj)
        slices = to_slices(data, geometry_of(img, data.shape, Path('x')))
        mine = [r for r in rows if r["patient"] == patient]
        assert [int(r["slice"]) for r in mine] == list(range(len(slices)))  # every slice kept
        for row, mask in zip(mine, slices):
            assert row["mask"] == f"masks/{patient}_{int(row['slice']):03d}.png"
            png = _read(prepared / row["mask"])
            assert png.shape == (48, 48) and set(np.unique(png)) <= {0, 255}
            assert np.array_equal(png, fit_slice(mask * 255, 48, "resize", nearest=True))
            assert int(row["gland_pixels"]) == int(mask.sum())
            assert (int(row["height"]), int(row["width"])) == mask.shape
            assert float(row["spacing_slice"]) == pytest.approx(img.header.get_zooms()[2], rel=1e-4)


def test_images_are_windowed_per_volume(phantoms, prepared):
    img = nib.load(phantoms / "images" / "phantom001.nii.gz")
    data = img.get_fdata(dtype=np.float32)
    slices = to_slices(data, geometry_of(img, data.shape, Path("x")))
    windowed = to_grey_levels(slices, "x", 0.5, 99.5, "window")  # prepare's default
    z = len(windowed) // 2
    assert np.array_equal(_read(prepared / f"images/phantom001_{z:03d}.png"),
                          fit_slice(windowed[z], 48, "resize"))
    assert windowed.min() == 0 and windowed.max() == 255


def test_window_is_linear_between_percentiles_and_landmarks_undo_a_scanners_curve(phantoms):
    """window (the study's): clip to the 0.5/99.5 percentiles, then linear to 0..255, computed
    by hand. landmarks: the same volume after another gain, offset and contrast (gamma) gets
    nearly the same grey levels, where window moves them by tens; both keep tied
    background at 0."""
    data = nib.load(phantoms / "images" / "phantom001.nii.gz").get_fdata()
    low, high = np.percentile(data, [0.5, 99.5])
    by_hand = np.rint((np.clip(data, low, high) - low) / (high - low) * 255)
    assert np.array_equal(to_grey_levels(data, "x", 0.5, 99.5), by_hand)
    data[:, :8] = data.min()  # a band of tied background, as outside a scanner's field of view
    unit = (data - data.min()) / (data.max() - data.min())
    for gamma, gain, offset in ((1.8, 40.0, 100.0), (0.5, 0.01, 0.0)):
        other = gain * unit ** gamma + offset
        change = {mode: np.abs(to_grey_levels(data, "x", 0.5, 99.5, mode).astype(int)
                               - to_grey_levels(other, "x", 0.5, 99.5, mode)).mean()
                  for mode in ("window", "landmarks")}
        assert change["landmarks"] < 1.5 and change["window"] > 10, change
    landmarks = to_grey_levels(data, "x", 0.5, 99.5, "landmarks")
    assert landmarks[:, :8].max() == 0 and landmarks.max() == 255
    data[:, -8:] = data.max()  # a saturated band at the top reaches 255 as well
    assert to_grey_levels(data, "x", 0.5, 99.5, "landmarks")[:, -8:].min() == 255


def test_prepare_records_settings_and_volumes(prepared):
    settings = json.loads((prepared / "prepare.json").read_text())
    assert settings["image_size"] == 48 and settings["fit"] == "resize"
    with np.load(prepared / "volumes" / "phantom000.npz") as stored:
        assert stored["mask"].shape[1:] == (64, 64) and bool(stored["spacing_known"])


def _asymmetric_volume():
    image = np.zeros((20, 30, 6), np.float32)  # stored (x, y, z)
    image[2:8, 3:10, :] = 100.0   # a block near the origin corner ...
    image[15:18, 20:28, 2:4] = 50.0  # ... and a smaller one elsewhere
    image += np.arange(6)[None, None, :]  # slice-dependent offset, so z order is visible
    mask = np.zeros(image.shape, np.uint8)
    mask[3:7, 4:9, 1:5] = 1
    return image, mask


def _write_pair(root, name, image, mask, affine, mask_affine=None):
    for folder, array, aff in (("images", image, affine), ("masks", mask, mask_affine)):
        nii = nib.Nifti1Image(array, affine if aff is None else aff)
        nii.set_qform(nii.affine, code=1)
        nii.set_sform(nii.affine, code=1)
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nii, str(root / folder / f"{name}.nii.gz"))


def test_the_same_scan_stored_in_two_orientations_gives_the_same_slices(tmp_path):
    image, mask = _asymmetric_volume()
    ras = np.diag([0.5, 0.6, 3.0, 1.0])
    _write_pair(tmp_path / "a", "case", image, mask, ras)
    # The same world grid stored with x and y reversed and axes swapped: LPS-like, transposed.
    flipped = image[::-1, ::-1].transpose(1, 0, 2).copy()
    flipped_mask = mask[::-1, ::-1].transpose(1, 0, 2).copy()
    lps = np.array([[0, -0.5, 0, 0.5 * 19], [-0.6, 0, 0, 0.6 * 29], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    _write_pair(tmp_path / "b", "case", flipped, flipped_mask, lps)
    # The mask alone stored in another orientation than its image: still lines up.
    _write_pair(tmp_path / "c", "case", image, flipped_mask, ras, mask_affine=lps)
    outs = [prepare(tmp_path / k, tmp_path / f"out_{k}", PrepareSettings(image_size=32))
            for k in "abc"]
    assert all(o["slices"] == 6 for o in outs)
    for z in range(6):
        name = f"case_{z:03d}.png"
        ref_img, ref_mask = _read(tmp_path / "out_a/images" / name), _read(tmp_path / "out_a/masks" / name)
        for k in "bc":
            assert np.array_equal(_read(tmp_path / f"out_{k}/images" / name), ref_img)
            assert np.array_equal(_read(tmp_path / f"out_{k}/masks" / name), ref_mask)
    # Display convention: row 0 anterior (high y in RAS), column 0 the patient's right (high x).
    with np.load(tmp_path / "out_a/volumes/case.npz") as stored:
        display = stored["mask"]
    assert display.shape == (6, 30, 20)
    assert np.array_equal(display[2], mask[::-1, ::-1, 2].T)


def _store_in_unit(path, unit, per_mm):
    """The same scan with its affine in ``unit`` (``per_mm`` of them in one mm)."""
    img = nib.load(path)
    again = nib.Nifti1Image(np.asarray(img.dataobj), np.diag([per_mm] * 3 + [1.0]) @ img.affine)
    again.set_qform(again.affine, code=1)
    again.set_sform(again.affine, code=1)
    if isinstance(unit, str):
        again.header.set_xyzt_units(unit)
    else:
        again.header["xyzt_units"] = unit
    nib.save(again, str(path))


def test_a_scan_stored_in_metres_or_microns_is_measured_in_mm(tmp_path):
    """xyzt_units says what the affine's unit is: a scan in metres used to get a spacing 1000
    times too small, labelled mm; its mask in microns still lies on it."""
    image, mask = _asymmetric_volume()
    affine = np.array([[0.5, 0, 0, -4.0], [0, 0.6, 0, 7.0], [0, 0, 3.0, 12.0], [0, 0, 0, 1]])
    for k in "ab":
        _write_pair(tmp_path / k, "case", image, mask, affine)
    _store_in_unit(tmp_path / "b/images/case.nii.gz", "meter", 1e-3)
    _store_in_unit(tmp_path / "b/masks/case.nii.gz", "micron", 1e3)
    for k in "ab":
        prepare(tmp_path / k, tmp_path / f"out_{k}", PrepareSettings(image_size=32))
    for k in "ab":
        with np.load(tmp_path / f"out_{k}/volumes/case.npz") as stored:
            assert stored["spacing"] == pytest.approx([3.0, 0.6, 0.5])
            assert stored["mask"].sum() == mask.sum()
    for png in sorted((tmp_path / "out_a").glob("*/*.png")):  # the same slices
        assert png.read_bytes() == (tmp_path / "out_b" / png.relative_to(tmp_path / "out_a")
                                    ).read_bytes()
    # microns read as mm made this a 0.5 mm scan; it is 0.0005 mm, a damaged header
    _store_in_unit(tmp_path / "a/images/case.nii.gz", "micron", 1.0)
    with pytest.raises(DataError, match=r"images/case.nii.gz: affine gives voxel axes of "
                                        r"\[0.0005, 0.0006, 0.003\] mm"):
        prepare(tmp_path / "a", tmp_path / "out_c", PrepareSettings(image_size=32))
    _store_in_unit(tmp_path / "b/masks/case.nii.gz", 4, 1.0)  # a code NIfTI does not define
    with pytest.raises(DataError, match=r"masks/case.nii.gz: header's unit of distance "
                                        r"\(xyzt_units 4\) is none NIfTI defines"):
        prepare(tmp_path / "b", tmp_path / "out_d", PrepareSettings(image_size=32))


def test_spacing_comes_from_the_affine_that_orients_the_scan():
    """A header whose pixdim disagrees with its sform (written by a tool that updated one):
    orientation and spacing both from the affine, not one from each."""
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([-0.5, 0.6, 3.0, 1.0]))
    img.header["pixdim"][1:4] = 1.0
    geometry = geometry_of(img, img.shape, Path("x"))
    assert geometry.spacing == pytest.approx((3.0, 0.6, 0.5)) and geometry.spacing_known


def test_decathlon_layout_4d_images_and_zonal_labels(tmp_path):
    image, mask = _asymmetric_volume()
    four_d = np.stack([image, image * 0 + 7], axis=-1)  # T2 and a second channel (ADC)
    zonal = mask.astype(np.uint8)
    zonal[3:5] *= 2  # label 1 = PZ, 2 = TZ
    root = tmp_path / "Task05"
    for folder, array in (("imagesTr", four_d), ("labelsTr", zonal)):
        (root / folder).mkdir(parents=True)
        nib.save(nib.Nifti1Image(array, np.diag([0.6, 0.6, 3.6, 1])),
                 str(root / folder / "prostate_00.nii.gz"))
    report = prepare(root, tmp_path / "out", PrepareSettings(image_size=32, mask_labels=(1, 2)))
    assert report["patients"] == 1
    png = _read(tmp_path / "out/masks/prostate_00_002.png")
    assert png.max() == 255  # both zones count as gland
    with pytest.raises(DataError, match=r"unexpected mask labels \[2\]"):
        prepare(root, tmp_path / "out1", PrepareSettings(image_size=32, mask_labels=(1,)))


def test_pad_mode_keeps_aspect_ratio_and_round_trips(tmp_path):
    image, mask = _asymmetric_volume()
    _write_pair(tmp_path / "in", "case", image, mask, np.diag([0.5, 0.5, 3.0, 1.0]))
    prepare(tmp_path / "in", tmp_path / "out", PrepareSettings(image_size=60, fit="pad"))
    png = _read(tmp_path / "out/masks/case_002.png") > 127
    with np.load(tmp_path / "out/volumes/case.npz") as stored:
        original = stored["mask"][2].astype(bool)  # (rows=30, cols=20)
    back = unfit_slice(png.astype(np.float32), 30, 20, "pad") > 0.5
    assert png[:, :10].sum() == 0  # 20 columns padded to 30: 5 blank on each side, x2 scale
    assert np.array_equal(back, original)


def test_existing_output_is_refused_unless_overwrite(phantoms, tmp_path):
    out = tmp_path / "out"
    prepare(phantoms, out, PrepareSettings(image_size=16))
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="already exists"):
        prepare(phantoms, out, PrepareSettings(image_size=32))
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(DataError, match="keep.txt: not made by prepare"):
        prepare(phantoms, out, PrepareSettings(image_size=32), overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    prepare(phantoms, out, PrepareSettings(image_size=32), overwrite=True)
    assert (out / "manifest.csv").exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporary folders left behind


def _centroid(mask):
    return np.array(np.nonzero(mask)).mean(axis=1)


@pytest.mark.parametrize("fit, size", [("resize", 384), ("resize", 96), ("pad", 384),
                                       ("pad", 100)])
def test_prepared_masks_sit_on_their_images_and_map_back(tmp_path, fit, size):
    """A scan whose bright region is exactly its gland: after prepare, the bright region of
    the image PNG and the mask PNG agree (nearest-neighbour at pixel centres, not shifted by
    OpenCV's INTER_NEAREST), and the mask mapped back lands on the original grid."""
    x, y = np.mgrid[:130, :160]
    ellipse = ((y - 74.3) / 52) ** 2 + ((x - 60.6) / 43) ** 2 <= 1.0  # off-centre
    stored = np.repeat(ellipse[..., None], 3, axis=2)  # (x, y, z)
    image = np.where(stored, 1000.0, 100.0).astype(np.float32)
    _write_pair(tmp_path / "in", "case", image, stored.astype(np.uint8), np.eye(4))
    prepare(tmp_path / "in", tmp_path / "out", PrepareSettings(image_size=size, fit=fit))
    with np.load(tmp_path / "out/volumes/case.npz") as volume:
        gland = volume["mask"][1].astype(bool)  # display orientation, original size
    assert gland.shape == (160, 130)
    bright = _read(tmp_path / "out/images/case_001.png") > 127
    mask = _read(tmp_path / "out/masks/case_001.png") > 127
    dice = 2 * (bright & mask).sum() / (bright.sum() + mask.sum())
    assert dice >= 0.99
    assert np.abs(_centroid(bright) - _centroid(mask)).max() < 0.1
    back = unfit_slice(mask.astype(np.float32), 160, 130, fit) > 0.5
    dice_back = 2 * (back & gland).sum() / (back.sum() + gland.sum())
    assert dice_back >= 0.99
    # within 0.1 of a pixel of the coarser of the two grids (a downscale loses detail)
    coarse = np.maximum(1.0, np.array([160, 130] if fit == "resize" else [160, 160]) / size)
    assert (np.abs(_centroid(back) - _centroid(gland)) / coarse).max() < 0.1


def test_prepare_records_the_digest_of_every_file_it_wrote(prepared, tmp_path):
    """A run's identity takes the data by this digest; a dataset prepared before it was
    recorded gets the same one, computed from its files, and is never written to."""
    from prostate_seg.data.prepare import dataset_fingerprint

    settings = json.loads((prepared / "prepare.json").read_text())
    assert settings["content_digest"] == content_digest(prepared)
    older = tmp_path / "older"
    shutil.copytree(prepared, older)
    (older / "prepare.json").write_text(json.dumps(
        {k: v for k, v in settings.items() if k != "content_digest"}))
    before = (older / "prepare.json").read_bytes()
    assert dataset_fingerprint(older) == dataset_fingerprint(prepared)
    assert (older / "prepare.json").read_bytes() == before
    # one pixel of one slice, one renamed volume: other content
    for change in ("pixel", "rename"):
        copy = tmp_path / change
        shutil.copytree(older, copy)
        if change == "pixel":
            path = sorted((copy / "images").iterdir())[3]
            pixels = _read(path)
            pixels[0, 0] ^= 1
            cv2.imwrite(str(path), pixels)
        else:
            volume = sorted((copy / "volumes").iterdir())[0]
            volume.rename(volume.with_name("x" + volume.name))
        assert content_digest(copy) != settings["content_digest"], change
        assert dataset_fingerprint(copy) != dataset_fingerprint(older), change


def test_a_manifest_saved_with_a_byte_order_mark_is_the_same_dataset(prepared, tmp_path):
    """A spreadsheet's BOM hid the patient column from the fingerprint (read_manifest took it),
    so a run's identity stopped depending on which patients the data holds."""
    from prostate_seg.data.prepare import dataset_fingerprint

    saved = tmp_path / "saved"
    shutil.copytree(prepared, saved)
    manifest = saved / "manifest.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    assert dataset_fingerprint(saved) == dataset_fingerprint(prepared)
    renamed = manifest.read_text(encoding="utf-8-sig").replace("phantom000,", "phantom900,")
    manifest.write_text("\ufeff" + renamed, encoding="utf-8")
    assert dataset_fingerprint(saved) != dataset_fingerprint(prepared)
