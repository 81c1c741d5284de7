"""The study's statistics on per-patient results (no files): runs and patients both
replicates, Holm over the comparisons; docs/METHOD.md explains the method and its checks."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

SIGNIFICANCE = 0.05  # of each test; over the comparisons, Holm's family-wise error rate
CONFIDENCE = 0.95
POWER = 0.80  # what "would detect" means when the report says how many seeds a question needs
PLANNING_DIFFERENCE = 0.02  # the Dice difference the seeds-needed sentence is written for
MAX_SEEDS = 100
EVERYWHERE_FRACTION = 0.5  # of all voxels called gland: "everywhere" (the gland is a few %)
EVERYWHERE_RECALL = 0.99
EVERYWHERE_PRECISION = 0.1
TIE_MIN_PATIENTS = 2  # identical per-patient Dice on this many patients is no coincidence
MIXED_UNITS = "mm and px"  # a loss whose runs' datasets differ in known spacing: no HD95 median
DIFFERENCE_DECIMALS = 12  # differences rounded so float noise does not make a tie a difference
# Runs still learning when their budget ended: their selection Dice was still rising at the end,
# by more than this over a quarter of the epochs (late_gain), on average over the loss's runs and
# above 0 by a one-sided t-test over them (SIGNIFICANCE). Loss differences of interest are about
# 0.01; a loss still gaining that much would have moved with a longer budget.
LATE_GAIN = 0.01

Row = dict[str, Any]
Cells = dict[tuple[str, str, str], float]  # (fold, seed, patient) -> value


def nested_mean(values: np.ndarray, block: np.ndarray,
                present: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Mean over patients of ``values`` (..., runs, patients), patients in blocks (folds) each
    scored by its runs, ``present`` (..., runs, blocks) the runs that exist; the model, its
    variance and degrees of freedom are docs/METHOD.md's. Vectorised, so a simulation decides
    exactly as a report."""
    values = np.asarray(values, dtype=float)
    block = np.asarray(block, dtype=int)
    onehot = np.eye(int(block.max()) + 1)[block]  # (N, K)
    n = onehot.sum(0)
    if present is None:
        present = np.ones(values.shape[:-1] + (len(n),), dtype=bool)
    runs = present.astype(float)  # (..., S, K)
    cell = runs @ onehot.T  # (..., S, N): 1 where the patient's run exists
    y = np.where(cell > 0, values, 0.0)
    run_mean = (y @ onehot) / n  # (..., S, K)
    seeds = runs.sum(-2)  # (..., K): runs per block
    used = seeds > 0
    block_mean = (run_mean * runs).sum(-2) / np.maximum(seeds, 1)
    patient_mean = y.sum(-2) / np.maximum(seeds @ onehot.T, 1)  # (..., N)
    patients = (used * n).sum(-1)
    weight = used * n / patients[..., None]
    mean = (weight * block_mean).sum(-1)

    block_of_patient = block_mean @ onehot.T
    used_patient = used @ onehot.T
    df_runs = np.clip(seeds - 1, 0, None).sum(-1)
    runs_var = (((run_mean - block_mean[..., None, :]) ** 2) * runs).sum((-2, -1)) \
        / np.maximum(df_runs, 1)
    df_patients = (np.clip(n - 1, 0, None) * used).sum(-1)
    patients_var = (((patient_mean - block_of_patient) ** 2) * used_patient).sum(-1) \
        / np.maximum(df_patients, 1)
    residual = (y - run_mean @ onehot.T - patient_mean[..., None, :]
                + block_of_patient[..., None, :]) * cell
    df_residual = (np.clip(seeds - 1, 0, None) * np.clip(n - 1, 0, None)).sum(-1)
    residual_var = (residual ** 2).sum((-2, -1)) / np.maximum(df_residual, 1)
    # E[patients_var] = patient_var + residual_var * c: a patient's mean averages its runs
    c = (np.clip(n - 1, 0, None) * used / np.maximum(seeds, 1)).sum(-1) \
        / np.maximum(df_patients, 1)
    patient_var = np.maximum(0.0, patients_var - c * residual_var)
    inverse_n = (used / n).sum(-1) / np.maximum(used.sum(-1), 1)
    a = (weight ** 2 / np.maximum(seeds, 1)).sum(-1)

    # within blocks: runs_var estimates u-variance + residual/n per run
    var_within = a * runs_var + patient_var / patients
    terms = [(a * runs_var, df_runs), (patients_var / patients, df_patients),
             (c * residual_var / patients, df_residual)]
    truncated = patient_var <= 0
    denominator = terms[0][0] ** 2 / np.maximum(terms[0][1], 1) + np.where(
        truncated, 0.0, sum(x ** 2 / np.maximum(d, 1) for x, d in terms[1:]))
    df_within = np.where(denominator > 0, var_within ** 2 / np.where(denominator > 0,
                                                                     denominator, 1), df_runs)
    # between blocks: one run each, so the block means' spread is all there is
    blocks = used.sum(-1)
    spread = ((block_mean - mean[..., None]) ** 2 * used)
    var_between = (weight ** 2 * spread).sum(-1) * blocks / np.maximum(blocks - 1, 1)
    between_var = spread.sum(-1) / np.maximum(blocks - 1, 1)

    within = df_runs > 0
    var = np.where(within, var_within, var_between)
    df = np.where(within, df_within, blocks - 1.0)
    se = np.sqrt(var)
    # What all runs of a fold share (its training set's effect on the difference) is in neither
    # within-fold term: with several seeds the test is of this split's folds. Do the fold means
    # differ more than their runs and patients explain? Cochran's Q over the folds, as an F
    # test; and a t-test over the fold means alone (unweighted: exact for unequal folds too).
    run_part = np.maximum(0.0, runs_var - residual_var * inverse_n)[..., None]
    expected = (run_part + residual_var[..., None] / n) / np.maximum(seeds, 1) \
        + patient_var[..., None] / n
    inverse = np.where(used & (expected > 0), 1 / np.where(expected > 0, expected, 1), 0.0)
    pooled = (inverse * block_mean).sum(-1) / np.maximum(inverse.sum(-1), np.finfo(float).tiny)
    q = (inverse * (block_mean - pooled[..., None]) ** 2).sum(-1)
    exact = ~((expected > 0) & used).any(-1)  # no spread within folds: any between is real
    heterogeneity = within & (blocks > 1) & (exact | ((expected > 0) | ~used).all(-1))
    folds_mean = (block_mean * used).sum(-1) / np.maximum(blocks, 1)
    folds_var = ((block_mean - folds_mean[..., None]) ** 2 * used).sum(-1) \
        / np.maximum(blocks - 1, 1) / np.maximum(blocks, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2 * stats.t.sf(np.abs(mean / se), df)
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, df) * se
        heterogeneity_p = np.where(exact, (np.round(spread.sum(-1), DIFFERENCE_DECIMALS) == 0)
                                   * 1.0, stats.f.sf(q / np.maximum(blocks - 1, 1), blocks - 1,
                                                     df_within))
        p_folds = np.where(folds_var > 0, 2 * stats.t.sf(
            np.abs(folds_mean) / np.sqrt(folds_var), blocks - 1),
            np.round(folds_mean, DIFFERENCE_DECIMALS) == 0)
    p = np.where(se > 0, p, np.where(np.round(mean, DIFFERENCE_DECIMALS) == 0, 1.0, 0.0))
    testable = df >= 1
    run_var = np.where(within, run_part[..., 0],
                       np.maximum(0.0, between_var - patients_var * inverse_n))
    return {
        "mean": mean, "se": np.where(testable, se, np.nan), "df": df,
        "p": np.where(testable, p, np.nan),
        "low": np.where(testable, mean - half, np.nan),
        "high": np.where(testable, mean + half, np.nan),
        "run_var": np.where(within | (blocks > 1), run_var, np.nan),
        # with one run per block the patient term holds the residual too
        "patient_var": np.where(within, patient_var, patients_var),
        "residual_var": np.where(within, residual_var, np.nan),
        "within": within,
        "heterogeneity_p": np.where(heterogeneity, heterogeneity_p, np.nan),
        "p_folds": np.where(blocks > 1, p_folds, np.nan),
    }


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's adjusted p-values along the last axis (scipy adjusts only for the FDR); NaN ones
    are not counted and stay NaN."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, axis=-1)  # NaN sort last
    ranked = np.take_along_axis(p, order, axis=-1)
    m = np.sum(np.isfinite(p), axis=-1, keepdims=True)
    adjusted = np.fmax.accumulate(np.minimum(1.0, ranked * (m - np.arange(p.shape[-1]))),
                                  axis=-1)
    adjusted = np.where(np.isfinite(ranked), adjusted, np.nan)
    result = np.empty_like(adjusted)
    np.put_along_axis(result, order, adjusted, axis=-1)
    return result


