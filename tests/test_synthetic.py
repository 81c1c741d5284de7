"""Synthetic phantoms: deterministic, MRI-like, with gland-free slices at both ends."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from prostate_seg.data.prepare import PrepareSettings
from prostate_seg.data.synthetic import generate, make_phantom
from prostate_seg.errors import ConfigError, DataError


def test_same_seed_same_phantom_other_seed_other_phantom():
    a, b, c = make_phantom(7, 3, 64), make_phantom(7, 3, 64), make_phantom(8, 3, 64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


def test_phantoms_have_gland_free_slices_above_and_below():
    for index in range(6):
        phantom = make_phantom(0, index, 64)
        per_slice = phantom.mask.reshape(len(phantom.mask), -1).any(1)
        assert 15 <= len(per_slice) <= 25
        assert not per_slice[0] and not per_slice[-1] and per_slice.sum() >= 5
        on = np.flatnonzero(per_slice)
        assert np.all(np.diff(on) == 1)  # one contiguous gland
        assert 0.005 < phantom.mask[on].mean() < 0.15  # a gland, not the whole slice


def test_gland_contrast_is_low_but_present():
    phantom = make_phantom(0, 0, 96)
    gland = phantom.mask.astype(bool)
    z = int(np.flatnonzero(gland.any((1, 2))).mean())
    inside = phantom.image[z][gland[z]]
    ring = np.zeros_like(gland[z])
    ys, xs = np.nonzero(gland[z])
    ring[max(ys.min() - 4, 0): ys.max() + 5, max(xs.min() - 4, 0): xs.max() + 5] = True
    around = phantom.image[z][ring & ~gland[z]]
    contrast = abs(inside.mean() - around.mean()) / around.std()
    assert 0.1 < contrast < 3.0  # visible, but not a trivial threshold


def test_generate_writes_nifti_pairs_with_spacing(tmp_path):
    patients = generate(tmp_path, num_patients=2, seed=1, size=48)
    for patient in patients:
        image = nib.load(tmp_path / "images" / f"{patient}.nii.gz")
        mask = nib.load(tmp_path / "masks" / f"{patient}.nii.gz")
        assert image.shape == mask.shape and image.shape[:2] == (48, 48)
        assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        zooms = image.header.get_zooms()
        assert 0.5 < zooms[0] < 2.0 and 3.0 <= zooms[2] <= 3.6
        assert int(image.header["sform_code"]) == 1
        assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1}


def test_phantoms_already_there_are_replaced_only_when_asked(tmp_path):
    generate(tmp_path, num_patients=2, seed=1, size=48)
    before = (tmp_path / "images" / "phantom001.nii.gz").read_bytes()
    with pytest.raises(DataError, match=r"phantom000.nii.gz already exists; pass overwrite=true"):
        generate(tmp_path, num_patients=3, seed=2, size=48)
    assert (tmp_path / "images" / "phantom001.nii.gz").read_bytes() == before
    assert not (tmp_path / "images" / "phantom002.nii.gz").exists()
    generate(tmp_path, num_patients=1, seed=2, size=48, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["phantom000.nii.gz"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "masks").write_text("a file where a folder goes")
    with pytest.raises(NotADirectoryError):
        generate(tmp_path / "other", num_patients=1, size=48)
    assert not (tmp_path / "other" / "images").exists()  # nothing written before the refusal


@pytest.mark.parametrize("call, message", [
    (lambda out: generate(out, 1, size=5000), "size=5000: must be an integer in 32..4096"),
    (lambda out: generate(out, 0), "num_patients=0: must be an integer >= 1"),
    (lambda out: generate(out, 2, seed=-1), "seed=-1: must be an integer in 0..4294967295"),
    (lambda out: generate(out, 2, overwrite="no"), "overwrite=no: must be true or false"),
    (lambda out: PrepareSettings(image_size=4), "image_size=4: must be an integer in 8..4096"),
    (lambda out: PrepareSettings(image_size=100000),
     "image_size=100000: must be an integer in 8..4096"),
    (lambda out: PrepareSettings(window=(1, 200)), "window=[1, 200]: must be a list of 2"),
])
def test_the_python_functions_keep_the_command_lines_rules(call, message, tmp_path):
    """generate() and prepare's settings refuse what their command line refuses, in its words,
    before anything is written."""
    with pytest.raises(ConfigError) as refused:
        call(tmp_path / "out")
    assert str(refused.value).startswith(message) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("failing_save", [1, 2, 3, 4])
def test_a_stopped_run_leaves_only_whole_pairs(failing_save, tmp_path, monkeypatch):
    """Stopped in any write (Ctrl-C mid-file), the phantoms written before stay as whole
    pairs, and the one being written leaves no half file, no image without mask, no
    temporary."""
    real_save, calls = nib.save, []

    def save(img, filename):
        calls.append(filename)
        if len(calls) == failing_save:
            Path(filename).write_bytes(b"half a file")
            raise KeyboardInterrupt
        real_save(img, filename)
    monkeypatch.setattr(nib, "save", save)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, num_patients=2, size=48)
    whole = ["phantom000.nii.gz"] if failing_save > 2 else []
    for folder in ("images", "masks"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == whole
    for path in tmp_path.rglob("*.nii.gz"):
        assert nib.load(path).get_fdata().size  # readable, whole


@pytest.mark.parametrize("name", ["case01.nii.gz", "phantom_x.nii.gz", "Case07"])
@pytest.mark.parametrize("folder", ["images", "masks", "imagesTr"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_phantoms_are_not_written_among_other_scans(name, folder, overwrite, tmp_path):
    """A folder of real scans gains no phantom patients, and overwrite removes none of it."""
    generate(tmp_path, num_patients=1, size=48)
    (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / folder / name).write_bytes(b"a real scan")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match=rf"^{tmp_path / folder / name}: output_dir=.* holds "
                                        "files that are not this command's phantoms"):
        generate(tmp_path, num_patients=2, size=48, overwrite=overwrite)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
