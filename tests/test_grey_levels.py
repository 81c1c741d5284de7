"""benchmarks/grey_levels.py on a hand-made prepared folder: the gland's grey levels per patient."""

import cv2
import numpy as np
import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def grey():
    return load_benchmark("grey_levels")


def write_prepared(root, slices):
    """slices: (patient, image, mask) arrays, masks 0/1; written as prepare does, with a manifest
    (slices numbered 0 ... n-1 per patient)."""
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rows, count = ["patient,slice,image,mask,height,width"], {}
    for patient, image, mask in slices:
        k = count[patient] = count.get(patient, -1) + 1
        name = f"{patient}_{k:03d}.png"
        cv2.imwrite(str(root / "images" / name), image.astype(np.uint8))
        cv2.imwrite(str(root / "masks" / name), 255 * mask.astype(np.uint8))
        rows.append(f"{patient},{k},images/{name},masks/{name},4,4")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")


def test_gland_levels_per_patient_by_hand(grey, tmp_path):
    """PatientA's gland: 10 pixels over two slices, 10, 20, ..., 100 (median 55, p10 19, p90
    91, numpy's linear percentiles), the rest 7; a slice without gland counts for nothing.
    PatientB's gland: 255 on 4 pixels and 100 on 4 (saturated 50 %), the rest 0 and 9."""
    a1, m1 = np.full((4, 4), 7), np.zeros((4, 4))
    a1.flat[:5], m1.flat[:5] = [10, 20, 30, 40, 50], 1
    a2, m2 = np.full((4, 4), 7), np.zeros((4, 4))
    a2.flat[:5], m2.flat[:5] = [60, 70, 80, 90, 100], 1
    b, mb = np.zeros((4, 4)), np.zeros((4, 4))
    b.flat[:8], mb.flat[:8] = [255] * 4 + [100] * 4, 1
    b.flat[8:11] = 9
    write_prepared(tmp_path, [("PatientA", a1, m1), ("PatientA", np.full((4, 4), 200),
                                                     np.zeros((4, 4))),
                              ("PatientA", a2, m2), ("PatientB", b, mb)])
    levels = grey.grey_levels(tmp_path)
    assert list(levels) == ["PatientA", "PatientB"]
    a = levels["PatientA"]
    assert (a["median"], a["p10"], a["p90"], a["saturated"], a["other"]) == (55, 19, 91, 0, 7)
    assert levels["PatientB"]["saturated"] == 0.5 and levels["PatientB"]["median"] == 177.5
    assert levels["PatientB"]["other"] == 0
    table = grey.markdown(levels)
    assert "| PatientA | 55 (19 - 91) | 0.0 % | 7 |" in table
    assert "| PatientB | 178 (100 - 255) | 50.0 % | 0 |" in table


def test_outliers_are_outside_tukeys_fences(grey):
    """21 patients at 60..80, one at 96 and one at 97: quartiles 65.5 and 76.5 (numpy's linear
    percentiles of 23 values), fences 49 and 93; only 96 and 97 lie outside. The extremes of a
    tight spread are not flagged."""
    levels = {f"Case{k:02d}": {"median": 60 + k} for k in range(21)}
    levels |= {"Case96": {"median": 96}, "Case97": {"median": 97}}
    assert grey.outliers(levels) == ["Case96", "Case97"]
    del levels["Case96"], levels["Case97"]
    assert grey.outliers(levels) == []


def test_scores_add_dice_and_its_rank_correlation(grey, tmp_path):
    """Gland medians 10 < 20 < 30 against Dice 0.9 > 0.8 > 0.7: Spearman -1; a patient without
    a score shows a dash and is left out of the correlation; a patient in two files is refused."""
    levels = {p: {"median": m, "p10": 0, "p90": 0, "saturated": 0.0, "other": 0.0}
              for p, m in (("A", 10), ("B", 20), ("C", 30), ("D", 40))}
    fold0, fold1 = tmp_path / "fold0.csv", tmp_path / "fold1.csv"
    fold0.write_text("patient,split,dice\nA,val,0.9\nB,val,0.8\n")
    fold1.write_text("patient,split,dice\nC,val,0.7\n")
    table = grey.markdown(levels, grey.scores([fold0, fold1]))
    assert "| A | 10 (0 - 0) | 0.0 % | 0 | 0.9000 |" in table
    assert "| D | 40 (0 - 0) | 0.0 % | 0 | - |" in table
    assert "with Dice over 3 patients: -1.00" in table
    with pytest.raises(SystemExit, match="fold0.csv line 2: A is scored in an earlier file"):
        grey.scores([fold0, fold0])


@pytest.mark.parametrize("damage, named", [
    ("no manifest", "manifest.csv: manifest not found"),
    ("missing png", "PatientA_000.png: file not found"),
    ("no mask column", "manifest.csv: missing columns ['mask']"),
    ("short row", "manifest.csv: line 3: malformed row"),
    ("no gland", "no mask of the dataset holds a gland pixel"),
    ("16-bit image", "PatientA_000.png: 16 bits per sample"),
    ("mask of another size", "PatientA_000.png: mask is 2x2 but its image is 4x4"),
])
def test_bad_prepared_folders_get_one_line(grey, tmp_path, damage, named):
    """The slices are read and checked as training reads them, so the same one-line errors."""
    image, mask = np.full((4, 4), 50), np.ones((4, 4))
    write_prepared(tmp_path, [("PatientA", image, mask if damage != "no gland" else 0 * mask)])
    manifest = tmp_path / "manifest.csv"
    if damage == "no manifest":
        manifest.unlink()
    elif damage == "missing png":
        (tmp_path / "images" / "PatientA_000.png").unlink()
    elif damage == "no mask column":
        manifest.write_text(manifest.read_text().replace(",mask,", ",label,"))
    elif damage == "short row":
        manifest.write_text(manifest.read_text() + "PatientA,1,images/PatientA_001.png\n")
    elif damage == "16-bit image":
        cv2.imwrite(str(tmp_path / "images" / "PatientA_000.png"), np.full((4, 4), 50, np.uint16))
    elif damage == "mask of another size":
        cv2.imwrite(str(tmp_path / "masks" / "PatientA_000.png"), np.full((2, 2), 255, np.uint8))
    with pytest.raises(SystemExit) as exc:
        grey.grey_levels(tmp_path)
    assert named in str(exc.value) and "\n" not in str(exc.value)