@dataclass(frozen=True)
class Components:
    """Variances of one difference: run shift, patient, residual (NaN: one run per fold)."""

    run: float
    patient: float
    residual: float

    @property
    def lower_bound(self) -> bool:
        """Seeds planned from these are a lower bound: the residual is not separated."""
        return math.isnan(self.residual)


def design_power(c: Components, sizes: Sequence[int], seeds: int, difference: float,
                 comparisons: int) -> float:
    """Power for ``difference`` with ``seeds`` runs per fold at SIGNIFICANCE / comparisons
    (Holm's first step), two-sided."""
    n = np.asarray(sizes, dtype=float)
    weight = n / n.sum()
    # one run per fold cannot split the patient term from the residual: all of it is taken
    # as residual, which more seeds average away (an optimistic plan, hence "at least")
    patient, residual = (0.0, c.patient) if c.lower_bound else (c.patient, c.residual)
    var = float((weight ** 2 * (c.run + residual / n)).sum() / seeds + patient / n.sum())
    if seeds == 1:
        df = len(n) - 1.0
    else:
        runs_var = float((weight ** 2 / seeds).sum())
        parts = [(runs_var * (c.run + residual / n.mean()), len(n) * (seeds - 1)),
                 ((patient + residual / seeds) / n.sum(), n.sum() - len(n))]
        denominator = sum(x ** 2 / d for x, d in parts if d > 0)
        df = var ** 2 / denominator if denominator > 0 else math.inf
    if var <= 0:
        return 1.0  # no variation at all: any difference shows
    if df < 1:
        return math.nan
    critical = stats.t.ppf(1 - SIGNIFICANCE / comparisons / 2, df)
    shift = abs(difference) / math.sqrt(var)
    return float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))


