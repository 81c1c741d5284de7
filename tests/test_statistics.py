"""The report's statistics on arrays and rows: hand-computed values, and simulated studies
that measure how often the verdict claims a difference that is not there, and how often it
finds one that is."""

import math

import numpy as np
import pytest
from scipy import stats

from prostate_seg.study.statistics import (
    ALPHA,
    analyse,
    bootstrap_ci,
    cohens_dz,
    compare,
    comparison_pairs,
    holm,
    loss_flags,
    per_patient,
    rank_biserial,
    signed_rank_p,
    summarize,
    tie_flags,
)

LOSSES = ["bce"] + [f"tversky_a{a}" for a in ("0.25", "0.35", "0.45", "0.5", "0.65", "0.75",
                                              "0.85")]


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm(np.array([0.01, 0.04, 0.03, 0.005])) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # a comparison that could not be made does not count in m
    adjusted = holm(np.array([0.01, math.nan, 0.04]))
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.04)
    assert math.isnan(adjusted[1])
    assert holm(np.array([0.5, 0.6])) == pytest.approx([1.0, 1.0])  # capped at 1
    rows = np.array([[0.01, 0.04, 0.03, 0.005], [0.2, 0.01, 0.02, 0.9]])
    assert holm(rows) == pytest.approx(np.stack([holm(r) for r in rows]))  # per row


def test_signed_rank_p_is_scipys_wilcoxon():
    d = np.array([0.02, -0.01, 0.03, 0.05, 0.04, -0.005, 0.06, 0.01])
    assert float(signed_rank_p(d)) == pytest.approx(stats.wilcoxon(d).pvalue)
    assert float(signed_rank_p(np.full(5, 0.1))) == pytest.approx(2 / 2 ** 5)  # exact, n = 5
    assert float(signed_rank_p(np.zeros(6))) == 1.0  # nothing to rank: no evidence


