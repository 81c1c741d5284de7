"""prepare never touches its source data, and never turns a wrong input into a quiet result."""

import gzip
import hashlib
import os
import shutil
import subprocess
import struct
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from prostate_seg.errors import ConfigError, DataError
from prostate_seg.data.prepare import PrepareSettings, prepare

SETTINGS = PrepareSettings(image_size=16)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nii = nib.Nifti1Image(array, np.eye(4))
    nii.set_sform(np.eye(4), code=1)
    nib.save(nii, str(path))


def _scan(root: Path, name: str, mask: np.ndarray | None = None, suffix: str = ".nii.gz") -> None:
    rng = np.random.default_rng(len(name))
    _write(root / "images" / f"{name}{suffix}", rng.random((16, 16, 4)).astype(np.float32) * 100)
    if mask is None:
        mask = np.zeros((16, 16, 4), np.uint8)
        mask[4:10, 5:11, 1:3] = 1
    _write(root / "masks" / f"{name.removesuffix('_0000')}.nii.gz", mask)


def _fingerprint(root: Path) -> dict[str, str]:
    """Every file under root (through symlinks) with a hash of its content."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path) -> Path:
    root = tmp_path / "data" / "raw"
    for name in ("p0", "p1"):
        _scan(root, name)
    return root


# --- the output folder and the source data ---------------------------------------------------
@pytest.mark.parametrize("output", [
    "{in}", "{in}/", "{in}/images/..", "{in}/prepared", "{in}/images/out", "{in}/../raw/x",
    "{rel_in}", "{rel_in}/out", "{up}", "{up}/", "{rel_up}", "{link_in}", "{link_in}/out",
    "{link_up}",
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_inside_or_around_the_input_is_refused(output, overwrite, source, tmp_path,
                                                               monkeypatch):
    (tmp_path / "link_in").symlink_to(source)
    (tmp_path / "link_up").symlink_to(source.parent)
    monkeypatch.chdir(tmp_path)
    names = {"in": source, "rel_in": "data/raw", "up": source.parent, "rel_up": "data",
             "link_in": tmp_path / "link_in", "link_up": tmp_path / "link_up"}
    output_dir = output.format(**names)
    before = _fingerprint(source)
    with pytest.raises(ConfigError, match=r"output_dir=.*input_dir=|holds the input scan"):
        prepare(source, output_dir, SETTINGS, overwrite=overwrite)
    assert _fingerprint(source) == before


@pytest.mark.parametrize("input_form", ["symlink", "relative", "dotdot", "trailing"])
def test_output_containing_the_input_is_refused_however_the_input_is_named(input_form, source,
                                                                           tmp_path, monkeypatch):
    (tmp_path / "alias").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    input_dir = {"symlink": "alias", "relative": "data/raw", "dotdot": "data/raw/images/..",
                 "trailing": f"{source}/"}[input_form]
    before = _fingerprint(source)
    with pytest.raises(ConfigError, match="contains input_dir"):
        prepare(input_dir, tmp_path / "data", SETTINGS, overwrite=True)
    assert _fingerprint(source) == before


@pytest.mark.parametrize("link", ["images_folder", "one_scan", "one_mask"])
def test_output_holding_the_scans_real_location_through_symlinks_is_refused(link, tmp_path):
    """The input folder is elsewhere, but its scans (or its images/ folder) are symlinks into
    the prepared dataset that overwrite=true would replace."""
    out = tmp_path / "out"
    _scan(tmp_path / "first", "p0")
    prepare(tmp_path / "first", out, SETTINGS)
    stash = out / "stash"
    _scan(stash, "p1")
    _scan(stash, "p2")
    source = tmp_path / "in"
    if link == "images_folder":
        (source / "masks").mkdir(parents=True)
        (source / "images").symlink_to(stash / "images")
        for mask in (stash / "masks").iterdir():
            shutil.copy(mask, source / "masks")
    else:
        shutil.copytree(stash, source)
        folder, name = ("images", "p1.nii.gz") if link == "one_scan" else ("masks", "p2.nii.gz")
        (source / folder / name).unlink()
        (source / folder / name).symlink_to(stash / folder / name)
    before = _fingerprint(stash)
    with pytest.raises(ConfigError, match="holds the input scan"):
        prepare(source, out, SETTINGS, overwrite=True)
    assert _fingerprint(stash) == before


def test_overwrite_replaces_only_a_prepared_dataset(source, tmp_path):
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="not a dataset made by prepare"):
        prepare(source, precious, SETTINGS, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(DataError, match="exists and is not a folder"):
        prepare(source, a_file, SETTINGS, overwrite=True)
    assert a_file.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare(source, empty, SETTINGS, overwrite=True)["patients"] == 2
    (empty / "split.json").write_text("{}")  # training's, tied to the old data
    assert prepare(source, empty, SETTINGS, overwrite=True)["patients"] == 2
    assert not (empty / "split.json").exists()


@pytest.mark.parametrize("entry, named", [
    ("scores.csv", "scores.csv"), ("runs/fold0/last.ckpt", "runs"), (".notes", ".notes"),
    ("images2/a", "images2"),
    # inside the folders prepare makes: a run folder, predicted masks, a mask of another kind
    ("volumes/myrun/checkpoints/last.ckpt", "volumes/myrun"),
    ("masks/predicted/p0.nii.gz", "masks/predicted"), ("masks/p0.nii.gz", "masks/p0.nii.gz"),
    ("images/notes.txt", "images/notes.txt"),
    # of prepare's kind and naming, but listed by no manifest row: the user's
    ("masks/p0_999.png", "masks/p0_999.png"), ("volumes/atlas.npz", "volumes/atlas.npz"),
])
def test_overwrite_keeps_what_the_user_put_in_a_prepared_dataset(entry, named, source, tmp_path):
    """Replacing deletes the old dataset whole: an evaluate output or a run folder in it (not
    prepare's), at its top or in its slices' folders, stops the overwrite, named, and nothing is
    deleted."""
    out = tmp_path / "out"
    prepare(source, out, SETTINGS)
    (out / entry).parent.mkdir(parents=True, exist_ok=True)
    (out / entry).write_text("the user's")
    before = _fingerprint(out)
    with pytest.raises(DataError, match=rf"^{out / named}: not made by prepare; "
                                        "overwrite=true would delete it"):
        prepare(source, out, SETTINGS, overwrite=True)
    assert _fingerprint(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]  # no staging left


@pytest.mark.parametrize("damage", ["delete", "binary"])
def test_a_dataset_whose_manifest_cannot_be_read_is_not_replaced(damage, source, tmp_path):
    """Without its manifest prepare cannot tell its slices from the user's files: it deletes
    nothing and says so."""
    out = tmp_path / "out"
    prepare(source, out, SETTINGS)
    manifest = out / "manifest.csv"
    if damage == "delete":
        manifest.unlink()
    else:
        manifest.write_bytes(b"\xff\xfe\x00bad")
    before = _fingerprint(out)
    with pytest.raises(DataError, match=rf"^{manifest}: (not found|unreadable .*); without it "
                                        "prepare cannot tell its slices"):
        prepare(source, out, SETTINGS, overwrite=True)
    assert _fingerprint(out) == before


def test_a_file_browsers_litter_does_not_stop_the_overwrite(source, tmp_path):
    out = tmp_path / "out"
    prepare(source, out, SETTINGS)
    for litter in (".DS_Store", "masks/Thumbs.db", "images/._p0_000.png"):
        (out / litter).write_bytes(b"")
    assert prepare(source, out, SETTINGS, overwrite=True)["patients"] == 2


def test_an_output_name_at_the_file_systems_limit_is_prepared_and_replaced(source, tmp_path):
    """The dataset is built in a temporary folder beside the output and the old one is moved
    aside: their names must fit wherever the output's name fits."""
    out = tmp_path / ("d" * os.pathconf(tmp_path, "PC_NAME_MAX"))
    assert prepare(source, out, SETTINGS)["patients"] == 2
    assert prepare(source, out, SETTINGS, overwrite=True)["patients"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "data") == [out.name]


def test_symlinked_output_folder_is_written_at_its_target(source, tmp_path):
    target = tmp_path / "disk" / "prepared"
    target.parent.mkdir()
    prepare(source, target, SETTINGS)
    link = tmp_path / "prepared"
    link.symlink_to(target)
    prepare(source, link, SETTINGS, overwrite=True)
    assert link.is_symlink() and (target / "manifest.csv").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["prepared"]  # no leftovers


# --- wrong inputs that used to give a quiet result -------------------------------------------
def test_mask_with_several_volumes_along_a_fourth_axis_is_refused(tmp_path):
    _scan(tmp_path / "in", "p0")
    single = np.zeros((16, 16, 4, 1), np.uint8)
    single[4:10, 5:11, 1:3, 0] = 1
    _write(tmp_path / "in" / "masks" / "p0.nii.gz", single)
    assert prepare(tmp_path / "in", tmp_path / "one", SETTINGS)["patients"] == 1  # (x,y,z,1) is 3D
    _write(tmp_path / "in" / "masks" / "p0.nii.gz", np.concatenate([single, 1 - single], axis=3))
    with pytest.raises(DataError, match=r"p0.nii.gz: 4D volume of shape \(16, 16, 4, 2\) has 2 "
                                        r"volumes along its 4th axis"):
        prepare(tmp_path / "in", tmp_path / "two", SETTINGS)


@pytest.mark.parametrize("mask, labels, why", [
    ("scan", None, "mask has 633 distinct values; it looks like a scan, not a label map"),
    ("full", None, "the gland covers 94% of the volume; it looks like a scan, not a label map"),
    ("full", (1,), "the gland covers 94% of the volume"),
])
def test_a_scan_in_the_mask_folder_is_refused(mask, labels, why, tmp_path):
    """An integer scan copied as its mask (imagesTr as labelsTr) passed as non-negative integers,
    and every voxel above 0 became gland."""
    rng = np.random.default_rng(0)
    if mask == "scan":
        array = rng.integers(0, 1000, (16, 16, 4)).astype(np.int16)
    else:
        array = np.ones((16, 16, 4), np.uint8)
        array[0] = 0
    _scan(tmp_path / "in", "p0")
    _scan(tmp_path / "in", "p1", mask=array)
    settings = PrepareSettings(image_size=16, mask_labels=labels)
    with pytest.raises(DataError, match=rf"^{tmp_path}/in/masks/p1.nii.gz: {why}"):
        prepare(tmp_path / "in", tmp_path / "out", settings)
    assert prepare(tmp_path / "in", tmp_path / "out", settings, on_error="skip")["patients"] == 1


def test_an_image_channel_of_a_3d_scan_is_refused(source, tmp_path):
    """It used to be ignored (channel 0 prepared) and recorded in prepare.json as used."""
    with pytest.raises(DataError, match=rf"^{source}/images/p0.nii.gz: image_channel=3, but "
                                        r"this scan is 3D"):
        prepare(source, tmp_path / "out", PrepareSettings(image_size=16, image_channel=3))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("folder, first, second", [
    ("images", "x.nii", "x.nii.gz"),
    ("images", "x.nii.gz", "x_0000.nii.gz"),
    ("images", "x", "x.nii.gz"),  # a DICOM folder next to a NIfTI file
    ("masks", "x.nii", "x.nii.gz"),
    ("masks", "x.nii.gz", "x_0000.nii.gz"),
])
def test_two_files_of_one_patient_are_refused_not_one_picked(folder, first, second, tmp_path):
    root = tmp_path / "in"
    _scan(root, "a")
    _scan(root, "x")
    (root / folder / "x.nii.gz").unlink()
    for name in (first, second):
        if "." in name:
            other = np.zeros((16, 16, 4), np.float32 if folder == "images" else np.uint8)
            _write(root / folder / name, other)
        else:
            (root / folder / name).mkdir()
    with pytest.raises(DataError) as info:
        prepare(root, tmp_path / "out", SETTINGS)
    message = str(info.value)
    assert f"{first} and {second}" in message and "both patient 'x'" in message
    report = prepare(root, tmp_path / "out", SETTINGS, on_error="skip")
    assert report["patients"] == 1 and len(report["skipped"]) == 1  # x skipped, a prepared
    assert "both patient 'x'" in report["skipped"][0]["reason"]


def test_another_nnunet_channel_is_named_as_one_not_as_an_image_without_mask(tmp_path):
    """imagesTr/case_0001 is case's second channel (ADC), not a patient whose mask is missing;
    a patient whose own name ends in four digits (it has a mask) is one."""
    root = tmp_path / "in"
    _scan(root, "case_0000")
    _scan(root, "other_0001")
    _write(root / "images" / "case_0001.nii.gz", np.ones((16, 16, 4), np.float32))
    with pytest.raises(DataError, match=rf"^{root}/images/case_0001.nii.gz: channel 0001 of "
                                        r"nnU-Net case case; this tool takes one channel per "
                                        r"scan, the _0000 file: keep only those"):
        prepare(root, tmp_path / "out", SETTINGS)
    report = prepare(root, tmp_path / "out", SETTINGS, on_error="skip")
    assert report["patients"] == 2 and [s["case"] for s in report["skipped"]] == [
        f"{root}/images/case_0001.nii.gz"]


def test_png_that_cannot_be_written_stops_prepare_naming_it(tmp_path):
    """cv2.imwrite returns False for a name the file system refuses; prepare used to go on and
    list PNGs that do not exist."""
    patient = "p" * 248  # p...p.nii.gz is 255 bytes, p...p_000.png one too many
    _scan(tmp_path / "in", patient)
    _scan(tmp_path / "in", "short")
    with pytest.raises(OSError) as info:
        prepare(tmp_path / "in", tmp_path / "out", SETTINGS)
    assert info.value.filename.endswith(f"{patient}_000.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no partial folder


def test_masks_without_any_gland_are_an_error_and_single_empty_ones_a_warning(tmp_path, caplog):
    empty = np.zeros((16, 16, 4), np.uint8)
    _scan(tmp_path / "in", "p0", mask=empty)
    _scan(tmp_path / "in", "p1", mask=empty)
    with pytest.raises(DataError, match="no mask holds a single gland voxel"):
        prepare(tmp_path / "in", tmp_path / "out", SETTINGS)
    assert not (tmp_path / "out").exists()
    _scan(tmp_path / "in", "p2")
    report = prepare(tmp_path / "in", tmp_path / "out", SETTINGS)
    assert report["empty_masks"] == ["p0", "p1"]
    assert "2 of 3 patients have an empty mask (no gland voxel): p0, p1" in caplog.text


def test_files_that_are_neither_nifti_nor_dicom_folders_are_named_in_a_warning(tmp_path, caplog):
    _scan(tmp_path / "in", "p0")
    (tmp_path / "in" / "images" / "p1.mha").write_bytes(b"a scan in another format")
    (tmp_path / "in" / "images" / "._p0.nii.gz").write_bytes(b"macOS resource fork")
    (tmp_path / "in" / "masks" / "._p0.nii.gz").write_bytes(b"macOS resource fork")
    assert prepare(tmp_path / "in", tmp_path / "out", SETTINGS)["patients"] == 1
    assert "ignored 1 entries that are neither NIfTI nor a DICOM folder: p1.mha" in caplog.text


def test_nifti_names_in_upper_case_are_scans(tmp_path, caplog):
    """Some exporters write ``P0.NII.GZ``: a patient, not a file to ignore."""
    _scan(tmp_path / "in", "p0", suffix=".NII.GZ")
    _scan(tmp_path / "in", "p1_0000", suffix=".Nii")
    (tmp_path / "in" / "masks" / "p1.nii.gz").rename(tmp_path / "in" / "masks" / "p1.NII.GZ")
    report = prepare(tmp_path / "in", tmp_path / "out", SETTINGS)
    assert report["patients"] == 2 and "ignored" not in caplog.text
    assert (tmp_path / "out" / "volumes" / "p1.npz").is_file()


def test_a_case_that_fails_while_building_leaves_no_folder(tmp_path):
    """The output's missing parents are made for the build and removed with it when a case
    fails mid-way (here a mask on another grid), as are the partial dataset's files."""
    source = tmp_path / "source"
    _scan(source, "good")
    _scan(source, "shifted", mask=np.zeros((16, 14, 4), np.uint8))
    before = _fingerprint(source)
    with pytest.raises(DataError, match="does not match image grid"):
        prepare(source, tmp_path / "new" / "deeper" / "prepared", SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
    assert _fingerprint(source) == before


def test_sigterm_while_preparing_leaves_no_staging_folder(source, tmp_path):
    """timeout, scancel and kill send SIGTERM: handled as Ctrl-C, the half-built dataset beside
    the output is removed (its name holds the PID, so no later run would)."""
    script = (
        "import os, signal, sys\n"
        "from prostate_seg.data import prepare as p\n"
        "build = p._prepare_case\n"
        "def killed(*args):\n"
        "    rows = build(*args)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return rows\n"
        "p._prepare_case = killed\n"
        "p.prepare(sys.argv[1], sys.argv[2], p.PrepareSettings(image_size=16))\n")
    done = subprocess.run([sys.executable, "-c", script, str(source), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "KeyboardInterrupt: SIGTERM" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_stopped_while_deleting_the_old_dataset_leaves_no_old_folder(source, tmp_path,
                                                                      monkeypatch):
    """Stopped while the replaced dataset is deleted: the new one is in place and the old one
    deleted all the same, not left hidden beside it."""
    out = tmp_path / "out"
    prepare(source, out, SETTINGS)
    (out / "prepare_report.json").write_text("the old dataset")
    real_rmtree = shutil.rmtree

    def stopped(path, *args, **kwargs):
        if Path(path).name.startswith(".old-") and Path(path).exists():
            shutil.rmtree = real_rmtree  # stopped once, as by one SIGTERM
            (Path(path) / "prepare.json").unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", stopped)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, out, SETTINGS, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]
    assert (out / "prepare_report.json").read_text() != "the old dataset"


NON_FINITE = "header has NaN or infinite voxel spacing"


@pytest.mark.parametrize("damage, why", [
    ("nan_pixdim", NON_FINITE), ("inf_pixdim", NON_FINITE), ("nan_sform", NON_FINITE),
    # nibabel reads a 0 as 1 mm and builds the qform's affine from it
    ("zero_pixdim", "header has a voxel spacing of 0"),
    ("singular_sform", "affine gives voxel axes of"),
])
@pytest.mark.parametrize("folder", ["images", "masks"])
def test_scan_with_impossible_spacing_or_affine_is_refused_or_skipped(damage, why, folder,
                                                                      source, tmp_path):
    """NaN spacing used to be prepared silently (nan in the manifest, hd95 nan mm later), a 0
    as 1 mm, a singular affine failed in nibabel's orientation code."""
    path = source / folder / "p1.nii.gz"
    img = nib.load(path)
    img = nib.Nifti1Image(np.asarray(img.dataobj), None, img.header)  # read before rewritten
    if damage == "nan_sform":
        img.header.set_sform(np.diag([1.0, np.nan, 1.0, 1.0]), code=1)
    elif damage == "singular_sform":
        img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    elif damage == "zero_pixdim":
        img.header.set_qform(np.eye(4), code=1)
        img.header.set_sform(None, code=0)
    else:
        img.header["pixdim"][1:4] = float("nan" if damage == "nan_pixdim" else "inf")
        img.header.set_qform(None, code=0)
        img.header.set_sform(None, code=0)
    nib.save(img, str(path))
    if damage == "zero_pixdim":  # as written by a broken exporter: nibabel's save mends it
        stored = bytearray(gzip.decompress(path.read_bytes()))
        stored[80:84] = struct.pack("<f", 0.0)  # pixdim[1], after dim and the intents
        path.write_bytes(gzip.compress(bytes(stored)))
    message = rf"^{path}: {why}"
    with pytest.raises(DataError, match=message):
        prepare(source, tmp_path / "out", SETTINGS)
    report = prepare(source, tmp_path / "out", SETTINGS, on_error="skip")
    assert report["patients"] == 1 and report["skipped"][0]["case"] == "p1"


def test_a_zero_pixdim_beside_an_sform_is_read_by_the_sform(source, tmp_path):
    """The sform gives the geometry whole; pixdim's 0 builds nothing there."""
    path = source / "images" / "p1.nii.gz"
    img = nib.load(path)
    img = nib.Nifti1Image(np.asarray(img.dataobj), None, img.header)
    img.header.set_sform(np.diag([0.5, 0.6, 3.0, 1.0]), code=1)
    nib.save(img, str(path))
    stored = bytearray(gzip.decompress(path.read_bytes()))
    stored[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    path.write_bytes(gzip.compress(bytes(stored)))
    from prostate_seg.data.volume import geometry_of, load_nifti

    loaded = load_nifti(path)
    assert geometry_of(loaded, loaded.shape, path).spacing == pytest.approx((3.0, 0.6, 0.5))
