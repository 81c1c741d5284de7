"""The report's statistics: hand-computed values, statsmodels' mixed model as an oracle, and
simulated studies with the study's structure (5 folds of unequal size, seeds, run shifts)
that measure how often the verdict claims a difference that is not there and how often it
finds one that is. The simulation is benchmarks/calibration.py's, decided by the report's own
vectorised code; the full table is in docs/METHOD.md."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from prostate_seg.runs import late_gain
from prostate_seg.study.statistics import (
    LATE_GAIN,
    SIGNIFICANCE,
    Components,
    analyse,
    cells,
    comparison_pairs,
    design_power,
    grid,
    holm,
    loss_flags,
    nested_mean,
    seeds_needed,
    summarize,
    tie_flags,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from calibration import claims, fold_sizes, simulate, upper_bound  # noqa: E402

LOSSES = ["bce"] + [f"tversky_a{a}" for a in ("0.25", "0.35", "0.45", "0.5", "0.65", "0.75",
                                              "0.85")]


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm(np.array([0.01, 0.04, 0.03, 0.005])) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm(np.array([0.01, math.nan, 0.04]))  # a comparison not made: not in m
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.04)
    assert math.isnan(adjusted[1])
    assert holm(np.array([0.5, 0.6])) == pytest.approx([1.0, 1.0])  # capped at 1
    rows = np.array([[0.01, 0.04, 0.03, 0.005], [0.2, 0.01, 0.02, 0.9]])
    assert holm(rows) == pytest.approx(np.stack([holm(r) for r in rows]))  # per row


# --- the model by hand --------------------------------------------------------------------

def test_one_run_per_fold_is_a_t_test_over_the_fold_means():
    # 3 folds of 2 patients, one seed: the folds' means are 0.1, 0.3, 0.2
    values = np.array([[0.0, 0.2, 0.2, 0.4, 0.1, 0.3]])
    block = np.array([0, 0, 1, 1, 2, 2])
    fit = nested_mean(values, block)
    expected = stats.ttest_1samp([0.1, 0.3, 0.2], 0.0)
    assert fit["mean"] == pytest.approx(0.2) and fit["df"] == 2
    assert fit["se"] == pytest.approx(0.1 / math.sqrt(3))  # SD of the fold means 0.1
    assert fit["p"] == pytest.approx(expected.pvalue)
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert (fit["low"], fit["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert math.isnan(fit["residual_var"])  # not separable from one run per fold


def test_several_runs_per_fold_use_the_runs_within_each_fold():
    # 2 folds of 2 patients, 2 runs each; run s of fold k shifts both its patients
    values = np.array([[0.10, 0.30, 0.00, 0.20],
                       [0.20, 0.40, 0.20, 0.40]])
    block = np.array([0, 0, 1, 1])
    fit = nested_mean(values, block)
    # run means: fold 0: 0.2, 0.3; fold 1: 0.1, 0.3 -> within-fold variance of the run means
    runs_var = ((0.05 ** 2) * 2 + (0.1 ** 2) * 2) / 2
    # no residual (each patient moves with its run); patient means within folds: +-0.1
    patient_var = (4 * 0.1 ** 2) / 2
    assert fit["mean"] == pytest.approx(0.225)
    assert fit["residual_var"] == pytest.approx(0.0, abs=1e-12)
    se = math.sqrt(runs_var * (0.5 ** 2 / 2) * 2 + patient_var / 4)
    assert fit["se"] == pytest.approx(se)
    assert fit["run_var"] == pytest.approx(runs_var)


@pytest.mark.filterwarnings("ignore::statsmodels.tools.sm_exceptions.ConvergenceWarning")
def test_the_model_agrees_with_statsmodels_mixedlm():
    """statsmodels' REML fit of d ~ 1 + (1 | run pair) + (1 | patient), patients and run pairs
    nested in folds, on balanced data: the same estimate, standard error and components."""
    smf = pytest.importorskip("statsmodels.formula.api")
    import pandas as pd

    rng = np.random.default_rng(3)
    block = np.repeat(np.arange(5), 8)
    seeds = 4
    values = (0.01 + rng.normal(0, 0.02, (seeds, 5))[:, block]
              + rng.normal(0, 0.02, 40) + rng.normal(0, 0.03, (seeds, 40)))
    fit = nested_mean(values, block)
    frame = pd.DataFrame([{"d": values[s, p], "fold": block[p], "run": f"{block[p]}-{s}",
                           "patient": p} for s in range(seeds) for p in range(40)])
    model = smf.mixedlm("d ~ 1", frame, groups="fold", re_formula="0",
                        vc_formula={"run": "0 + C(run)", "patient": "0 + C(patient)"}
                        ).fit(reml=True)
    assert fit["mean"] == pytest.approx(model.fe_params["Intercept"], abs=1e-9)
    assert fit["se"] == pytest.approx(model.bse["Intercept"], rel=0.1)
    assert fit["residual_var"] == pytest.approx(model.scale, rel=0.1)


def test_grid_pairs_runs_and_patients_both_losses_have():
    a = {("0", "0", "p0"): 0.8, ("0", "1", "p0"): 0.9, ("0", "0", "p1"): 0.7,
         ("0", "1", "p1"): 0.6, ("1", "0", "p2"): 0.5, ("1", "1", "p2"): 0.4}
    b = {k: v for k, v in a.items() if k != ("0", "1", "p1")}  # b's seed 1 lacks p1
    g = grid(a, b)
    assert g.patients == ("p0", "p2") and list(g.block) == [0, 1] and g.runs == 4
    # held-out test patients are scored by every run: one block, runs as the axis
    test = {(f, s, p): 0.5 for f in "01" for s in "01" for p in ("t0", "t1")}
    crossed = grid(test)
    assert crossed.values.shape == (4, 2) and set(crossed.block) == {0}


# --- rows -------------------------------------------------------------------------------

def row(loss, patient, seed, dice, fold=None, **extra):
    return {"loss": loss, "patient": patient, "seed": str(seed),
            "fold": str(int(patient[1:]) % 2 if fold is None else fold), "split": "val",
            "dice": dice, "precision": math.nan, "recall": math.nan, "hd95": math.nan,
            "hd95_failed": 0.0, **extra}


def test_summary_of_one_loss():
    rows = [row("bce", "p0", 0, 0.80, hd95=4.0), row("bce", "p0", 1, 0.90, hd95=6.0),
            row("bce", "p1", 0, 0.60, hd95=10.0), row("bce", "p1", 1, 0.70, hd95=30.0,
                                                       hd95_failed=1.0),
            row("bce", "p2", 0, 0.95, hd95=2.0), row("bce", "p2", 1, 0.85, hd95=2.0)]
    s = summarize("bce", rows)
    assert s.n_patients == 3 and s.n_runs == 4 and s.seeds == 2 and s.folds == 2
    assert s.dice_mean == pytest.approx(0.8) and s.dice_median == pytest.approx(0.85)
    assert s.hd95_median == pytest.approx(5.0) and s.hd95_failed == 1  # medians of 5, 20, 2
    fit = nested_mean(grid(cells(rows)).values, grid(cells(rows)).block)
    assert (s.dice_ci_low, s.dice_ci_high) == pytest.approx((float(fit["low"]), float(fit["high"])))


def run_rows(loss, pred, true=100, total=10_000, gain=-0.01, early=False, run=None):
    return [{**row(loss, f"p{i}", 0, 0.5), "run": run or loss, "voxels_pred": pred,
             "voxels_true": true, "voxels_total": total, "late_gain": gain,
             "stopped_early": early} for i in range(3)]


def test_flags_degenerate_and_unconverged_runs():
    assert loss_flags(run_rows("a", pred=120)) == []
    assert "predicts no gland at all" in loss_flags(run_rows("a", pred=0))[0]
    assert "predicts gland in 80% of all voxels" in loss_flags(run_rows("a", pred=8000))[0]
    everywhere = [{**row("a", f"p{i}", 0, 0.05), "precision": 0.03, "recall": 1.0}
                  for i in range(3)]
    assert "predicts gland nearly everywhere" in loss_flags(everywhere)[0]
    nothing = [{**row("a", f"p{i}", 0, 0.0), "precision": 0.0, "recall": 0.0} for i in range(3)]
    assert "finds no gland voxel" in loss_flags(nothing)[0]
    # a table of Dice alone (precision and recall NaN or absent): a collapsed run still shows
    collapsed = [row("a", f"p{i}", 0, 0.0, fold="0") for i in range(3)]
    assert loss_flags(collapsed) == ["degenerate in 1 of 1 runs (scores Dice 0 on every patient)"]
    assert loss_flags(collapsed[:2] + [row("a", "p2", 0, 0.4, fold="0")]) == []
    assert "scores Dice 0" in loss_flags([{"loss": "a", "patient": "p0", "dice": 0.0}])[0]
    assert "scores Dice 0" in loss_flags(collapsed + [row("a", "p3", 0, math.nan, fold="0")])[0]


def test_not_converged_is_a_mean_late_gain_above_the_bound_and_above_0_over_the_runs():
    def runs(*gains, early=()):
        return [r for i, g in enumerate(gains) for r in run_rows(
            "a", 120, gain=g, early=i in early, run=f"r{i}")]

    # 0.02, 0.03, 0.04: t = 0.03 / (0.01 / sqrt 3) = 5.196 on 2 df, p = 1/2 - t / (2 sqrt(2 + t^2))
    assert loss_flags(runs(0.02, 0.03, 0.04)) == [
        "not converged: selection Dice still rising at the end, +0.030 over the last quarter of "
        "the epochs (mean of 3 runs, above 0 at p = 0.018; bound 0.01)"]
    assert loss_flags(runs(0.03, 0.0, 0.03)) == []  # mean 0.02, but t = 2, p = 0.09: the runs
    assert loss_flags(runs(0.03, 0.0, -0.01)) == []  # disagree; here the mean is 0.0067
    assert loss_flags(runs(0.01, 0.01)) == []  # the bound itself: converged
    # one run, or runs all alike, leave nothing to test against: the bound alone
    assert loss_flags(runs(0.03)) == ["not converged: selection Dice still rising at the end, "
                                      "+0.030 over the last quarter of the epochs (1 run, "
                                      "nothing to test with: judged by the bound 0.01 alone)"]
    assert "(3 runs, nothing to test with" in loss_flags(runs(0.1, 0.1, 0.1))[0]
    # an early-stopped run counts 0: 0, 0.02, 0.03, 0.04
    assert "+0.022 over the last quarter of the epochs (mean of 4 runs, above 0 at p = 0.039" \
        in loss_flags(runs(0.05, 0.02, 0.03, 0.04, early=(0,)))[0]
    assert loss_flags(runs(0.03, early=(0,))) == []  # stopped on its own: nothing left
    assert loss_flags(runs(math.nan)) == []  # no selection curve: not judged
    one_epoch = [{**r, "late_gain": None, "epochs_trained": 1} for r in runs(0.0, 0.0)]
    assert loss_flags(one_epoch) == ["not converged: 2 of 2 runs trained under two epochs, so "
                                     "nothing shows they had stopped learning"]
    assert loss_flags([{**r, "epochs_trained": 2} for r in one_epoch]) == []
    # one short run among long ones is still an unconverged run; a run of 0 epochs too
    mixed = [{**r, "epochs_trained": 0 if r["run"] == "r0" else 50} for r in runs(0.0, 0.0)]
    assert loss_flags(mixed) == ["not converged: 1 of 2 runs trained under two epochs, so "
                                 "nothing shows they had stopped learning"]


def test_late_gain_is_the_rise_over_the_last_quarter_at_its_fitted_pace():
    assert late_gain([0.5]) is None and late_gain([]) is None
    assert late_gain([0.5, 0.6]) == pytest.approx(0.2)  # at least 3 epochs, here both: 0.1 x 2
    assert late_gain([0.9, 0.5, 0.6]) == pytest.approx(-0.45)  # slope (0.6 - 0.9) / 2, x 3
    # issue 24's recipe on fold 0 (2026-12-05): it rose through its third quarter and stayed
    # flat in its fourth, converged; the quarters' means differ by +0.034. Slope over the last
    # 4: (1.5 (0.8005 - 0.7992) + 0.5 (0.8029 - 0.7961)) / 5 = 0.00107 per epoch, x 4
    recipe = [0.2906, 0.4151, 0.4185, 0.5116, 0.5316, 0.6115, 0.7006, 0.6820, 0.7197, 0.7759,
              0.7785, 0.7897, 0.7992, 0.7961, 0.8029, 0.8005]
    assert late_gain(recipe) == pytest.approx(0.00428)
    dice = list(np.random.default_rng(0).uniform(0.5, 0.9, 21))  # numpy's own fit, last 5
    assert late_gain(dice) == pytest.approx(np.polyfit(np.arange(5), dice[-5:], 1)[0] * 5)


def selection_curves(rng, runs, rate, epochs=16, noise=0.03, floor=0.01, cosine=True, stop=None):
    """Selection Dice by epoch, under cosine decay or a constant learning rate, stopped after
    ``stop`` epochs (a time cap) or not: the learning done by epoch t follows the summed
    learning rate, the curve rises as 1 - exp(-rate * learning), each run has its own level (a
    run shift), and the epoch's noise follows the learning rate (four patients scored by
    weights that move less as it falls)."""
    lr = 0.5 * (1 + np.cos(np.pi * np.arange(epochs) / epochs)) if cosine else np.ones(epochs)
    learned = np.cumsum(lr) / lr.sum()
    level = 0.83 + rng.normal(0, 0.03, (runs, 1))
    return (level - 0.6 * np.exp(-rate * learned)
            + rng.normal(0, 1, (runs, epochs)) * (noise * lr + floor))[:, :stop]


@pytest.mark.parametrize("curves, flagged", [
    (dict(rate=8), (0.0, 0.1)),  # on its plateau by half-way
    (dict(rate=4), (0.0, 0.1)),  # still rising through the third quarter: the recipe's shape
    (dict(rate=8, cosine=False), (0.0, 0.1)),  # a plateau noisier by 3x (constant lr)
    (dict(rate=2, stop=8), (0.9, 1.0)),  # cut by a time cap half-way through its schedule
    (dict(rate=2, cosine=False), (0.7, 1.0)),  # constant lr: +0.05 over the last quarter
])
def test_simulated_sweeps_flag_runs_still_rising_and_not_noisy_plateaus(curves, flagged):
    """Sweeps of 5 folds x 3 seeds. A plateau is flagged at about the t-test's level (5 %; 2-9 %
    over simulation seeds) whatever its noise, though one plateaued run's late_gain alone
    crosses the bound a third to a half of the time and, on the noisier plateau, so does the
    mean of the 15 runs in a quarter of the sweeps; runs still rising at their end are flagged
    in most sweeps (nearly all when cut half-way). A cosine schedule cut to a lower plateau is
    flat at its end, and not what this flag can see: an epoch-budget ablation answers it
    (docs/METHOD.md)."""
    rng = np.random.default_rng(7)
    sweeps = [[late_gain(list(curve)) for curve in selection_curves(rng, 15, **curves)]
              for _ in range(200)]
    share = np.mean([bool(loss_flags([
        {"loss": "a", "patient": "p0", "dice": 0.8, "fold": str(i % 5), "seed": str(i // 5),
         "stopped_early": False, "late_gain": gain} for i, gain in enumerate(gains)]))
        for gains in sweeps])
    assert flagged[0] <= share <= flagged[1]
    if flagged[1] < 0.5:
        alone = np.mean([late_gain(list(c)) > LATE_GAIN
                         for c in selection_curves(rng, 3000, **curves)])
        assert 0.2 < alone < 0.5  # why one run is not judged alone
    if curves == dict(rate=8, cosine=False):  # why the runs' mean needs the t-test
        assert np.mean([np.mean(gains) > LATE_GAIN for gains in sweeps]) > 0.2


def test_ties_are_identical_per_patient_results():
    same = {("0", "0", "p0"): 0.1, ("0", "0", "p1"): 0.2}
    tables = {"a": same, "b": dict(same), "c": {**same, ("0", "0", "p1"): 0.3}}
    assert tie_flags(tables) == {"a": ["tie: identical per-patient Dice to b"],
                                 "b": ["tie: identical per-patient Dice to a"]}


def test_comparison_pairs():
    assert comparison_pairs(["bce", "x", "y"], "bce", False) == [("x", "bce"), ("y", "bce")]
    assert comparison_pairs(["bce", "x", "y"], "bce", True) == [("x", "bce"), ("y", "bce"),
                                                                ("y", "x")]
    assert comparison_pairs(["x", "y", "z"], None, False) == [("y", "x"), ("z", "x"), ("z", "y")]


# --- simulated studies ------------------------------------------------------------------

def test_the_folds_are_the_splits_own():
    assert sorted(fold_sizes()) == [7, 7, 7, 7, 8]


@pytest.mark.parametrize("seeds", [1, 3, 5])
def test_identical_losses_rarely_claim_a_difference_whatever_the_run_noise(seeds):
    """The issue's bar: about 5 % of null studies at most claim any difference, with a
    binomial upper 95 % bound <= 6.5 %, for every run SD and number of seeds (4,000 studies per
    setting here; 10,000 in benchmarks/calibration.py, whose table docs/METHOD.md quotes)."""
    rng = np.random.default_rng(seeds)
    studies = 4000
    for run_sd in (0.0, 0.005, 0.01, 0.02, 0.03):
        dice, block = simulate(rng, studies, seeds, run_sd)
        hits = int(claims(dice, block).any(axis=1).sum())
        print(f"{seeds} seeds, run SD {run_sd}: {hits / studies:.3f}")
        assert upper_bound(hits, studies) <= 0.065, run_sd


def test_patients_as_independent_units_would_claim_differences_that_are_not_there():
    """The simulation can fail: the decision the project replaced (each patient a replicate,
    its seeds averaged) claims a difference in far more than 5 % of null studies."""
    dice, block = simulate(np.random.default_rng(9), 1000, 3, 0.02)
    per_patient = dice.mean(axis=2)
    differences = per_patient[:, 1:] - per_patient[:, :1]
    p = stats.ttest_1samp(differences, 0.0, axis=-1).pvalue
    assert (holm(p) < SIGNIFICANCE).any(axis=1).mean() > 0.2
    assert claims(dice, block).any(axis=1).mean() <= 0.06


def test_more_seeds_find_a_planted_difference_more_often_and_the_plan_predicts_it():
    rng = np.random.default_rng(11)
    sizes = fold_sizes()
    found = {}
    for seeds in (1, 3, 5):
        dice, block = simulate(rng, 2000, seeds, 0.02, effect=0.03)
        found[seeds] = claims(dice, block)[:, 2].mean()  # tversky_a0.45 vs bce
        # the report's power formula, from the true components of a difference
        truth = Components(run=2 * 0.02 ** 2, patient=0.0, residual=2 * 0.03 ** 2)
        predicted = design_power(truth, sizes, seeds, 0.03, comparisons=7)
        print(f"{seeds} seeds: power {found[seeds]:.2f}, predicted {predicted:.2f}")
        assert predicted == pytest.approx(found[seeds], abs=0.08)
    assert found[1] < found[3] < found[5] and found[5] >= 0.8
    assert seeds_needed(truth, sizes, 0.03, 7) in (3, 4, 5)
    assert seeds_needed(truth, sizes, 0.02, 7) > seeds_needed(truth, sizes, 0.03, 7)


def test_each_losss_interval_covers_its_true_mean():
    dice, block = simulate(np.random.default_rng(12), 2000, 3, 0.02)
    fit = nested_mean(dice[:, 0], block)
    covered = ((fit["low"] <= 0.82) & (0.82 <= fit["high"])).mean()
    assert 0.93 <= covered <= 0.97


def test_a_patient_specific_effect_of_the_loss_is_no_difference_claimed():
    """Each patient suits each loss its own way (SD 0.04): a test over run pairs alone, or one
    without the patient term, claims differences in 15-40 % of these null studies."""
    rng = np.random.default_rng(13)
    for seeds in (3, 5):
        dice, block = simulate(rng, 3000, seeds, 0.01, interaction_sd=0.04)
        hits = int(claims(dice, block).any(axis=1).sum())
        assert upper_bound(hits, 3000) <= 0.065, seeds


def fold_study(rng, studies, seeds, fold_loss_sd, run_sd=0.02, residual_sd=0.03, sizes=None):
    """Differences whose folds' training sets each suit the loss their own way (``u``), and
    the mean over patients of ``u``: what the comparison estimates for this split."""
    sizes = sizes or fold_sizes()
    block = np.repeat(np.arange(len(sizes)), sizes)
    u = rng.normal(0, fold_loss_sd, (studies, 1, len(sizes)))
    d = (u + rng.normal(0, run_sd, (studies, seeds, len(sizes))))[..., block] \
        + rng.normal(0, residual_sd, (studies, seeds, len(block)))
    return d, block, (u[:, 0] * np.bincount(block)).sum(-1) / len(block)


def test_claims_are_about_this_splits_training_sets_and_the_fold_means_about_others():
    """A fold x loss effect is shared by every seed of the fold: the verdict's interval covers
    this split's difference, and the folds' means alone keep false claims about other training
    sets near 5 %, where the verdict's test (made for this split) claims far more."""
    rng = np.random.default_rng(14)
    d, block, this_split = fold_study(rng, 3000, 5, 0.02)
    fit = nested_mean(d, block)
    covered = ((fit["low"] <= this_split) & (this_split <= fit["high"])).mean()
    assert 0.93 <= covered <= 0.97
    assert upper_bound(int((fit["p_folds"] < SIGNIFICANCE).sum()), 3000) <= 0.065
    assert (fit["p"] < SIGNIFICANCE).mean() > 0.3


