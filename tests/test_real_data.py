"""A small subset of the real PROMISE12 scans through prepare, a 1-epoch fit, evaluate and
predict. Skipped when $PROSTATE_SEG_DATA (default ../shared/data/prostate_t2) is absent."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from helpers import REAL_DATA, TINY, compose_train

from prostate_seg.evaluate import evaluate_checkpoint
from prostate_seg.predict import predict_paths
from prostate_seg.prepare import PrepareSettings, prepare
from prostate_seg.training import train

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not (REAL_DATA / "images").is_dir(),
                       reason=f"real data not found at {REAL_DATA} (set PROSTATE_SEG_DATA)"),
]
CASES = ("Case13", "Case25", "Case35")  # three small volumes: 160x160x15, 128x128x18, 128x128x23


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


def test_one_epoch_fit_evaluate_and_predict_on_real_scans(real_prepared, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.dir={real_prepared}", "data.image_size=64",
                         "trainer.max_epochs=1"], run_dir)
    results = train(cfg)
    assert results["epochs_trained"] == 1 and 0.0 <= results["val/dice"] <= 1.0
    ckpt = results["best_checkpoint"]
    rows = evaluate_checkpoint(ckpt)
    split = json.loads((real_prepared / "split.json").read_text())
    assert [r["patient"] for r in rows] == split["val"] and "hd95_px" in rows[0]
    scan = REAL_DATA / "images" / f"{split['val'][0]}.nii.gz"
    out = predict_paths(ckpt, scan, tmp_path / "mask.nii.gz")[0]
    source, mask = nib.load(scan), nib.load(out)
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert mask.get_data_dtype() == np.uint8