def seeds_needed(c: Components, sizes: Sequence[int], difference: float,
                 comparisons: int) -> int | None:
    """The fewest seeds per fold reaching POWER; None when none up to MAX_SEEDS does."""
    for seeds in range(1, MAX_SEEDS + 1):
        if design_power(c, sizes, seeds, difference, comparisons) >= POWER:
            return seeds
    return None


def _present(row: Row, key: str) -> bool:
    value = row.get(key)
    return value not in (None, "") and not (isinstance(value, float) and math.isnan(value))


def cells(rows: Iterable[Row], metric: str = "dice") -> Cells:
    return {(str(r.get("fold", "")), str(r.get("seed", "")), str(r["patient"])): float(v)
            for r in rows if (v := r.get(metric)) is not None and v == v}


@dataclass(frozen=True)
class Grid:
    """Values (runs, patients), NaN where absent, ``block`` per patient, ``present`` (runs,
    blocks). Held-out test patients form one block whose runs are every fold and seed."""

    values: np.ndarray
    block: np.ndarray
    present: np.ndarray
    patients: tuple[str, ...]
    runs: int  # run cells that exist


def grid(table: Cells, *others: Cells) -> Grid | None:
    """``table`` on the runs and patients every one of ``others`` has too (a comparison's
    pairing); a patient is kept when every run of its fold scored it. None when nothing is left."""
    keys = set(table).intersection(*others) if others else set(table)
    folds_of: dict[str, set[str]] = defaultdict(set)
    for fold, _, patient in keys:
        folds_of[patient].add(fold)
    nested = all(len(f) == 1 for f in folds_of.values())
    run_of = (lambda key: key[1]) if nested else (lambda key: (key[0], key[1]))  # noqa: E731
    block_of = {p: next(iter(f)) if nested else "" for p, f in folds_of.items()}
    runs_of: dict[str, set] = defaultdict(set)
    for key in keys:
        runs_of[block_of[key[2]]].add(run_of(key))
    run_axis = sorted(set().union(*runs_of.values())) if runs_of else []
    blocks = sorted(runs_of)
    patients = sorted(block_of, key=lambda p: (block_of[p], p))
    row = {r: i for i, r in enumerate(run_axis)}
    column = {p: j for j, p in enumerate(patients)}
    values = np.full((len(run_axis), len(patients)), np.nan)
    order = list(keys)
    values[np.fromiter((row[run_of(k)] for k in order), int, len(order)),
           np.fromiter((column[k[2]] for k in order), int, len(order))] = \
        np.fromiter((table[k] for k in order), float, len(order))
    index = {b: k for k, b in enumerate(blocks)}
    block = np.fromiter((index[block_of[p]] for p in patients), int, len(patients))
    expected = np.zeros((len(run_axis), len(blocks)), dtype=bool)
    for k, b in enumerate(blocks):
        expected[[row[r] for r in runs_of[b]], k] = True
    kept = ~(expected[:, block] & np.isnan(values)).any(axis=0) if len(patients) else []
    if not np.any(kept):
        return None
    values, block = values[:, kept], block[kept]
    used = np.unique(block)
    block = np.searchsorted(used, block)
    present = expected[:, used]
    return Grid(values, block, present, tuple(np.array(patients)[kept]), int(present.sum()))


def estimate(g: Grid) -> dict[str, float]:
    return {k: float(v) for k, v in nested_mean(g.values, g.block, g.present).items()}


def run_shifts(g: Grid) -> dict[tuple[int, int], float]:
    """Each run's mean minus its fold's mean over runs (folds with two runs or more)."""
    out = {}
    for k in range(g.present.shape[1]):
        runs = np.flatnonzero(g.present[:, k])
        if len(runs) < 2:
            continue
        means = np.nanmean(g.values[np.ix_(runs, g.block == k)], axis=1)
        for s, m in zip(runs, means - means.mean()):
            out[(int(s), k)] = float(m)
    return out


def _nanmean(values: Iterable[float]) -> float:
    data = [v for v in values if v == v]  # NaN is not equal to itself
    return math.fsum(data) / len(data) if data else math.nan


def run_key(row: Row) -> str:
    """The run a row comes from: its ``run`` column, else its loss, fold and seed."""
    if _present(row, "run"):
        return str(row["run"])
    return f"{row['loss']} fold {row.get('fold', '')} seed {row.get('seed', '')}"


def per_patient(rows: Iterable[Row], metric: str = "dice") -> dict[str, float]:
    """Each patient's mean over its rows (its runs), NaN values left out."""
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        values[str(row["patient"])].append(row.get(metric, math.nan))
    return {patient: _nanmean(v) for patient, v in values.items()}


def alpha_of(rows: Iterable[Row]) -> float:
    """The rows' Tversky alpha when they carry one value, else NaN."""
    alphas = {float(r["alpha"]) for r in rows if _present(r, "alpha")}
    return alphas.pop() if len(alphas) == 1 else math.nan


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
    dice_ci_low: float  # from the nested model: runs and patients both sampled
    dice_ci_high: float
    dice_median: float
    run_sd: float  # a whole run's shift (training randomness); NaN when not measurable
    patient_sd: float
    precision_mean: float
    recall_mean: float
    hd95_median: float
    hd95_failed: int | None  # patient-runs whose HD95 was undefined; None: not in the table
    hd95_unit: str
    alpha: float = math.nan  # the Tversky alpha, when the rows carry one
    flags: tuple[str, ...] = ()