def test_the_fold_means_test_holds_for_unequal_folds():
    """Folds of 4 to 20 patients (a hand-made table, or patients left out of a pairing): a
    patient-weighted mean over 4 df rejected 8 % of these null studies."""
    d, block, _ = fold_study(np.random.default_rng(16), 4000, 3, 0.02, sizes=[4, 6, 8, 12, 20])
    assert upper_bound(int((nested_mean(d, block)["p_folds"] < SIGNIFICANCE).sum()), 4000) \
        <= 0.065


@pytest.mark.parametrize("fold_loss_sd, low, high", [(0.0, 0.03, 0.07), (0.04, 0.8, 1.0)])
def test_folds_are_said_to_disagree_as_often_as_they_do(fold_loss_sd, low, high):
    d, block, _ = fold_study(np.random.default_rng(15), 3000, 3, fold_loss_sd)
    assert low <= (nested_mean(d, block)["heterogeneity_p"] < SIGNIFICANCE).mean() <= high
    present = np.ones((3, 5), dtype=bool)
    present[1:, 0] = False  # fold 0 has one run, the others three
    rate = (nested_mean(d, block, present)["heterogeneity_p"] < SIGNIFICANCE).mean()
    assert 0.75 * low <= rate <= high  # less power with one run fewer, no more false alarms


