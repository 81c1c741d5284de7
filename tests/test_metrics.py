"""Per-volume metrics and HD95 against hand computation and an independent implementation."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from prostate_seg.inference.metrics import VolumeConfusion, hd95, scores_from_counts, volume_scores


def test_per_volume_dice_is_averaged_over_patients_not_pixels():
    metric = VolumeConfusion(num_volumes=2)
    # volume 0: 4 gland pixels, 2 found, 2 false positives; volume 1: 1 gland pixel, found.
    truth0 = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0.0])
    pred0 = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0.0])
    truth1 = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0.0])
    pred1 = truth1.clone()
    logits = (torch.stack([pred0, pred1]) * 2 - 1).reshape(2, 1, 2, 4)  # >0 where predicted
    metric.update(logits[:1], truth0.reshape(1, 1, 2, 4), torch.tensor([0]))
    metric.update(logits[1:], truth1.reshape(1, 1, 2, 4), torch.tensor([1]))
    scores = metric.compute()
    dice0 = 2 * 2 / (2 * 2 + 2 + 2)  # 0.5
    assert scores["dice"].item() == pytest.approx((dice0 + 1.0) / 2)
    assert scores["dice_global"].item() == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))
    assert scores["precision"].item() == pytest.approx((2 / 4 + 1) / 2)
    assert scores["recall"].item() == pytest.approx((2 / 4 + 1) / 2)


def test_slices_of_one_volume_pool_across_batches():
    metric = VolumeConfusion(num_volumes=1)
    truth = torch.ones(1, 1, 2, 2)
    metric.update(torch.full((1, 1, 2, 2), 5.0), truth, torch.tensor([0]))  # all right
    metric.update(torch.full((1, 1, 2, 2), -5.0), truth, torch.tensor([0]))  # all missed
    assert metric.compute()["dice"].item() == pytest.approx(2 * 4 / (2 * 4 + 0 + 4))


@pytest.mark.parametrize("counts, dice, precision, recall", [
    ((0, 0, 0), 1.0, 1.0, 1.0),  # nothing there, nothing predicted
    ((0, 3, 0), 0.0, 0.0, 0.0),  # nothing there, something predicted
    ((0, 0, 3), 0.0, 0.0, 0.0),  # gland there, nothing predicted
    ((3, 1, 2), 6 / 9, 3 / 4, 3 / 5),
])
def test_empty_cases_follow_the_documented_conventions(counts, dice, precision, recall):
    scores = scores_from_counts(torch.tensor(counts))
    assert scores["dice"].item() == pytest.approx(dice)
    assert scores["precision"].item() == pytest.approx(precision)
    assert scores["recall"].item() == pytest.approx(recall)


def test_threshold_is_probability_one_half():
    metric = VolumeConfusion(1)
    logits = torch.tensor([0.01, -0.01, 0.0, 3.0]).reshape(1, 1, 2, 2)
    truth = torch.tensor([1.0, 1.0, 1.0, 1.0]).reshape(1, 1, 2, 2)
    metric.update(logits, truth, torch.tensor([0]))
    assert metric.counts.tolist() == [[2, 0, 2]]  # sigmoid(0) = 0.5 is not > 0.5


def test_hd95_hand_computed_with_anisotropic_spacing():
    pred = np.zeros((5, 5, 9), bool)
    truth = np.zeros((5, 5, 9), bool)
    pred[2, 2, 1] = True
    truth[2, 2, 7] = True
    assert hd95(pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(pred, truth, (3.0, 1.0, 0.5)) == pytest.approx(3.0)


def test_hd95_empty_cases():
    empty = np.zeros((4, 4, 4), bool)
    full = np.ones((4, 4, 4), bool)
    assert hd95(empty, empty, (1, 1, 1)) == 0.0
    assert hd95(full, empty, (1, 1, 1)) == float("inf")


def _surface_points(mask, spacing):
    from scipy import ndimage

    surface = mask & ~ndimage.binary_erosion(mask, border_value=0)
    return np.argwhere(surface) * np.asarray(spacing)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_agrees_with_brute_force_pairwise_distances(seed):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:10, :24, :24]
    def blob():
        c = rng.uniform([3, 8, 8], [7, 16, 16])
        r = rng.uniform([2, 4, 4], [4, 8, 8])
        return (((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2
                + ((xx - c[2]) / r[2]) ** 2) <= 1
    pred, truth = blob(), blob()
    spacing = (3.0, 0.6, 0.7)
    a, b = _surface_points(pred, spacing), _surface_points(truth, spacing)
    d = cdist(a, b)
    expected = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    assert hd95(pred, truth, spacing) == pytest.approx(expected, rel=1e-9)


def test_volume_dice_equals_pixel_f1_and_counts_voxels():
    rng = np.random.default_rng(3)
    pred, truth = rng.random((3, 8, 8)) > 0.5, rng.random((3, 8, 8)) > 0.5
    scores = volume_scores(pred, truth, (1, 1, 1))
    p, r = scores["precision"], scores["recall"]
    assert scores["dice"] == pytest.approx(2 * p * r / (p + r))
    assert (scores["voxels_pred"], scores["voxels_true"], scores["voxels_total"]) == (
        pred.sum(), truth.sum(), 192)
    assert scores["hd95_failed"] == 0 and np.isfinite(scores["hd95"])


@pytest.mark.parametrize("pred_empty", [True, False])
def test_undefined_hd95_is_the_worst_case_and_flagged(pred_empty):
    """An empty prediction (or a prediction where there is no gland) has no surface distance:
    it counts as the volume's diagonal, in mm, so a mean never drops it."""
    some = np.zeros((4, 10, 20), bool)
    some[1:3, 2:5, 3:9] = True
    empty = np.zeros_like(some)
    pred, truth = (empty, some) if pred_empty else (some, empty)
    scores = volume_scores(pred, truth, (3.0, 0.5, 0.25))
    assert scores["hd95_failed"] == 1
    assert scores["hd95"] == pytest.approx(np.sqrt(12.0**2 + 5.0**2 + 5.0**2))
    assert volume_scores(empty, empty, (1, 1, 1))["hd95"] == 0.0  # agreed: nothing there