def summarize(loss: str, rows: list[Row], flags: Sequence[str] = ()) -> LossSummary:
    """Per-loss summary of this loss's rows of one split."""
    dice = per_patient(rows, "dice")
    g = grid(cells(rows))
    fit = estimate(g) if g is not None else {}
    units = _distinct(rows, "hd95_unit")
    # one median over millimetres and pixels means neither
    hd95 = ([v for v in per_patient(rows, "hd95").values() if not math.isnan(v)]
            if len(units) < 2 else [])
    return LossSummary(
        loss=loss, n_patients=len(dice), n_runs=len({run_key(r) for r in rows}),
        folds=len(_distinct(rows, "fold")), seeds=len(_distinct(rows, "seed")),
        dice_mean=float(np.mean(list(dice.values()))),
        dice_ci_low=fit.get("low", math.nan), dice_ci_high=fit.get("high", math.nan),
        dice_median=float(np.median(list(dice.values()))),
        run_sd=math.sqrt(fit["run_var"]) if fit and fit["within"] else math.nan,
        patient_sd=float(np.std(list(dice.values()), ddof=1)) if len(dice) > 1 else math.nan,
        precision_mean=_nanmean(per_patient(rows, "precision").values()),
        recall_mean=_nanmean(per_patient(rows, "recall").values()),
        hd95_median=float(np.median(hd95)) if hd95 else math.nan,
        hd95_failed=(int(sum(r.get("hd95_failed") == 1 for r in rows))
                     if any(_present(r, "hd95_failed") for r in rows) else None),
        hd95_unit=units[0] if len(units) == 1 else MIXED_UNITS if units else "",
        alpha=alpha_of(rows), flags=tuple(flags))


def _sum(rows: list[Row], key: str) -> float | None:
    if not all(_present(r, key) for r in rows):
        return None
    return float(sum(r[key] for r in rows))


def degenerate_reason(rows: list[Row]) -> str | None:
    """Why one run predicts nothing or gland everywhere, from voxel counts, else precision and
    recall, else (a table of Dice alone) a Dice of 0 on every patient; None when it does not."""
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
        dice = [v for r in rows if (v := r.get("dice", math.nan)) == v]  # NaN: not scored
        return "scores Dice 0 on every patient" if dice and not any(dice) else None
    if max(recall) == 0 and max(precision) == 0:
        return "finds no gland voxel in any patient"
    if np.mean(recall) >= EVERYWHERE_RECALL and np.mean(precision) <= EVERYWHERE_PRECISION:
        return (f"recall {np.mean(recall):.2f} with precision {np.mean(precision):.2f}: "
                "predicts gland nearly everywhere")
    return None


def mean_late_gain(runs: Iterable[list[Row]]) -> tuple[float, int, float] | None:
    """The loss's runs' mean late_gain (an early-stopped run had none left: 0), how many runs it
    averages, and the one-sided p of a t-test that it is above 0 (nan for one run or gains all
    alike); None when no run has one. One run's gain, four selection patients' Dice over a few
    epochs, is noisy (tests/test_statistics.py simulates it); the runs are the replicates that
    test it."""
    gains = [0.0 if r[0].get("stopped_early") is True else r[0]["late_gain"]
             for r in runs if r[0].get("stopped_early") is True or _present(r[0], "late_gain")]
    if not gains:
        return None
    p = (math.nan if len(set(gains)) < 2 else  # one run, or all alike: nothing to test with
         float(stats.ttest_1samp(gains, 0.0, alternative="greater").pvalue))
    return float(np.mean(gains)), len(gains), p


def loss_flags(rows: list[Row]) -> list[str]:
    """Flags of one loss: how many of its runs are degenerate; whether its runs had
    converged."""
    runs: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        runs[run_key(row)].append(row)
    degenerate = [reason for r in runs.values() if (reason := degenerate_reason(r))]
    late = mean_late_gain(runs.values())
    flags = []
    if degenerate:
        reasons = sorted(set(degenerate), key=degenerate.index)
        flags.append(f"degenerate in {len(degenerate)} of {len(runs)} runs "
                     f"({'; '.join(reasons)})")
    if late is not None and late[0] > LATE_GAIN and not late[2] >= SIGNIFICANCE:
        tested = (f"mean of {late[1]} runs, above 0 at p = {late[2]:.2g}; bound {LATE_GAIN}"
                  if not math.isnan(late[2]) else f"{late[1]} run{'s' * (late[1] > 1)}, "
                  f"nothing to test with: judged by the bound {LATE_GAIN} alone")
        flags.append(f"not converged: selection Dice still rising at the end, +{late[0]:.3f} "
                     f"over the last quarter of the epochs ({tested})")
    short = [r for r in runs.values() if isinstance(e := r[0].get("epochs_trained"), (int, float))
             and e < 2 and r[0].get("stopped_early") is not True]
    if short:
        flags.append(f"not converged: {len(short)} of {len(runs)} runs trained under two epochs, "
                     "so nothing shows they had stopped learning")
    return flags