def test_effect_sizes_by_hand():
    assert rank_biserial([1.0, 2.0, -3.0]) == pytest.approx(0.0)  # R+ = 1 + 2 = R- = 3
    assert rank_biserial([-1.0, 2.0, 3.0, 4.0]) == pytest.approx((9 - 1) / 10)
    assert rank_biserial([0.1, 0.2, 0.3]) == 1.0 and rank_biserial([-0.1, -0.2]) == -1.0
    assert cohens_dz([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # mean 2, SD 1


def test_bootstrap_interval_of_the_mean():
    values = np.random.default_rng(3).normal(0.8, 0.05, 400)
    low, high = bootstrap_ci(values)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert low < values.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_ci(values) == (low, high)  # the same table, the same interval
    assert bootstrap_ci([0.7, 0.7, 0.7]) == (0.7, 0.7)
    assert all(math.isnan(v) for v in bootstrap_ci([0.7]))


def row(loss, patient, seed, dice, **extra):
    return {"loss": loss, "patient": patient, "seed": str(seed), "fold": str(int(patient[1:]) % 2),
            "split": "val", "dice": dice, "precision": math.nan, "recall": math.nan,
            "hd95": math.nan, "hd95_failed": 0.0, **extra}


def test_summary_averages_each_patient_over_seeds_first():
    rows = [row("bce", "p0", 0, 0.80, hd95=4.0), row("bce", "p0", 1, 0.90, hd95=6.0),
            row("bce", "p1", 0, 0.60, hd95=10.0), row("bce", "p1", 1, 0.70, hd95=30.0,
                                                       hd95_failed=1.0),
            row("bce", "p2", 0, 0.95, hd95=2.0), row("bce", "p2", 1, 0.85, hd95=2.0)]
    assert per_patient(rows) == pytest.approx({"p0": 0.85, "p1": 0.65, "p2": 0.90})
    s = summarize("bce", rows)
    assert s.n_patients == 3 and s.n_runs == 4 and s.seeds == 2 and s.folds == 2
    assert s.dice_mean == pytest.approx(0.8) and s.dice_median == pytest.approx(0.85)
    # per-seed means: seed 0 (0.8 + 0.6 + 0.95) / 3, seed 1 (0.9 + 0.7 + 0.85) / 3
    assert s.seed_sd == pytest.approx(np.std([2.35 / 3, 2.45 / 3], ddof=1))
    assert s.hd95_median == pytest.approx(5.0) and s.hd95_failed == 1  # medians of 5, 20, 2


def run_rows(loss, pred, true=100, total=10_000, best=5, trained=10, early=True):
    return [{**row(loss, f"p{i}", 0, 0.5), "run": loss, "voxels_pred": pred,
             "voxels_true": true, "voxels_total": total, "best_epoch": best,
             "epochs_trained": trained, "stopped_early": early} for i in range(3)]


def test_flags_degenerate_and_unconverged_runs():
    assert loss_flags(run_rows("a", pred=120)) == []
    assert "predicts no gland at all" in loss_flags(run_rows("a", pred=0))[0]
    assert "predicts gland in 80% of all voxels" in loss_flags(run_rows("a", pred=8000))[0]
    assert "not converged in 1 of 1 runs" in loss_flags(run_rows("a", 120, best=9, early=False))[0]
    assert loss_flags(run_rows("a", 120, best=9, trained=10, early=True)) == []  # stopped early
    # without voxel counts: precision and recall tell
    everywhere = [{**row("a", f"p{i}", 0, 0.05), "precision": 0.03, "recall": 1.0}
                  for i in range(3)]
    assert "predicts gland nearly everywhere" in loss_flags(everywhere)[0]
    nothing = [{**row("a", f"p{i}", 0, 0.0), "precision": 0.0, "recall": 0.0} for i in range(3)]
    assert "finds no gland voxel" in loss_flags(nothing)[0]


def test_ties_are_identical_per_patient_results():
    dice = {"a": {"p0": 0.1, "p1": 0.2}, "b": {"p0": 0.1, "p1": 0.2}, "c": {"p0": 0.1, "p1": 0.3}}
    assert tie_flags(dice) == {"a": ["tie: identical per-patient Dice to b"],
                               "b": ["tie: identical per-patient Dice to a"]}


def test_comparison_pairs():
    assert comparison_pairs(["bce", "x", "y"], "bce", False) == [("x", "bce"), ("y", "bce")]
    assert comparison_pairs(["bce", "x", "y"], "bce", True) == [("x", "bce"), ("y", "bce"),
                                                                ("y", "x")]
    assert comparison_pairs(["x", "y", "z"], None, False) == [("y", "x"), ("z", "x"), ("z", "y")]


def test_comparison_is_paired_on_shared_patients_only():
    dice = {"bce": {"p0": 0.80, "p1": 0.70, "p2": 0.90, "p3": 0.50},
            "x": {"p0": 0.85, "p1": 0.74, "p2": 0.93}}
    seeds = {"bce": {"0": dice["bce"]}, "x": {"0": dice["x"]}}
    (c,) = compare(dice, [("x", "bce")], seeds)
    assert c.n_patients == 3 and c.mean_diff == pytest.approx(0.04)
    assert c.p_value == pytest.approx(stats.wilcoxon([0.05, 0.04, 0.03]).pvalue)
    assert c.p_holm == c.p_value and c.rank_biserial == 1.0
    assert c.seed_differences == pytest.approx((0.04,))


# --- simulated studies ------------------------------------------------------------------

def simulate(rng, studies, effect=0.0, losses=8, patients=36, seeds=3, seed_shift=0.0):
    """Per-patient Dice of ``studies`` studies, (studies, losses, patients) after averaging
    seeds. Patients differ a lot (SD 0.05, shared by every loss); each loss suits each patient
    a little differently (SD 0.025), every run adds its noise per patient (SD 0.02) and, with
    ``seed_shift``, a shift of its whole run. Loss 1 gets ``effect``."""
    patient = rng.normal(0.85, 0.05, (studies, 1, patients, 1))
    suits = rng.normal(0, 0.025, (studies, losses, patients, 1))
    run = rng.normal(0, seed_shift, (studies, losses, 1, seeds))
    noise = rng.normal(0, 0.02, (studies, losses, patients, seeds))
    dice = patient + suits + run + noise
    dice[:, 1] += effect
    return np.clip(dice, 0, 1).mean(axis=-1)


def claims(per_patient_dice):
    """The verdict's decision, vectorised: Holm over the 7 Wilcoxon tests against loss 0."""
    differences = per_patient_dice[:, 1:] - per_patient_dice[:, :1]
    return holm(signed_rank_p(differences)) < ALPHA


def test_identical_losses_rarely_claim_a_difference():
    studies = simulate(np.random.default_rng(0), 2000)
    rate = claims(studies).any(axis=1).mean()
    print(f"false-positive rate, 8 identical losses, 2000 studies: {rate:.3f}")
    assert rate <= 0.06


def test_a_small_seed_level_shift_stays_within_the_rate():
    studies = simulate(np.random.default_rng(1), 2000, seed_shift=0.0025)
    rate = claims(studies).any(axis=1).mean()
    print(f"false-positive rate with a run shift of SD 0.0025: {rate:.3f}")
    assert rate <= 0.06


def test_a_planted_three_point_lead_is_found():
    studies = simulate(np.random.default_rng(2), 2000, effect=0.03)
    found = claims(studies)[:, 0] & (studies[:, 1].mean(-1) > studies[:, 0].mean(-1))
    wrong = claims(studies)[:, 1:].any(axis=1).mean()  # the six identical ones
    print(f"power for +0.03 on 36 patients: {found.mean():.3f}; false claims beside it: {wrong:.3f}")
    assert found.mean() >= 0.80 and wrong <= 0.06


def test_best_is_almost_never_claimed_among_identical_losses():
    studies = simulate(np.random.default_rng(3), 1000)
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)]
    differences = np.stack([studies[:, j] - studies[:, i] for i, j in pairs], axis=1)
    significant = holm(signed_rank_p(differences)) < ALPHA
    leader = studies.mean(-1).argmax(-1)
    best = np.array([all(significant[s, k] for k, pair in enumerate(pairs) if leader[s] in pair)
                     for s in range(len(studies))])
    assert best.mean() <= 0.01 and significant.any(axis=1).mean() <= 0.06


