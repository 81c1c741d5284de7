"""predict: outputs checked before any inference; a folder run that skips bad scans and a rerun
that finishes the rest."""

import errno
import os
import tempfile

import nibabel as nib
import numpy as np
import pytest

import prostate_seg.inference.predict as predict
from prostate_seg.errors import ConfigError, DataError, UserError
from prostate_seg.inference.predict import predict_paths


@pytest.fixture
def ckpt(trained_run):
    return trained_run / "checkpoints" / "last.ckpt"


@pytest.fixture
def no_inference(monkeypatch):
    """The checks must come before the checkpoint is even loaded."""
    def load_checkpoint(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the outputs were checked")
    monkeypatch.setattr(predict, "load_checkpoint", load_checkpoint)


@pytest.fixture
def scans(phantoms, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("phantom000", "phantom001", "phantom002"):
        (folder / f"{name}.nii.gz").symlink_to(phantoms / "images" / f"{name}.nii.gz")
    return folder


@pytest.mark.parametrize("output, error, message", [
    ("mask.png", ConfigError, "a mask file name ends in .nii or .nii.gz"),
    ("scans/phantom000.nii.gz", ConfigError, "would replace the input scan"),
    ("link.nii.gz", ConfigError, "would replace the input scan"),  # a symlink to the scan
    ("existing.nii.gz", DataError, "already exists; pass overwrite=true"),
    ("a_file/mask.nii.gz", NotADirectoryError, "a_file"),
    ("m" * 300 + ".nii.gz", OSError, "File name too long"),
    ("masks", DataError, "is a folder; for one scan give the mask's file name"),
])
def test_single_scan_output_is_checked_first(output, error, message, scans, no_inference,
                                             tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.nii.gz").symlink_to(scans / "phantom000.nii.gz")
    (tmp_path / "existing.nii.gz").write_bytes(b"precious")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "masks").mkdir()
    overwrite = output != "existing.nii.gz"  # (overwrite does not allow replacing the input)
    with pytest.raises(error, match=message):
        predict_paths("any.ckpt", scans / "phantom000.nii.gz", output, overwrite=overwrite)
    assert (tmp_path / "existing.nii.gz").read_bytes() == b"precious"


@pytest.mark.parametrize("output, message", [
    ("scans", "output=scans is input=scans"),
    ("scans/masks", "output=scans/masks lies inside input=scans"),
    ("scans/../scans/", "is input="),
    ("a_file", "exists and is not a folder"),
])
def test_folder_output_is_checked_first(output, message, scans, no_inference, tmp_path,
                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises((ConfigError, DataError), match=message):
        predict_paths("any.ckpt", "scans", output, overwrite=True)


@pytest.mark.parametrize("output", ["data/masks/predicted", "data/volumes", "link/predicted",
                                    "data/images/p0.nii.gz", "data/volumes/run/p0.nii.gz"])
def test_output_into_a_prepared_datasets_own_folders_is_refused(output, scans, no_inference,
                                                                tmp_path, monkeypatch):
    """Masks among the slices would change the data runs are made of, and a later prepare
    overwrite=true deletes them: refused as evaluate refuses its table there."""
    monkeypatch.chdir(tmp_path)
    for folder in ("masks", "volumes", "images"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    (tmp_path / "data" / "prepare.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "data" / "masks")
    source = scans / "phantom000.nii.gz" if output.endswith(".gz") else scans
    with pytest.raises(ConfigError, match=rf"^output {output}.* would change the prepared "
                                          rf"dataset {tmp_path / 'data'}; choose an output"):
        predict_paths("any.ckpt", source, output, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == [
        "images", "masks", "prepare.json", "volumes"]


def test_another_nnunet_channel_is_not_segmented_as_a_scan(scans, no_inference, tmp_path):
    (scans / "phantom000.nii.gz").rename(scans / "phantom000_0000.nii.gz")
    (scans / "phantom001.nii.gz").rename(scans / "phantom000_0001.nii.gz")  # its ADC, say
    with pytest.raises(DataError, match=rf"^{scans}/phantom000_0001.nii.gz: channel 0001 of "
                                        r"nnU-Net case phantom000; this tool takes one channel"):
        predict_paths("any.ckpt", scans, tmp_path / "masks")


def test_a_patient_named_like_a_channel_is_a_patient(scans, no_inference, tmp_path):
    """subj_2019 beside subj is a scan of its own: a channel needs its case's _0000 file."""
    (scans / "phantom001.nii.gz").rename(scans / "phantom000_2019.nii.gz")
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("phantom000", "phantom000_2019", "phantom002"):
        (masks / f"{name}.nii.gz").write_bytes(b"")
    assert len(predict_paths("any.ckpt", scans, masks, skip_existing=True)) == 3


def test_on_error_skip_leaves_another_nnunet_channel_out_as_prepare_does(scans, no_inference,
                                                                         tmp_path, caplog):
    (scans / "phantom000.nii.gz").rename(scans / "phantom000_0000.nii.gz")
    (scans / "phantom001.nii.gz").rename(scans / "phantom000_0001.nii.gz")
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("phantom000_0000", "phantom002"):  # done already: nothing left to load a model
        (masks / f"{name}.nii.gz").write_bytes(b"")
    assert predict_paths("any.ckpt", scans, masks, on_error="skip", skip_existing=True) == [
        masks / "phantom000_0000.nii.gz", masks / "phantom002.nii.gz"]
    assert f"left out {scans}/phantom000_0001.nii.gz: channel 0001" in caplog.text


def test_a_datasets_root_given_as_input_points_to_its_scans_folder(scans, no_inference,
                                                                   tmp_path):
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "labelsTr").symlink_to(scans)
    (root / "imagesTr").symlink_to(scans)
    (root / "README.md").write_text("the dataset")
    with pytest.raises(DataError, match=rf"^input={root}: no .nii or .nii.gz files in this "
                                        rf"folder \(there are some in imagesTr/, labelsTr/: "
                                        rf"input={root}/imagesTr\?\)$"):
        predict_paths("any.ckpt", root, tmp_path / "masks")


def test_two_scans_with_one_output_name_are_refused(scans, no_inference, tmp_path):
    nib.save(nib.load(scans / "phantom001.nii.gz"), str(scans / "phantom001.nii"))
    with pytest.raises(DataError, match=r"phantom001.nii and .*phantom001.nii.gz would both be "
                                        r"written to .*masks/phantom001.nii.gz"):
        predict_paths("any.ckpt", scans, tmp_path / "masks")
    (scans / "phantom001.nii").rename(scans / "phantom000_prob.nii.gz")  # a's probabilities
    with pytest.raises(DataError, match="would both be written to .*phantom000_prob.nii.gz"):
        predict_paths("any.ckpt", scans, tmp_path / "masks", save_probabilities=True)


@pytest.mark.parametrize("exists", [True, False])
def test_read_only_output_folder_is_found_before_inference(exists, scans, no_inference, tmp_path,
                                                           monkeypatch):
    """Named where the write failed: the output folder, or the one it would be made in."""
    if exists:
        (tmp_path / "masks").mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "probe"))
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(OSError) as info:
        predict_paths("any.ckpt", scans, tmp_path / "masks" / "new")
    assert info.value.errno == errno.EROFS
    assert info.value.filename == str(tmp_path / "masks" if exists else tmp_path)
    assert not (tmp_path / "masks" / "new").exists()


def test_a_run_that_stops_after_its_checks_leaves_no_folder(scans, tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.ckpt"):
        predict_paths(tmp_path / "bad.ckpt", scans, tmp_path / "out" / "masks")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, why", [
    ("not_a_scan", "not a readable NIfTI"),
    ("nan_spacing", "header has NaN or infinite voxel spacing"),  # failed in saving the mask
])
def test_skip_bad_scans_list_them_and_rerun_finishes_the_rest(damage, why, ckpt, scans,
                                                              tmp_path, caplog):
    broken = scans / "phantom001.nii.gz"
    img = nib.load(broken)
    img = nib.Nifti1Image(np.asarray(img.dataobj), None, img.header)
    broken.unlink()
    if damage == "not_a_scan":
        broken.write_bytes(b"not a scan")
    else:
        img.header["pixdim"][1:4] = float("nan")
        img.header.set_qform(None, code=0)
        nib.save(img, str(broken))
    out = tmp_path / "masks"
    with pytest.raises(DataError, match=f"phantom001.nii.gz: {why}"):
        predict_paths(ckpt, scans, out)  # on_error=raise: stops at the bad scan, before any mask
    assert not out.exists()
    with pytest.raises(DataError, match=r"1 of 3 scans could not be segmented"):
        predict_paths(ckpt, scans, out, on_error="skip")
    assert sorted(p.name for p in out.iterdir()) == ["phantom000.nii.gz", "phantom002.nii.gz"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(DataError, match=r"1 of 3 scans could not be segmented"):
        predict_paths(ckpt, scans, out, on_error="skip", skip_existing=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing redone
    assert f"not segmented: {broken} ({broken}: {why}" in caplog.text


def test_rerun_with_skip_existing_predicts_only_the_missing_ones(ckpt, scans, phantoms, tmp_path,
                                                                 caplog, monkeypatch):
    out = tmp_path / "masks"
    first = predict_paths(ckpt, scans, out, save_probabilities=True)
    (out / "phantom001.nii.gz").unlink()  # as if killed before this one was written
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    calls = []
    real = predict.predict_scan
    monkeypatch.setattr(predict, "predict_scan",
                        lambda p, scan, *args: calls.append(scan.name) or real(p, scan, *args))
    again = predict_paths(ckpt, scans, out, save_probabilities=True, skip_existing=True)
    assert calls == ["phantom001.nii.gz"] and sorted(again) == sorted(first)
    for name, stamp in stamps.items():
        if not name.startswith("phantom001"):
            assert (out / name).stat().st_mtime_ns == stamp  # kept, not rewritten
    mask = np.asarray(nib.load(out / "phantom001.nii.gz").dataobj)
    assert mask.shape == nib.load(phantoms / "images" / "phantom001.nii.gz").shape
    with pytest.raises(ConfigError, match="choose one"):
        predict_paths(ckpt, scans, out, overwrite=True, skip_existing=True)


def test_a_scan_in_metres_gets_the_same_mask_in_its_own_header(ckpt, phantoms, tmp_path):
    """Spacing is read in mm whatever the header's unit, but the mask is written on the scan's
    own header and affine, in metres as the scan is."""
    scan = nib.load(phantoms / "images" / "phantom000.nii.gz")
    metres = nib.Nifti1Image(np.asarray(scan.dataobj), np.diag([1e-3] * 3 + [1.0]) @ scan.affine)
    metres.set_sform(metres.affine, code=1)
    metres.header.set_xyzt_units("meter")
    nib.save(metres, str(tmp_path / "metres.nii.gz"))
    in_mm, in_m = (nib.load(predict_paths(ckpt, path, tmp_path / f"{name}_mask.nii.gz")[0])
                   for name, path in [("mm", phantoms / "images" / "phantom000.nii.gz"),
                                      ("m", tmp_path / "metres.nii.gz")])
    assert np.array_equal(np.asarray(in_m.dataobj), np.asarray(in_mm.dataobj))
    assert np.array_equal(in_m.affine, nib.load(tmp_path / "metres.nii.gz").affine)
    assert in_m.header.get_xyzt_units()[0] == "meter"


def test_upper_case_nifti_names_are_segmented_and_other_files_named(ckpt, scans, tmp_path,
                                                                     caplog):
    """``B.NII.GZ`` is a NIfTI file like ``b.nii.gz``; a ``.mha`` is not segmented, and said so."""
    (scans / "phantom002.nii.gz").rename(scans / "PHANTOM002.NII.GZ")
    (scans / "other.mha").write_bytes(b"a scan in another format")
    out = predict_paths(ckpt, scans, tmp_path / "masks")
    assert [p.name for p in out] == ["PHANTOM002.nii.gz", "phantom000.nii.gz",
                                     "phantom001.nii.gz"]
    assert all(nib.load(p).shape == (64, 64, nib.load(p).shape[2]) for p in out)
    assert "ignored 1 entries that are not NIfTI (.nii, .nii.gz): other.mha" in caplog.text
    one = predict_paths(ckpt, scans / "PHANTOM002.NII.GZ", tmp_path / "ONE.NII.GZ")[0]
    assert nib.load(one).shape == nib.load(out[0]).shape  # written through a .nii.gz temporary


def test_a_checkpoint_recording_a_channel_of_3d_scans_still_predicts(ckpt, scans, tmp_path):
    """Prepared by a version that ignored image_channel on 3D scans (and recorded it): it was
    trained on the scans whole, and predict reads them so."""
    import torch

    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["hyper_parameters"]["cfg"]["preprocessing"]["image_channel"] = 3
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    scan = scans / "phantom000.nii.gz"
    assert predict_paths(older, scan, tmp_path / "mask.nii.gz") == [tmp_path / "mask.nii.gz"]