def tie_flags(tables: Mapping[str, Cells]) -> dict[str, list[str]]:
    """Losses identical on every shared patient-run: the same predictions under two names."""
    ties: dict[str, list[str]] = defaultdict(list)
    for a, b in itertools.combinations(tables, 2):
        shared = set(tables[a]) & set(tables[b])
        if len({k[2] for k in shared}) >= TIE_MIN_PATIENTS and all(
                round(tables[a][k] - tables[b][k], DIFFERENCE_DECIMALS) == 0 for k in shared):
            ties[a].append(b)
            ties[b].append(a)
    return {loss: [f"tie: identical per-patient Dice to {', '.join(others)}"]
            for loss, others in ties.items()}


@dataclass(frozen=True)
class Comparison:
    loss: str
    baseline: str
    n_patients: int
    n_run_pairs: int
    mean_diff: float  # loss minus baseline: positive = the loss scores higher
    ci_low: float
    ci_high: float
    df: float
    p_value: float
    p_holm: float
    significant: bool
    cohens_dz: float  # mean over the SD of the per-patient differences
    runs_favouring: int  # run pairs whose mean difference has the sign of mean_diff
    patients_favouring: float  # share of patients whose difference has that sign
    run_sd: float  # a run pair's shift of the difference
    patient_sd: float
    residual_sd: float
    shift_correlation: float  # of the two losses' run shifts (common random numbers)
    # over the folds' mean differences alone (folds - 1 df), Holm over the same comparisons: a
    # difference that holds for other training sets, not only this split's (docs/METHOD.md)
    p_folds: float
    p_folds_holm: float
    heterogeneity_p: float  # folds differ beyond their runs and patients (Cochran's Q); Holm:
    heterogeneity_p_holm: float

    def higher_first(self) -> Comparison:
        """The same comparison with the loss that scores higher first."""
        if self.mean_diff >= 0:
            return self
        return replace(self, loss=self.baseline, baseline=self.loss, mean_diff=-self.mean_diff,
                       ci_low=-self.ci_high, ci_high=-self.ci_low, cohens_dz=-self.cohens_dz)


def comparison_pairs(losses: Sequence[str], baseline: str | None,
                     all_pairs: bool) -> list[tuple[str, str]]:
    """(loss, reference): each loss against the baseline, then (all pairs, or no baseline) every
    other pair, the later loss against the earlier."""
    pairs = [(loss, baseline) for loss in losses if baseline is not None and loss != baseline]
    if all_pairs or baseline is None:
        pairs += [(b, a) for i, a in enumerate(losses) for b in losses[i + 1:]
                  if baseline not in (a, b)]
    return pairs


def _correlation(a: dict, b: dict) -> float:
    shared = sorted(set(a) & set(b))
    if len(shared) < 3:
        return math.nan
    x, y = np.array([a[k] for k in shared]), np.array([b[k] for k in shared])
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def compare(tables: Mapping[str, Cells], pairs: Sequence[tuple[str, str]]) -> list[Comparison]:
    """Paired comparisons on the run pairs and patients both losses have, Holm over ``pairs``."""
    found = []
    for loss, reference in pairs:
        g = grid(tables[loss], tables[reference])
        if g is None:
            found.append(None)
            continue
        other = grid(tables[reference], tables[loss])
        diff = replace(g, values=g.values - other.values)
        fit = estimate(diff)
        per_patient_diff = np.nanmean(diff.values, axis=0)
        run_means = [np.nanmean(diff.values[s, diff.block == k])
                     for s, k in zip(*np.nonzero(diff.present))]
        sign = np.sign(fit["mean"]) or 1.0
        sd = per_patient_diff.std(ddof=1) if len(per_patient_diff) > 1 else math.nan
        found.append(dict(
            loss=loss, baseline=reference, n_patients=len(g.patients), n_run_pairs=g.runs,
            mean_diff=fit["mean"], ci_low=fit["low"], ci_high=fit["high"], df=fit["df"],
            p_value=fit["p"], cohens_dz=float(fit["mean"] / sd) if sd and sd > 0 else math.nan,
            runs_favouring=int(sum(np.sign(m) == sign for m in run_means)),
            patients_favouring=float(np.mean(np.sign(per_patient_diff) == sign)),
            run_sd=float(np.sqrt(fit["run_var"])), patient_sd=float(np.sqrt(fit["patient_var"])),
            residual_sd=float(np.sqrt(fit["residual_var"])),
            shift_correlation=_correlation(run_shifts(g), run_shifts(other)),
            p_folds=fit["p_folds"], heterogeneity_p=fit["heterogeneity_p"]))

    def adjusted(key: str) -> np.ndarray:
        p = np.array([f[key] if f else math.nan for f in found])
        return holm(p) if len(p) else p
    return [Comparison(**f, p_holm=float(q), significant=bool(q < SIGNIFICANCE),
                       p_folds_holm=float(q_folds), heterogeneity_p_holm=float(q_uneven))
            for f, q, q_folds, q_uneven in zip(found, adjusted("p_value"), adjusted("p_folds"),
                                               adjusted("heterogeneity_p"))
            if f is not None]


@dataclass(frozen=True)
class Design:
    patients: int
    folds: int
    seeds: int  # runs per fold (the most any fold has)
    within: bool  # training randomness measured by several runs per fold
    components: Components | None  # pooled over the comparisons
    comparisons: int
    shift_correlation: float
    power: float  # for PLANNING_DIFFERENCE at this design
    seeds_for_planning: int | None
    largest: Comparison | None
    seeds_for_largest: int | None