def test_folds_differing_with_no_spread_within_them_disagree_for_certain():
    block = np.repeat(np.arange(3), 4)
    shifted = np.tile(np.repeat([0.0, 0.02, 0.05], 4), (2, 1))
    assert nested_mean(shifted, block)["heterogeneity_p"] == 0.0
    assert nested_mean(np.full((2, 12), 0.03), block)["heterogeneity_p"] == 1.0


def test_the_verdict_says_which_claims_hold_over_the_fold_means_and_where_folds_disagree():
    block_effect = {"0": 0.06, "1": 0.0}  # fold 0's training set suits x, fold 1's does not
    rows = [{**r, "dice": r["dice"] + block_effect[r["fold"]] * (r["loss"] == "x")}
            for r in study_rows({"bce": 0.0, "x": 0.0})]
    analysis = analyse(rows, ["bce", "x"], "bce")
    c = analysis.comparisons[0]
    assert c.significant and c.heterogeneity_p_holm < SIGNIFICANCE and c.p_folds_holm >= 0.05
    text = "\n".join(analysis.verdict)
    assert ("These claims are about networks trained on this split's 2 training sets (one per "
            "fold). Over the folds' mean differences alone, a weaker test that reaches other "
            "training sets (1 degree of freedom, Holm): x vs bce is not shown "
            f"(p_holm = {c.p_folds_holm:.2g}).") in text
    assert (f"The folds disagree more than their runs and patients explain on x vs bce "
            f"(heterogeneity p_holm = {c.heterogeneity_p_holm:.2g}): the difference may depend "
            "on the training set, which more seeds do not average away; more folds "
            "(data.folds), or the sweep repeated with another data.split_seed, show how much."
            ) in text