def long_rows(per_patient_dice):
    """One simulated study as long-table rows (one seed, so rows are the per-patient means)."""
    return [row(loss, f"p{p:02d}", 0, float(per_patient_dice[i, p]))
            for i, loss in enumerate(LOSSES) for p in range(per_patient_dice.shape[1])]


def test_the_verdict_decides_as_the_vectorised_simulation():
    studies = simulate(np.random.default_rng(4), 6, effect=0.03)
    for study, decided in zip(studies, claims(studies)):
        analysis = analyse(long_rows(study), LOSSES, "bce")
        assert [c.significant for c in analysis.comparisons] == list(decided)


# --- the verdict ------------------------------------------------------------------------

def study_rows(effects, patients=24, seeds=3, seed_shifts=None):
    """Deterministic per-patient Dice: patients spread over 0.70-0.92, each loss adds its
    effect and a zigzag of +-0.004 to +-0.012 whose sign flips every three patients and
    between neighbouring losses. Two neighbouring losses then differ by a zigzag symmetric
    around their effects' difference (no difference when the effects are equal: p = 1); two
    losses one apart differ by exactly that difference. ``seed_shifts[loss]`` moves each of
    that loss's runs (seeds) as a whole."""
    rows = []
    for k, (loss, effect) in enumerate(effects.items()):
        for seed in range(seeds):
            shift = (seed_shifts or {}).get(loss, [0.0] * seeds)[seed]
            for p in range(patients):
                zigzag = 0.004 * (p % 3 + 1) * (-1) ** (p // 3 + k)
                rows.append(row(loss, f"p{p:02d}", seed,
                                0.70 + 0.22 * p / patients + effect + zigzag + shift))
    return rows


def test_verdict_names_the_difference_with_its_size_and_design():
    rows = study_rows({"bce": 0.0, "tversky_a0.25": 0.0, "tversky_a0.5": 0.03})
    analysis = analyse(rows, ["bce", "tversky_a0.25", "tversky_a0.5"], "bce")
    text = "\n".join(analysis.verdict)
    c = next(c for c in analysis.comparisons if c.loss == "tversky_a0.5")
    assert c.significant
    assert (f"tversky_a0.5 scores higher than bce: ΔDice {c.mean_diff:+.3f} (95 % CI "
            f"{c.ci_low:+.3f} to {c.ci_high:+.3f}") in text
    assert "24 val patients (2 folds × 3 seeds)" in text
    assert "no difference from bce detected for tversky_a0.25" in text
    assert "equal" not in text and "Best" not in text
    assert "its lead over every other loss was not tested (use --all-pairs)" in text


def test_verdict_without_any_difference():
    rows = study_rows({"bce": 0.0, "tversky_a0.5": 0.0}, patients=12)
    analysis = analyse(rows, ["bce", "tversky_a0.5"], "bce")
    assert analysis.comparisons[0].p_value == pytest.approx(1.0)
    assert "no difference from bce detected for tversky_a0.5 at this sample size" in \
        analysis.verdict[0]
    assert "No loss is called best" in analysis.verdict[-1]


def test_best_only_when_the_lead_over_every_loss_survives():
    rows = study_rows({"bce": 0.0, "tversky_a0.25": 0.01, "tversky_a0.5": 0.05})
    losses = ["bce", "tversky_a0.25", "tversky_a0.5"]
    analysis = analyse(rows, losses, "bce", all_pairs=True)
    assert len(analysis.comparisons) == 3
    assert analysis.verdict[-1] == ("Best: tversky_a0.5, whose lead over every other loss "
                                    "survives the Holm correction.")
    close = analyse(study_rows({"bce": 0.0, "tversky_a0.25": 0.03, "tversky_a0.5": 0.0302}),
                    losses, "bce", all_pairs=True)
    assert close.verdict[-1].startswith("No loss is called best: tversky_a0.5")


def test_a_difference_that_not_every_seed_shows_is_qualified():
    rows = study_rows({"bce": 0.0, "tversky_a0.25": 0.0, "tversky_a0.5": 0.0},
                      seed_shifts={"tversky_a0.5": [0.03, 0.03, -0.02]})
    analysis = analyse(rows, ["bce", "tversky_a0.25", "tversky_a0.5"], "bce")
    c = analysis.comparisons[1]
    assert c.significant and c.seed_differences == pytest.approx((0.03, 0.03, -0.02))
    assert not c.holds_in_every_seed
    assert ("but not in every seed (per-seed ΔDice -0.020 to +0.030: training randomness may "
            "account for part of it)") in analysis.verdict[0]


def test_flagged_losses_are_said_first_and_nothing_is_ranked():
    rows = study_rows({"bce": 0.0, "tversky_a0.25": 0.0, "tversky_a0.5": 0.05})
    rows = [{**r, "best_epoch": 9.0, "epochs_trained": 10.0, "stopped_early": False}
            if r["loss"] == "tversky_a0.5" else r for r in rows]
    analysis = analyse(rows, ["bce", "tversky_a0.25", "tversky_a0.5"], "bce", all_pairs=True)
    assert analysis.verdict[0].startswith("Caution: 1 of 3 losses have runs that cannot "
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
    assert len(analysis.verdict[0]) < 400  # one readable line: the details are in the table
    assert all("tie" in "".join(s.flags) and "degenerate" in "".join(s.flags)
               for s in analysis.summaries)
    assert not any("Best" in line or "scores higher" in line for line in analysis.verdict)


def test_between_other_losses_the_higher_one_is_named_first():
    rows = study_rows({"bce": 0.0, "tversky_a0.25": 0.05, "tversky_a0.5": 0.01})
    analysis = analyse(rows, ["bce", "tversky_a0.25", "tversky_a0.5"], "bce", all_pairs=True)
    pair = analysis.comparisons[2]
    assert (pair.loss, pair.baseline) == ("tversky_a0.5", "tversky_a0.25")
    assert pair.mean_diff == pytest.approx(-0.04) and pair.significant
    assert (f"Between the other losses: tversky_a0.25 scores higher than tversky_a0.5: "
            f"ΔDice +0.040 (95 % CI {-pair.ci_high:+.3f} to {-pair.ci_low:+.3f}") in \
        analysis.verdict[1]
    assert analysis.verdict[2].startswith("Best: tversky_a0.25")