def design_of(comparisons: Sequence[Comparison], tables: Mapping[str, Cells]) -> Design | None:
    if not comparisons:
        return None
    g = grid(next(iter(tables.values())))
    within = g is not None and bool((g.present.sum(0) > 1).any())
    usable = [c for c in comparisons if np.isfinite(c.run_sd) or np.isfinite(c.patient_sd)]
    components = None
    if usable:
        def mean_var(key: str) -> float:
            found = [getattr(c, key) ** 2 for c in usable if np.isfinite(getattr(c, key))]
            return float(np.mean(found)) if found else math.nan

        components = Components(run=mean_var("run_sd"), patient=mean_var("patient_sd"),
                                residual=mean_var("residual_sd") if within else math.nan)
    sizes = tuple(int(n) for n in np.bincount(g.block)) if g is not None else ()
    seeds = int(g.present.sum(0).max()) if g is not None else 0
    m = len(comparisons)
    largest = max(comparisons, key=lambda c: abs(c.mean_diff))
    plan = lambda d: (seeds_needed(components, sizes, d, m)  # noqa: E731
                      if components and sizes else None)
    power = (design_power(components, sizes, max(seeds, 1), PLANNING_DIFFERENCE, m)
             if components and sizes else math.nan)
    return Design(
        patients=len(g.patients) if g else 0, folds=len(sizes), seeds=seeds, within=within,
        components=components, comparisons=m,
        shift_correlation=float(np.nanmean([c.shift_correlation for c in comparisons]))
        if any(np.isfinite(c.shift_correlation) for c in comparisons) else math.nan,
        power=power, seeds_for_planning=plan(PLANNING_DIFFERENCE), largest=largest,
        seeds_for_largest=plan(largest.mean_diff) if largest.mean_diff else None)


@dataclass
class Analysis:
    split: str
    baseline: str | None
    all_pairs: bool
    summaries: list[LossSummary]
    comparisons: list[Comparison]
    patient_dice: dict[str, dict[str, float]]
    design: Design | None
    n_patients: int
    folds: int
    seeds: int
    verdict: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> dict[str, tuple[str, ...]]:
        return {s.loss: s.flags for s in self.summaries if s.flags}

    def is_flagged(self, c: Comparison) -> bool:
        return c.loss in self.flagged or c.baseline in self.flagged


def analyse(rows: list[Row], losses: Sequence[str], baseline: str | None,
            all_pairs: bool = False, split: str = "val") -> Analysis:
    """Summaries, comparisons, design and verdict of ``rows`` (one split), losses in order."""
    by_loss: dict[str, list[Row]] = {loss: [] for loss in losses}
    for row in rows:
        by_loss.setdefault(row["loss"], []).append(row)
    by_loss = {loss: r for loss, r in by_loss.items() if r}
    tables = {loss: cells(r) for loss, r in by_loss.items()}
    ties = tie_flags(tables)
    summaries = [summarize(loss, r, loss_flags(r) + ties.get(loss, []))
                 for loss, r in by_loss.items()]
    if baseline not in by_loss:
        baseline = None
    comparisons = compare(tables, comparison_pairs(list(by_loss), baseline, all_pairs))
    analysis = Analysis(
        split=split, baseline=baseline, all_pairs=all_pairs, summaries=summaries,
        comparisons=comparisons, patient_dice={l: per_patient(r) for l, r in by_loss.items()},
        design=design_of(comparisons, tables),
        n_patients=len({str(r["patient"]) for r in rows}),
        folds=len(_distinct(rows, "fold")), seeds=len(_distinct(rows, "seed")))
    analysis.verdict = verdict(analysis)
    return analysis


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt(value: float | None, spec: str = ".4f") -> str:
    """A number for the report's text, "—" when it is missing."""
    return "—" if value is None or math.isnan(value) else format(value, spec)


def _difference(c: Comparison) -> str:
    return (f"ΔDice {fmt(c.mean_diff, '+.3f')} (95 % CI {fmt(c.ci_low, '+.3f')} to "
            f"{fmt(c.ci_high, '+.3f')}, Holm-adjusted p = {c.p_holm:.2g}; higher in "
            f"{c.runs_favouring} of {c.n_run_pairs} run pairs, {c.n_patients} patients)")


def _seeds(n: int | None, lower_bound: bool) -> str:
    """``needs 4 seeds per fold``, or why no number of seeds will do."""
    if n is None:
        return (f"is out of reach of any number of seeds up to {MAX_SEEDS} (the patients limit "
                "the precision: more patients are needed)")
    return f"needs {'at least ' if lower_bound else ''}{_count(n, 'seed')} per fold"


MEASURED = ("Training randomness is measured", "These runs detect", "The seeds are too few",
            "The design is too small")