def test_claims_of_one_fold_say_they_are_about_one_training_set():
    rows = [{**r, "fold": "0"} for r in study_rows({"bce": 0.0, "x": 0.03})]
    text = "\n".join(analyse(rows, ["bce", "x"], "bce").verdict)
    assert "x scores higher than bce" in text
    assert ("These claims are about networks trained on one training set (one fold): nothing "
            "here reaches other training sets; more folds would.") in text


def long_rows(study, seeds, block):
    return [row(loss, f"p{p:02d}", s, float(study[i, s, p]), fold=str(block[p]))
            for i, loss in enumerate(LOSSES) for s in range(seeds) for p in range(len(block))]


@pytest.mark.parametrize("seeds", [1, 3])
def test_the_verdict_decides_as_the_vectorised_simulation(seeds):
    dice, block = simulate(np.random.default_rng(4), 4, seeds, 0.01, effect=0.03)
    for study, decided in zip(dice, claims(dice[:, :], block)):
        analysis = analyse(long_rows(study, seeds, block), LOSSES, "bce")
        assert [c.significant for c in analysis.comparisons] == list(decided)


def test_common_random_numbers_are_measured():
    dice, block = simulate(np.random.default_rng(5), 1, 5, 0.03, shift_correlation=0.8)
    analysis = analyse(long_rows(dice[0], 5, block), LOSSES, "bce")
    assert analysis.design.shift_correlation > 0.5
    assert "run shifts of two losses on the same fold and seed correlate r = " in \
        "\n".join(analysis.verdict)


