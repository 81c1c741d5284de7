"""A small subset of the real PROMISE12 scans through prepare, a 1-epoch fit, evaluate and
predict. Skipped when $PROSTATE_SEG_DATA (default ../shared/data/prostate_t2) is absent."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from helpers import REAL_DATA, TINY, compose_train

from prostate_seg.inference.evaluate import evaluate_checkpoint
from prostate_seg.inference.predict import predict_paths
from prostate_seg.data.prepare import PrepareSettings, prepare
from prostate_seg.training.fit import train

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not (REAL_DATA / "images").is_dir(),
                       reason=f"real data not found at {REAL_DATA} (set PROSTATE_SEG_DATA)"),
]
CASES = ("Case13", "Case14", "Case15", "Case16", "Case18", "Case25")  # the smallest volumes


@pytest.fixture(scope="module")
def real_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    for folder in ("images", "masks"):
        (root / "in" / folder).mkdir(parents=True)
        for case in CASES:
            (root / "in" / folder / f"{case}.nii.gz").symlink_to(REAL_DATA / folder / f"{case}.nii.gz")
    prepare(root / "in", root / "png", PrepareSettings(image_size=64))
    return root / "png"


def test_prepare_real_cases(real_prepared):
    with open(real_prepared / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cases = {r["case_id"]: r for r in csv.DictReader(open(REAL_DATA / "cases.csv"))}
    for case in CASES:
        mine = [r for r in rows if r["patient"] == case]
        assert len(mine) == int(cases[case]["nz"])
        assert (int(mine[0]["height"]), int(mine[0]["width"])) == (int(cases[case]["ny"]),
                                                                    int(cases[case]["nx"]))
        assert sum(int(r["gland_pixels"]) for r in mine) == int(cases[case]["gland_voxels"])
        assert sum(int(r["gland_pixels"]) > 0 for r in mine) == int(cases[case]["slices_with_gland"])
        assert mine[0]["spacing_known"] == "0"  # the headers hold no real spacing


def test_real_gland_lies_on_the_bright_gland_not_the_background(real_prepared):
    import cv2

    row = next(r for r in csv.DictReader(open(real_prepared / "manifest.csv"))
               if r["patient"] == "Case13" and int(r["gland_pixels"]) > 400)
    image = cv2.imread(str(real_prepared / row["image"]), 0).astype(float)
    mask = cv2.imread(str(real_prepared / row["mask"]), 0) > 0
    assert image[mask].mean() > image[~mask].mean()  # the gland is brighter than the average
    rows, cols = np.nonzero(mask)
    assert 16 < rows.mean() < 48 and 16 < cols.mean() < 48  # central, as a prostate is


def test_fit_scores_held_out_patients_at_original_size_as_predict_does(real_prepared, tmp_path):
    """Two epochs on fold 0 of 3; the run's per-patient rows are at the scans' original size
    (their gland voxel counts are the published ones) and agree with predict.py's mask of the
    same scan compared with the real mask file."""
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.dir={real_prepared}", "data.image_size=64",
                         "data.folds=3", "trainer.max_epochs=2"], run_dir)
    results = train(cfg)
    split = json.loads((real_prepared / "split.json").read_text())["splits"][0]
    with open(run_dir / "per_patient.csv", newline="") as f:
        rows = {r["patient"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(split["val"]) and len(rows) == 2
    cases = {r["case_id"]: r for r in csv.DictReader(open(REAL_DATA / "cases.csv"))}
    for patient, row in rows.items():
        case = cases[patient]
        assert int(row["voxels_true"]) == int(case["gland_voxels"])
        assert int(row["voxels_total"]) == int(case["nx"]) * int(case["ny"]) * int(case["nz"])
        assert row["hd95_unit"] == "px"  # the headers hold no real spacing
    assert results["val/patients"] == 2
    patient = sorted(rows)[0]
    scan = REAL_DATA / "images" / f"{patient}.nii.gz"
    out = predict_paths(results["best_checkpoint"], scan, tmp_path / "mask.nii.gz")[0]
    source, mask = nib.load(scan), nib.load(out)
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    predicted = np.asarray(mask.dataobj) > 0
    truth = np.asarray(nib.load(REAL_DATA / "masks" / f"{patient}.nii.gz").dataobj) > 0
    total = predicted.sum() + truth.sum()
    dice = 1.0 if total == 0 else 2 * (predicted & truth).sum() / total
    assert dice == pytest.approx(float(rows[patient]["dice"]), abs=1e-9)
    assert evaluate_checkpoint(results["best_checkpoint"])[0]["dice"] == pytest.approx(
        float(rows[sorted(rows)[0]]["dice"]), abs=1e-9)