def design_lines(a: Analysis) -> list[str]:
    """What the runs can and cannot tell, before any table."""
    d = a.design
    if d is None or d.components is None:
        return []
    c = d.components
    folds = _count(d.folds, "fold")
    plan = (f"Detecting a difference of {PLANNING_DIFFERENCE} with {POWER:.0%} power (Holm "
            f"over {_count(d.comparisons, 'comparison')}) "
            f"{_seeds(d.seeds_for_planning, c.lower_bound)}")
    if d.largest is not None and d.largest.mean_diff:
        plan += (f"; the largest observed difference ({fmt(d.largest.mean_diff, '+.3f')}, "
                 f"{d.largest.loss} vs {d.largest.baseline}) "
                 f"{_seeds(d.seeds_for_largest, c.lower_bound)}")
    if d.folds < 2 and not d.within:
        return ["Each loss has a single run here (one fold, one seed, or no fold and seed "
                "columns): training randomness cannot be measured, so no difference can be "
                "claimed. Give each row its fold and seed, and train several seeds per fold."]
    if not d.within:
        return [f"With one seed per fold, only the spread of the {folds}' mean differences "
                f"tells a lucky run from a better loss ({_count(d.folds - 1, 'degree')} of "
                f"freedom): the test is valid but weak. Estimated from them: a run "
                f"pair shifts a difference by SD "
                f"{math.sqrt(c.run):.3f}, patients by SD {math.sqrt(c.patient):.3f}. "
                f"{plan} (study.seeds=[0,1,2,...])."]
    lines = [f"Training randomness is measured by {d.seeds} seeds in each of {folds} "
             f"({d.patients} patients): a run pair shifts a difference by SD "
             f"{math.sqrt(c.run):.3f}, a patient by SD {math.sqrt(c.patient):.3f}, the residual "
             f"is SD {math.sqrt(c.residual):.3f}"
             + (f"; run shifts of two losses on the same fold and seed correlate r = "
                f"{d.shift_correlation:.2f}" if np.isfinite(d.shift_correlation) else "") + "."]
    if np.isnan(d.power):  # design_power's answer when under one degree of freedom is left
        lines.append(f"The design is too small to estimate the power to detect a difference of "
                     f"{PLANNING_DIFFERENCE}: it leaves under one degree of freedom. {plan}.")
    elif d.power >= POWER:
        lines.append(f"These runs detect a difference of {PLANNING_DIFFERENCE} with "
                     f"{d.power:.0%} power. {plan}.")
    else:
        lines.append(f"The seeds are too few to tell small differences: a difference of "
                     f"{PLANNING_DIFFERENCE} is detected with {d.power:.0%} power. {plan}.")
    return lines


def _design(a: Analysis) -> str:
    folds = _count(a.folds, "fold") if a.folds else "folds not given"
    seeds = _count(a.seeds, "seed") if a.seeds else "seeds not given"
    return f"{_count(a.n_patients, a.split + ' patient')} ({folds} × {seeds})"


def _best(a: Analysis, usable: list[str]) -> str:
    """'Best' only for a loss whose lead over every other was tested and survives; the
    highest mean is taken on the patients all losses share."""
    if len(usable) < 2:
        return ""
    if not any(np.isfinite(c.p_value) for c in a.comparisons):
        return "No loss is called best: no comparison could be tested."
    shared = set.intersection(*(set(a.patient_dice[loss]) for loss in usable))
    leader = max(usable, key=lambda loss: np.mean([a.patient_dice[loss][p] for p in shared]))
    leads = {other: next((c for c in a.comparisons if {c.loss, c.baseline} == {leader, other}),
                         None) for other in usable if other != leader}
    lost = {other: c for other, c in leads.items()
            if c is None or not (c.significant and c.higher_first().loss == leader)}
    if not lost:
        return f"Best: {leader}, whose lead over every other loss survives the Holm correction."
    missing = [other for other, c in lost.items() if c is None]
    untested = [other for other, c in lost.items() if c is not None and math.isnan(c.p_holm)]
    weak = [f"{other} (p_holm = {c.p_holm:.2g})" for other, c in lost.items()
            if c is not None and not math.isnan(c.p_holm)]
    why = ([f"{', '.join(weak)} is not significant after correction"] * bool(weak)
           + [f"{', '.join(untested)} was not tested (one run pair)"] * bool(untested)
           + [f"{', '.join(missing)} was not tested ("
              + ("use --all-pairs" if a.baseline is not None and not a.all_pairs
                 else "no patient pairs: see above") + ")"] * bool(missing))
    return (f"No loss is called best: {leader} has the highest mean Dice on the patients all "
            f"losses share, but its lead over {'; over '.join(why)}.")


def _unpaired(a: Analysis, usable: list[str]) -> list[tuple[str, str]]:
    """The planned comparisons between ``usable`` losses that compare() left out: nothing
    pairs."""
    tested = {(c.loss, c.baseline) for c in a.comparisons}
    return [pair for pair in comparison_pairs(usable, a.baseline, a.all_pairs)
            if pair not in tested]


# Why a planned comparison says nothing: nothing flagged it, but its losses' runs do not pair;
# or one run pair, whose difference is no evidence either way (not 'no difference detected'),
# as nothing measures how much a second training would move it.
UNPAIRED = ("could not be paired, as no patient was scored by runs of the same fold and seed "
            "under both (their runs come from different splits or seeds)")
UNTESTED = "not tested (one run pair: nothing measures training randomness)"


def _said_of(pairs: Iterable[tuple[str, str]], why: str) -> list[str]:
    """``a and b, c and d WHY`` for these pairs of losses, or nothing."""
    named = [f"{loss} and {other}" for loss, other in pairs]
    return [f"{', '.join(named)} {why}"] if named else []


