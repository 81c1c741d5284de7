"""The study's statistics on per-patient results: no files are read or written here.

The unit of evidence is the patient. Seeds (and, for held-out test patients, the folds'
models) are repetitions: each patient's score is first averaged over them, then:

* per loss: mean over patients with a patient-bootstrap 95 % confidence interval (BCa), the
  median, the seed-to-seed spread (standard deviation of the per-seed means), HD95 median and
  failures, precision and recall;
* per comparison (every loss against a baseline, or all pairs): the mean of the per-patient
  differences on the patients both losses have, its paired bootstrap 95 % CI (resampling
  patients, i.e. their differences), the two-sided Wilcoxon signed-rank p-value, the
  Holm-adjusted p-value over the comparisons made, and two effect sizes: the matched-pairs
  rank-biserial correlation (the effect size of the signed-rank test: +1 when every patient
  does better, -1 when every patient does worse) and Cohen's d_z (mean difference over the
  standard deviation of the differences);
* flags for runs that cannot support a conclusion (degenerate, not converged, ties), which
  keep a loss out of the verdict.

The decision is the Holm-corrected Wilcoxon test; the bootstrap intervals describe the size
of a difference and are not adjusted for multiplicity.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05  # family-wise error rate of the comparisons made (Holm)
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # the same table always gives the same intervals
# A model that calls at least this share of every voxel gland "predicts gland everywhere"
# (the prostate fills a few percent of a scan; recall is then ~1 and precision ~ prevalence).
EVERYWHERE_FRACTION = 0.5
# Without voxel counts: recall at least this high with precision at most EVERYWHERE_PRECISION.
EVERYWHERE_RECALL = 0.99
EVERYWHERE_PRECISION = 0.1
TIE_MIN_PATIENTS = 2  # identical per-patient Dice on this many patients is no coincidence
DIFFERENCE_DECIMALS = 12  # differences rounded so float noise does not break rank ties

Row = dict[str, Any]


# --- primitives on arrays ---------------------------------------------------------------

def bootstrap_ci(values: Sequence[float], seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95 % BCa bootstrap interval of the mean, resampling the values (patients).

    NaN with fewer than two values; a single point when every value is the same (the
    bootstrap distribution has no spread, which BCa cannot correct).
    """
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data)]
    if len(data) < 2:
        return math.nan, math.nan
    if np.ptp(data) == 0:
        return float(data[0]), float(data[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa on few distinct values warns, then is NaN
        for method in ("BCa", "percentile"):
            result = stats.bootstrap((data,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES,
                                     confidence_level=CONFIDENCE, method=method,
                                     rng=np.random.default_rng(seed))
            low, high = result.confidence_interval
            if np.isfinite(low) and np.isfinite(high):
                return float(low), float(high)
    return math.nan, math.nan


def signed_rank_p(differences: np.ndarray) -> np.ndarray:
    """Two-sided Wilcoxon signed-rank p-values of paired differences along the last axis.

    Zero differences are ranked and then dropped (Pratt), which keeps patients on which two
    losses agree in the test instead of discarding them; exact p-values when there are no
    zeros or ties and at most 50 patients, the normal approximation otherwise (scipy's
    choice). Where every difference is zero there is nothing to test: p = 1.
    """
    d = np.round(np.asarray(differences, dtype=float), DIFFERENCE_DECIMALS)
    all_zero = np.all(d == 0, axis=-1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")  # scipy warns about zeros / small samples
        p = stats.wilcoxon(d, zero_method="pratt", axis=-1).pvalue
    return np.where(all_zero, 1.0, p)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values along the last axis (Holm 1979).

    The k-th smallest of m p-values is multiplied by m - k + 1, a running maximum keeps the
    order, and the result is capped at 1; rejecting where the adjusted p < alpha controls the
    family-wise error rate at alpha under any dependence between the tests (the comparisons
    with one baseline are correlated). NaN p-values (comparisons that could not be made) are
    not counted in m and stay NaN. scipy.stats offers only false-discovery-rate adjustments
    (``false_discovery_control``: Benjamini-Hochberg/-Yekutieli), hence these few lines.
    """
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, axis=-1)  # NaN sort last
    ranked = np.take_along_axis(p, order, axis=-1)
    m = np.sum(np.isfinite(p), axis=-1, keepdims=True)
    factor = m - np.arange(p.shape[-1])
    adjusted = np.fmax.accumulate(np.minimum(1.0, ranked * factor), axis=-1)
    adjusted = np.where(np.isfinite(ranked), adjusted, np.nan)
    result = np.empty_like(adjusted)
    np.put_along_axis(result, order, adjusted, axis=-1)
    return result


def rank_biserial(differences: Sequence[float]) -> float:
    """Matched-pairs rank-biserial correlation (Kerby 2014): the rank sum of the positive
    differences minus that of the negative ones, over the total (ranks of |d|, zeros left
    out). +1: every patient does better; -1: every patient does worse."""
    d = np.round(np.asarray(differences, dtype=float), DIFFERENCE_DECIMALS)
    d = d[d != 0]
    if len(d) == 0:
        return 0.0 if len(differences) else math.nan
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def cohens_dz(differences: Sequence[float]) -> float:
    """Mean of the paired differences over their standard deviation (Cohen's d_z)."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return math.nan
    sd = d.std(ddof=1)
    return float(d.mean() / sd) if sd > 0 else math.nan


# --- per loss ---------------------------------------------------------------------------

def _nanmean(values: Iterable[float]) -> float:
    data = np.asarray(list(values), dtype=float)
    data = data[~np.isnan(data)]
    return float(data.mean()) if len(data) else math.nan


def _present(row: Row, key: str) -> bool:
    value = row.get(key)
    return value not in (None, "") and not (isinstance(value, float) and math.isnan(value))


def run_key(row: Row) -> str:
    """The run a row comes from: its ``run`` column, else its loss, fold and seed."""
    if _present(row, "run"):
        return str(row["run"])
    return f"{row['loss']} fold {row.get('fold', '')} seed {row.get('seed', '')}"


def per_patient(rows: Iterable[Row], metric: str = "dice") -> dict[str, float]:
    """Each patient's mean over its rows (its seeds), NaN values left out."""
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        values[str(row["patient"])].append(row.get(metric, math.nan))
    return {patient: _nanmean(v) for patient, v in values.items()}


def per_seed_patient(rows: Iterable[Row], metric: str = "dice") -> dict[str, dict[str, float]]:
    """seed -> patient -> mean over that seed's rows of the patient (one row, or one per fold
    for held-out test patients)."""
    by_seed: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_seed[str(row.get("seed", ""))].append(row)
    return {seed: per_patient(r, metric) for seed, r in by_seed.items()}


def _distinct(rows: Iterable[Row], key: str) -> list[str]:
    return sorted({str(r[key]) for r in rows if _present(r, key)})


@dataclass(frozen=True)
class LossSummary:
    loss: str
    n_patients: int
    n_runs: int
    folds: int  # distinct folds (0 when the table does not say)
    seeds: int
    dice_mean: float
    dice_ci_low: float
    dice_ci_high: float
    dice_median: float
    seed_sd: float  # SD of the per-seed mean Dice (NaN with one seed)
    precision_mean: float
    recall_mean: float
    hd95_median: float
    hd95_failed: int | None  # patient-runs whose HD95 was undefined; None: not in the table
    hd95_unit: str
    flags: tuple[str, ...] = ()


def summarize(loss: str, rows: list[Row], flags: Sequence[str] = ()) -> LossSummary:
    """Per-loss summary; ``rows`` are this loss's rows of one split."""
    dice = per_patient(rows, "dice")
    values = list(dice.values())
    low, high = bootstrap_ci(values)
    by_seed: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_seed[str(row.get("seed", ""))].append(row["dice"])
    seed_means = [float(np.mean(v)) for v in by_seed.values()]
    hd95 = [v for v in per_patient(rows, "hd95").values() if not math.isnan(v)]
    units = _distinct(rows, "hd95_unit")
    return LossSummary(
        loss=loss, n_patients=len(dice), n_runs=len({run_key(r) for r in rows}),
        folds=len(_distinct(rows, "fold")), seeds=len(_distinct(rows, "seed")),
        dice_mean=float(np.mean(values)), dice_ci_low=low, dice_ci_high=high,
        dice_median=float(np.median(values)),
        seed_sd=float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else math.nan,
        precision_mean=_nanmean(per_patient(rows, "precision").values()),
        recall_mean=_nanmean(per_patient(rows, "recall").values()),
        hd95_median=float(np.median(hd95)) if hd95 else math.nan,
        hd95_failed=(int(sum(r.get("hd95_failed") == 1 for r in rows))
                     if any(_present(r, "hd95_failed") for r in rows) else None),
        hd95_unit=units[0] if len(units) == 1 else "/".join(units),
        flags=tuple(flags))


# --- flags ------------------------------------------------------------------------------

def _sum(rows: list[Row], key: str) -> float | None:
    if not all(_present(r, key) for r in rows):
        return None
    return float(sum(r[key] for r in rows))


def degenerate_reason(rows: list[Row]) -> str | None:
    """Why one run's predictions are degenerate (nothing, or gland everywhere), or None.

    From voxel counts when the rows have them, else from precision and recall."""
    predicted, total = _sum(rows, "voxels_pred"), _sum(rows, "voxels_total")
    if predicted is not None and total:
        if predicted == 0:
            return "predicts no gland at all"
        if predicted / total >= EVERYWHERE_FRACTION:
            return f"predicts gland in {predicted / total:.0%} of all voxels"
        return None
    precision = [r.get("precision", math.nan) for r in rows]
    recall = [r.get("recall", math.nan) for r in rows]
    if any(math.isnan(v) for v in precision + recall):
        return None
    if max(recall) == 0 and max(precision) == 0:
        return "finds no gland voxel in any patient"
    if (np.mean(recall) >= EVERYWHERE_RECALL and np.mean(precision) <= EVERYWHERE_PRECISION):
        return (f"recall {np.mean(recall):.2f} with precision {np.mean(precision):.2f}: "
                "predicts gland nearly everywhere")
    return None


def not_converged(rows: list[Row]) -> bool:
    """A run whose best epoch is its last one and that did not stop early: it was still
    improving when the epochs ran out. Epochs count from 0 (``best_epoch`` is an index,
    ``epochs_trained`` a count); False when the table does not say."""
    row = rows[0]
    if not (_present(row, "best_epoch") and _present(row, "epochs_trained")):
        return False
    if row.get("stopped_early") is True:
        return False
    return row["best_epoch"] >= row["epochs_trained"] - 1


def loss_flags(rows: list[Row]) -> list[str]:
    """Flags of one loss from its runs: how many are degenerate or not converged."""
    runs: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        runs[run_key(row)].append(row)
    degenerate = [reason for r in runs.values() if (reason := degenerate_reason(r))]
    unconverged = sum(not_converged(r) for r in runs.values())
    flags = []
    if degenerate:
        reasons = sorted(set(degenerate), key=degenerate.index)
        flags.append(f"degenerate in {len(degenerate)} of {len(runs)} runs "
                     f"({'; '.join(reasons)})")
    if unconverged:
        flags.append(f"not converged in {unconverged} of {len(runs)} runs "
                     "(best epoch is the last, no early stop)")
    return flags


def tie_flags(patient_dice: dict[str, dict[str, float]]) -> dict[str, list[str]]:
    """Losses whose per-patient Dice is identical on every shared patient (at least
    TIE_MIN_PATIENTS): the same predictions under two names, e.g. two collapsed models."""
    ties: dict[str, list[str]] = defaultdict(list)
    names = list(patient_dice)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = set(patient_dice[a]) & set(patient_dice[b])
            if len(shared) >= TIE_MIN_PATIENTS and all(
                    round(patient_dice[a][p] - patient_dice[b][p], DIFFERENCE_DECIMALS) == 0
                    for p in shared):
                ties[a].append(b)
                ties[b].append(a)
    return {loss: [f"tie: identical per-patient Dice to {', '.join(others)}"]
            for loss, others in ties.items()}


# --- comparisons ------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    loss: str
    baseline: str
    n_patients: int
    mean_diff: float  # loss minus baseline: positive = the loss scores higher
    ci_low: float
    ci_high: float
    p_value: float
    p_holm: float
    significant: bool
    rank_biserial: float
    cohens_dz: float
    # The mean difference within each seed shared by both losses: the patient-level test
    # treats the trained models as given, so a reader sees here whether the difference
    # holds in every seed (training randomness) or not.
    seed_differences: tuple[float, ...] = ()

    @property
    def holds_in_every_seed(self) -> bool:
        return all(np.sign(d) == np.sign(self.mean_diff) for d in self.seed_differences)


def comparison_pairs(losses: Sequence[str], baseline: str | None,
                     all_pairs: bool) -> list[tuple[str, str]]:
    """(loss, reference) pairs: each loss against the baseline first, then (all pairs, or
    no baseline) every other pair, the later loss in ``losses`` against the earlier one."""
    pairs = [(loss, baseline) for loss in losses if baseline is not None and loss != baseline]
    if all_pairs or baseline is None:
        pairs += [(b, a) for i, a in enumerate(losses) for b in losses[i + 1:]
                  if baseline not in (a, b)]
    return pairs


def seed_differences(a: dict[str, dict[str, float]],
                     b: dict[str, dict[str, float]]) -> tuple[float, ...]:
    """Mean difference a - b within each seed both have (seed -> patient -> score), on the
    patients both have in that seed."""
    found = []
    for seed in sorted(set(a) & set(b)):
        shared = set(a[seed]) & set(b[seed])
        if shared:
            found.append(float(np.mean([a[seed][p] - b[seed][p] for p in shared])))
    return tuple(found)


def compare(patient_dice: dict[str, dict[str, float]], pairs: Sequence[tuple[str, str]],
            seed_dice: dict[str, dict[str, dict[str, float]]] | None = None
            ) -> list[Comparison]:
    """Paired comparisons on the patients both losses have, Holm-adjusted over ``pairs``;
    ``seed_dice`` (loss -> seed -> patient -> Dice) adds the per-seed differences."""
    differences = []
    for loss, reference in pairs:
        shared = sorted(set(patient_dice[loss]) & set(patient_dice[reference]))
        differences.append(np.array([patient_dice[loss][p] - patient_dice[reference][p]
                                     for p in shared]))
    p_values = np.array([float(signed_rank_p(d)) if len(d) else math.nan for d in differences])
    adjusted = holm(p_values) if len(p_values) else p_values
    comparisons = []
    for (loss, reference), d, p, p_adj in zip(pairs, differences, p_values, adjusted):
        low, high = bootstrap_ci(d)
        comparisons.append(Comparison(
            loss=loss, baseline=reference, n_patients=len(d),
            mean_diff=float(d.mean()) if len(d) else math.nan, ci_low=low, ci_high=high,
            p_value=float(p), p_holm=float(p_adj), significant=bool(p_adj < ALPHA),
            rank_biserial=rank_biserial(d), cohens_dz=cohens_dz(d),
            seed_differences=(seed_differences(seed_dice[loss], seed_dice[reference])
                              if seed_dice else ())))
    return comparisons


# --- one split, start to end ------------------------------------------------------------

@dataclass
class Analysis:
    split: str
    baseline: str | None
    all_pairs: bool
    summaries: list[LossSummary]
    comparisons: list[Comparison]
    patient_dice: dict[str, dict[str, float]]
    n_patients: int
    folds: int
    seeds: int
    verdict: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> dict[str, tuple[str, ...]]:
        return {s.loss: s.flags for s in self.summaries if s.flags}


def analyse(rows: list[Row], losses: Sequence[str], baseline: str | None,
            all_pairs: bool = False, split: str = "val") -> Analysis:
    """Summaries, comparisons and verdict of ``rows`` (one split) for ``losses`` in order."""
    by_loss: dict[str, list[Row]] = {loss: [] for loss in losses}
    for row in rows:
        by_loss.setdefault(row["loss"], []).append(row)
    by_loss = {loss: r for loss, r in by_loss.items() if r}
    patient_dice = {loss: per_patient(r) for loss, r in by_loss.items()}
    ties = tie_flags(patient_dice)
    summaries = [summarize(loss, r, loss_flags(r) + ties.get(loss, []))
                 for loss, r in by_loss.items()]
    if baseline not in by_loss:
        baseline = None
    comparisons = compare(patient_dice, comparison_pairs(list(by_loss), baseline, all_pairs),
                          {loss: per_seed_patient(r) for loss, r in by_loss.items()})
    analysis = Analysis(
        split=split, baseline=baseline, all_pairs=all_pairs, summaries=summaries,
        comparisons=comparisons, patient_dice=patient_dice,
        n_patients=len({str(r["patient"]) for r in rows}),
        folds=len(_distinct(rows, "fold")), seeds=len(_distinct(rows, "seed")))
    analysis.verdict = verdict(analysis)
    return analysis


# --- verdict ----------------------------------------------------------------------------

def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _difference(c: Comparison) -> str:
    text = (f"ΔDice {_signed(c.mean_diff)} (95 % CI {_signed(c.ci_low)} to "
            f"{_signed(c.ci_high)}, Holm-adjusted p = {c.p_holm:.2g}, {c.n_patients} patients)")
    if len(c.seed_differences) > 1 and not c.holds_in_every_seed:
        text += (f", but not in every seed (per-seed ΔDice {_signed(min(c.seed_differences))} "
                 f"to {_signed(max(c.seed_differences))}: training randomness may account "
                 "for part of it)")
    return text


def _higher_first(c: Comparison) -> Comparison:
    """The comparison turned so that the loss that scores higher comes first."""
    if c.mean_diff >= 0:
        return c
    return replace(c, loss=c.baseline, baseline=c.loss, mean_diff=-c.mean_diff,
                   ci_low=-c.ci_high, ci_high=-c.ci_low,
                   rank_biserial=-c.rank_biserial, cohens_dz=-c.cohens_dz,
                   seed_differences=tuple(-d for d in c.seed_differences))


def _design(a: Analysis) -> str:
    folds = f"{a.folds} fold{'s' if a.folds != 1 else ''}" if a.folds else "folds not given"
    seeds = (f"{a.seeds} seeds" if a.seeds > 1 else
             "1 seed: run-to-run variation not measured" if a.seeds == 1 else
             "seeds not given")
    return f"{a.n_patients} {a.split} patients ({folds} × {seeds})"


def _best(a: Analysis, usable: list[str]) -> str:
    """The 'best' sentence: a loss is best only if its lead over every other loss was tested
    and survives the correction."""
    if len(usable) < 2:
        return ""
    means = {s.loss: s.dice_mean for s in a.summaries}
    leader = max(usable, key=lambda loss: means[loss])
    leads, missing = [], []
    for other in usable:
        if other == leader:
            continue
        found = [c for c in a.comparisons if {c.loss, c.baseline} == {leader, other}]
        if not found:
            missing.append(other)
        else:
            c = found[0]
            leads.append((other, c.significant and _higher_first(c).loss == leader, c.p_holm))
    if missing:
        return (f"No loss is called best: {leader} has the highest mean Dice, but its lead "
                "over every other loss was not tested (use --all-pairs).")
    if all(ok for _, ok, _ in leads):
        return (f"Best: {leader}, whose lead over every other loss survives the Holm "
                "correction.")
    weak = ", ".join(f"{other} (p_holm = {p:.2g})" for other, ok, p in leads if not ok)
    return (f"No loss is called best: {leader} has the highest mean Dice, but its lead over "
            f"{weak} is not significant after correction.")


def verdict(a: Analysis) -> list[str]:
    """Lines that state what the comparisons show. A report with flagged runs says so first
    and ranks nothing; 'no difference detected' is never read as 'the same'."""
    lines = []
    flagged = a.flagged
    if flagged:
        kinds: dict[str, list[str]] = {}
        for loss, flags in flagged.items():
            for flag in flags:  # "degenerate in 2 of 2 runs (...)", "tie: identical ..."
                kind = flag.split(" in ", 1)[0].split(":", 1)[0]
                kinds.setdefault(kind, []).append(loss)
        detail = "; ".join(f"{kind}: {', '.join(losses)}" for kind, losses in kinds.items())
        lines.append(f"Caution: {len(flagged)} of {len(a.summaries)} losses have runs that "
                     f"cannot support a conclusion ({detail}; the table's flags say which runs "
                     "and why). They are left out of the verdict, and no loss is called best.")
    if len(a.summaries) < 2:
        only = a.summaries[0].loss if a.summaries else "none"
        lines.append(f"Only one loss ({only}) on {_design(a)}: nothing to compare.")
        return lines
    usable = [s.loss for s in a.summaries if s.loss not in flagged]
    interpreted = [c for c in a.comparisons if c.loss in usable and c.baseline in usable]
    head = (f"On {_design(a)}, per-patient Dice, Wilcoxon signed-rank test with Holm "
            f"correction over {len(a.comparisons)} comparisons (α = {ALPHA}):")
    if a.baseline is not None and a.baseline in flagged:
        lines.append(f"{head} the baseline {a.baseline} is flagged, so no comparison with it "
                     "is interpreted.")
        return lines
    if a.baseline is not None:
        against = [c for c in interpreted if c.baseline == a.baseline]
        parts = [f"{c.loss} scores {'higher' if c.mean_diff > 0 else 'lower'} than "
                 f"{a.baseline}: {_difference(c)}" for c in against if c.significant]
        alike = [c.loss for c in against if not c.significant]
        if alike:
            parts.append(f"no difference from {a.baseline} detected for {', '.join(alike)} "
                         "at this sample size (not evidence that they perform alike)")
        lines.append(f"{head} {'; '.join(parts)}." if parts else
                     f"{head} no unflagged loss to compare with {a.baseline}.")
    others = [c for c in interpreted if c.baseline != a.baseline]
    if others:
        found = "; ".join(f"{h.loss} scores higher than {h.baseline}: {_difference(h)}"
                          for h in map(_higher_first, others) if h.significant)
        if a.baseline is not None:
            lines.append(f"Between the other losses: {found or 'no difference detected'}.")
        else:
            lines.append(f"{head} {found}." if found else
                         f"{head} no difference detected between any two losses at this "
                         "sample size (not evidence that they perform alike).")
    if not flagged:
        best = _best(a, usable)
        if best:
            lines.append(best)
    return lines