def test_volumes_not_seen_in_a_pass_do_not_count():
    """Under limit_val_batches only some volumes are validated; the others must not count as
    Dice 1 (empty truth, empty prediction)."""
    metric = VolumeConfusion(num_volumes=3)
    truth = torch.tensor([1, 1, 0, 0.0]).reshape(1, 1, 2, 2)
    logits = torch.tensor([5, -5, 5, -5.0]).reshape(1, 1, 2, 2)  # 1 TP, 1 FN, 1 FP
    metric.update(logits, truth, torch.tensor([1]))
    scores = metric.compute()
    assert scores["dice"].item() == pytest.approx(0.5)
    assert scores["precision"].item() == pytest.approx(0.5)


def test_hd95_is_the_median_over_patients_in_results_and_in_the_eval_table():
    from prostate_seg.inference.evaluate import split_scores, summarize

    rows = [{"patient": p, "split": "val", "dice": d, "precision": 0.9, "recall": r, "hd95": h,
             "hd95_failed": f, "slices": 4}
            for p, d, r, h, f in (("a", 0.8, 0.7, 2.0, 0), ("b", 0.9, 0.8, 3.0, 0),
                                  ("c", 0.0, 0.0, 90.0, 1))]
    table = summarize(rows)
    assert (table["hd95"], table["hd95_failed"], table["slices"]) == (3.0, 1, 12)  # not 31.67
    assert table["dice"] == pytest.approx(1.7 / 3) and table["recall"] == pytest.approx(0.5)
    assert split_scores(rows, "val") == {
        "val/dice_original": table["dice"], "val/precision_original": table["precision"],
        "val/recall_original": table["recall"], "val/hd95_original": 3.0, "val/hd95_failed": 1,
        "val/patients": 3}
    assert split_scores(rows, "test") == {}


def test_the_eval_tables_hd95_column_says_its_unit():
    from prostate_seg.inference.evaluate import format_table

    rows = [{"patient": "a", "split": "val", "dice": 0.8, "hd95": 2.0, "hd95_unit": "px"}]
    assert format_table(rows).splitlines()[0].split()[5:7] == ["hd95", "(px)"]
    assert "(mm/px)" in format_table(rows + [{**rows[0], "hd95_unit": "mm"}])