def training_sets(a: Analysis, interpreted: Sequence[Comparison]) -> list[str]:
    """With several seeds per fold the claims are this split's: what each fold's runs share
    (its training set) is fixed. Whether each claim is also shown over the folds' means alone
    (a weak test: folds - 1 df); and, Holm over the comparisons, where the folds disagree
    beyond their runs and patients, which more seeds cannot average away."""
    if a.design is None or not a.design.within:
        return []
    if a.design.folds == 1 and any(c.significant for c in interpreted):
        return ["These claims are about networks trained on one training set (one fold): "
                "nothing here reaches other training sets; more folds would."]
    across = [c for c in interpreted if math.isfinite(c.p_folds_holm)]
    if not across:
        return []
    lines = []
    claimed = [c for c in across if c.significant]
    if claimed:
        held = [f"{c.loss} vs {c.baseline} "
                f"{'also holds' if c.p_folds_holm < SIGNIFICANCE else 'is not shown'} "
                f"(p_holm = {c.p_folds_holm:.2g})" for c in claimed]
        lines.append(f"These claims are about networks trained on this split's "
                     f"{_count(a.design.folds, 'training set')} (one per fold). Over the folds' "
                     f"mean differences alone, a weaker test that reaches other training sets "
                     f"({_count(a.design.folds - 1, 'degree')} of freedom, Holm): "
                     f"{'; '.join(held)}.")
    uneven = [f"{c.loss} vs {c.baseline} (heterogeneity p_holm = {c.heterogeneity_p_holm:.2g})"
              for c in across if c.heterogeneity_p_holm < SIGNIFICANCE]
    if uneven:
        lines.append(f"The folds disagree more than their runs and patients explain on "
                     f"{', '.join(uneven)}: the difference may depend on the training set, "
                     "which more seeds do not average away; more folds (data.folds), or the "
                     "sweep repeated with another data.split_seed, show how much.")
    return lines


def verdict(a: Analysis) -> list[str]:
    """Flagged runs first (nothing is ranked then), what the design can tell, the comparisons;
    'no difference detected' is never 'the same'."""
    lines = []
    flagged = a.flagged
    if flagged:
        kinds: dict[str, list[str]] = {}
        for loss, flags in flagged.items():
            for flag in flags:  # "degenerate in 2 of 2 runs (...)", "tie: identical ..."
                kinds.setdefault(flag.split(" in ", 1)[0].split(":", 1)[0], []).append(loss)
        detail = "; ".join(f"{kind}: {', '.join(losses)}" for kind, losses in kinds.items())
        lines.append(f"Caution: {len(flagged)} of {len(a.summaries)} losses "
                     f"{'has' if len(flagged) == 1 else 'have'} runs that "
                     f"cannot support a conclusion ({detail}; the table's flags say which runs "
                     "and why). They are left out of the verdict, and no loss is called best.")
    if len(a.summaries) < 2:
        only = a.summaries[0].loss if a.summaries else "none"
        lines.append(f"Only one loss ({only}) on {_design(a)}: nothing to compare.")
        return lines
    lines += design_lines(a)
    usable = [s.loss for s in a.summaries if s.loss not in flagged]
    interpreted = [c for c in a.comparisons if c.loss in usable and c.baseline in usable]
    head = (f"On {_design(a)}, paired per-patient Dice differences with trained runs as the "
            f"replicate, Holm over {_count(len(a.comparisons), 'comparison')} (family-wise "
            f"error rate {SIGNIFICANCE}):")
    if a.baseline is not None and a.baseline in flagged:
        lines.append(f"{head} the baseline {a.baseline} is flagged, so no comparison with it "
                     "is interpreted.")
        return lines
    unpaired = _unpaired(a, usable)
    if a.baseline is not None:
        against = [c for c in interpreted if c.baseline == a.baseline]
        parts = [f"{c.loss} scores {'higher' if c.mean_diff > 0 else 'lower'} than "
                 f"{a.baseline}: {_difference(c)}"
                 for c in against if c.significant]
        alike = [c.loss for c in against if not c.significant and math.isfinite(c.p_value)]
        if alike:
            parts.append(f"no difference from {a.baseline} detected for {', '.join(alike)} "
                         "(not evidence that they perform alike)")
        parts += _said_of([(c.loss, a.baseline) for c in against
                           if not math.isfinite(c.p_value)], UNTESTED)
        parts += _said_of([p for p in unpaired if p[1] == a.baseline], UNPAIRED)
        lines.append(f"{head} {'; '.join(parts)}." if parts else
                     f"{head} no unflagged loss to compare with {a.baseline}.")
    others = [c for c in interpreted if c.baseline != a.baseline]
    apart = _said_of([p for p in unpaired if p[1] != a.baseline], UNPAIRED)
    if others or apart:
        found = [f"{h.loss} scores higher than {h.baseline}: {_difference(h)}"
                 for h in map(Comparison.higher_first, others) if h.significant]
        if not found and any(math.isfinite(c.p_value) for c in others):
            found = ["no difference detected" + ("" if a.baseline is not None else
                     " between any two losses (not evidence that they perform alike)")]
        found += _said_of([(c.loss, c.baseline) for c in others
                           if not math.isfinite(c.p_value)], UNTESTED)
        found += apart
        lines.append(f"Between the other losses: {'; '.join(found)}." if a.baseline is not None
                     else f"{head} {'; '.join(found)}.")
    lines += training_sets(a, interpreted)
    if not flagged:
        best = _best(a, usable)
        if best:
            lines.append(best)
    return lines