# --- the verdict ------------------------------------------------------------------------

def study_rows(effects, patients=24, seeds=3, run_shift=0.004):
    """Deterministic per-patient Dice: patients spread over 0.70-0.92, each loss adds its
    effect, each run of a loss a shift of +-run_shift that alternates with seed and fold, and
    a zigzag of +-0.004 to +-0.012 per patient that flips sign every three patients and
    between neighbouring losses."""
    rows = []
    for k, (loss, effect) in enumerate(effects.items()):
        for seed in range(seeds):
            for p in range(patients):
                zigzag = 0.004 * (p % 3 + 1) * (-1) ** (p // 3 + k)
                shift = run_shift * (-1) ** (seed + p % 2 + k)
                rows.append(row(loss, f"p{p:02d}", seed,
                                0.70 + 0.22 * p / patients + effect + zigzag + shift))
    return rows


def test_verdict_names_the_difference_with_its_size_and_design():
    rows = study_rows({"bce": 0.0, "tversky_a0.25": 0.0, "tversky_a0.5": 0.03})
    analysis = analyse(rows, ["bce", "tversky_a0.25", "tversky_a0.5"], "bce")
    text = "\n".join(analysis.verdict)
    c = next(c for c in analysis.comparisons if c.loss == "tversky_a0.5")
    assert c.significant and c.n_run_pairs == 6
    assert (f"tversky_a0.5 scores higher than bce: ΔDice {c.mean_diff:+.3f} (95 % CI "
            f"{c.ci_low:+.3f} to {c.ci_high:+.3f}") in text
    assert "higher in 6 of 6 run pairs" in text
    assert "24 val patients (2 folds × 3 seeds)" in text
    assert "Training randomness is measured by 3 seeds in each of 2 folds" in text
    assert "no difference from bce detected for tversky_a0.25" in text
    assert "equal" not in text and "Best" not in text
    assert "its lead over tversky_a0.25 was not tested (use --all-pairs)" in text
    # a loss of one run: its pair with the leader exists but cannot be tested
    one_run = [r for r in study_rows({"bce": 0.0, "dice": 0.01})
               if r["loss"] == "dice" and r["seed"] == "0" and r["fold"] == "0"]
    text = "\n".join(analyse(rows + one_run, ["bce", "tversky_a0.25", "tversky_a0.5", "dice"],
                              "bce", all_pairs=True).verdict)
    assert "over dice was not tested (one run pair)" in text and "nan" not in text


def test_one_seed_per_fold_says_its_test_is_weak_before_anything_else():
    rows = study_rows({"bce": 0.0, "tversky_a0.5": 0.01}, seeds=1)
    analysis = analyse(rows, ["bce", "tversky_a0.5"], "bce")
    first = analysis.verdict[0]
    assert first.startswith("With one seed per fold, only the spread of the 2 folds' mean "
                            "differences tells a lucky run from a better loss (1 degree of "
                            "freedom): the test is valid but weak")
    assert "a run pair shifts a difference by SD" in first and "patients by SD" in first
    assert "needs at least" in first and "seeds per fold" in first


def test_a_table_without_folds_or_seeds_claims_nothing():
    rows = [{**r, "fold": "", "seed": ""} for r in study_rows({"bce": 0.0, "x": 0.05}, seeds=1)]
    analysis = analyse(rows, ["bce", "x"], "bce")
    assert analysis.verdict[0].startswith("Each loss has a single run here")
    assert not analysis.comparisons[0].significant and math.isnan(analysis.comparisons[0].p_value)


def test_best_only_when_the_lead_over_every_loss_survives():
    losses = ["bce", "tversky_a0.25", "tversky_a0.5"]
    analysis = analyse(study_rows({"bce": 0.0, "tversky_a0.25": 0.01, "tversky_a0.5": 0.05}),
                       losses, "bce", all_pairs=True)
    assert len(analysis.comparisons) == 3
    assert analysis.verdict[-1] == ("Best: tversky_a0.5, whose lead over every other loss "
                                    "survives the Holm correction.")
    close = analyse(study_rows({"bce": 0.0, "tversky_a0.25": 0.03, "tversky_a0.5": 0.0302}),
                    losses, "bce", all_pairs=True)
    assert close.verdict[-1].startswith("No loss is called best: tversky_a0.5")


def test_flagged_losses_are_said_first_and_nothing_is_ranked():
    rows = study_rows({"bce": 0.0, "tversky_a0.25": 0.0, "tversky_a0.5": 0.05})
    rows = [{**r, "late_gain": 0.04, "stopped_early": False}
            if r["loss"] == "tversky_a0.5" else r for r in rows]
    analysis = analyse(rows, ["bce", "tversky_a0.25", "tversky_a0.5"], "bce", all_pairs=True)
    assert analysis.verdict[0].startswith("Caution: 1 of 3 losses has runs that cannot "
                                          "support a conclusion (not converged: tversky_a0.5;")
    text = "\n".join(analysis.verdict)
    assert "Best" not in text and "tversky_a0.5 scores" not in text
    assert "no difference from bce detected for tversky_a0.25" in text


def test_a_seven_way_tie_of_collapsed_runs_ranks_nothing():
    rows = [{**row(loss, f"p{p}", 0, 0.0), "precision": 0.0, "recall": 0.0}
            for loss in LOSSES[1:] for p in range(6)]
    analysis = analyse(rows, LOSSES[1:], None)
    assert analysis.verdict[0].startswith("Caution: 7 of 7 losses")
    assert "(degenerate: " in analysis.verdict[0] and "; tie: " in analysis.verdict[0]
    assert len(analysis.verdict[0]) < 400
    assert not any("Best" in line or "scores higher" in line for line in analysis.verdict)


def test_between_other_losses_the_higher_one_is_named_first():
    rows = study_rows({"bce": 0.0, "tversky_a0.25": 0.05, "tversky_a0.5": 0.01})
    analysis = analyse(rows, ["bce", "tversky_a0.25", "tversky_a0.5"], "bce", all_pairs=True)
    pair = analysis.comparisons[2]
    assert (pair.loss, pair.baseline) == ("tversky_a0.5", "tversky_a0.25")
    assert pair.mean_diff == pytest.approx(-0.04) and pair.significant
    between = next(line for line in analysis.verdict if line.startswith("Between"))
    assert between.startswith(f"Between the other losses: tversky_a0.25 scores higher than "
                              f"tversky_a0.5: ΔDice +0.040 (95 % CI {-pair.ci_high:+.3f} to "
                              f"{-pair.ci_low:+.3f}")
    assert analysis.verdict[-1].startswith("Best: tversky_a0.25")


def test_best_is_judged_on_the_patients_all_losses_share():
    rows = study_rows({"bce": 0.005, "x": 0.0})
    # x lacks its three hardest patients: its own mean is higher, on shared patients bce's is
    rows = [r for r in rows if not (r["loss"] == "x" and r["patient"] in ("p00", "p01", "p02"))]
    analysis = analyse(rows, ["bce", "x"], "bce", all_pairs=True)
    means = {s.loss: s.dice_mean for s in analysis.summaries}
    assert means["x"] > means["bce"]
    assert analysis.verdict[-1].startswith("No loss is called best: bce has the highest mean")
