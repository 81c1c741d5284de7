"""The study's report: paired per-patient comparisons of losses, from a sweep or any table.

    python -m prostate_seg report SWEEP_DIR [--out DIR] [--baseline bce] [--all-pairs]
    python -m prostate_seg report --table FILE.csv --out DIR [--baseline ...] [--all-pairs]

A sweep's runs become one long table (per_patient.csv in --out, by default SWEEP_DIR/report/),
reported as a table is, plus what only run folders have (curves, contours, runs left out). See
docs/REPORT.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from prostate_seg.errors import ConfigError, DataError, UserError, error_line
from prostate_seg.files import (check_writable_folder, replacing, replacing_files, write_csv,
                                write_text)
from prostate_seg.study import figures
from prostate_seg.runs import (
    CODE_PREFIX,
    LAUNCHER_FILE,
    METRICS_FILE,
    PER_PATIENT_FILE,
    PREVIEW_FILE,
    RESULTS_FILE,
    STATUS_FILE,
    RunLock,
    group_across_code,
    load_json_object,
    mixed_code,
    read_history,
    run_late_gain,
)
from prostate_seg.study.statistics import (
    MEASURED,
    MIXED_UNITS,
    SIGNIFICANCE,
    Analysis,
    Comparison,
    Row,
    alpha_of,
    analyse,
    fmt,
)
from prostate_seg.jobs import DEFAULT_BASELINE

log = logging.getLogger(__name__)

REPORT_DIR = "report"
LONG_TABLE = "per_patient.csv"
PRIMARY_SPLIT = "val"

# The long table's columns and what their cells hold: text; whole (a text of a whole number,
# so an Excel "0.0" is fold 0); unit (in [0, 1]); gain (a Dice curve's fitted rise over up to
# a few epochs: in [-2, 2], 2 for a 2-epoch jump from 0 to 1); count
# (whole, >= 0); distance (>= 0); flag (true or false).
COLUMNS = {"loss": "text", "alpha": "unit", "beta": "unit", "fold": "whole", "seed": "whole",
           "patient": "text", "split": "text", "dice": "unit", "precision": "unit",
           "recall": "unit", "hd95": "distance", "hd95_failed": "count", "hd95_unit": "text",
           "voxels_pred": "count", "voxels_true": "count", "voxels_total": "count",
           "best_epoch": "count", "epochs_trained": "count", "max_epochs": "count",
           "stopped_early": "flag", "late_gain": "gain", "identity": "text", "group": "text",
           "run": "text"}
LONG_COLUMNS = tuple(COLUMNS)
REQUIRED = ("loss", "patient", "dice")
KEY = ("loss", "fold", "seed", "patient", "split")  # one row per patient of one run
# A configuration's settings: one value per loss, or two configurations would be pooled as
# seeds of one
PER_LOSS = ("alpha", "beta", "max_epochs")
# Filled on every row or on none: an empty cell among filled ones would make its row a run of its
# own (fold, seed) or drop it from a score's mean or median unseen
EVERY_ROW = ("fold", "seed", "precision", "recall", "hd95")
RUN_COLUMNS = ("best_epoch", "epochs_trained", "max_epochs", "stopped_early", "late_gain",
               "identity", "group")
FIGURE_FILES = ("forest.png", "paired.png", "scores.png", "contours.png", "loss_curves.png",
                "alpha_search.png")
# What the report writes in its folder, or removes there (a figure not drawn this time)
REPORT_FILES = ("results.csv", "comparisons.csv", "results.md", *FIGURE_FILES)


def _whole(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value.is_integer() and value >= 0


def _cell(raw: dict[str, Any], column: str, where: str) -> Any:
    text = (raw.get(column) or "").strip()
    kind = COLUMNS[column]
    if not text:
        if column in REQUIRED:
            raise DataError(f"{where}: {column} is empty")
        empty = {"text": PRIMARY_SPLIT if column == "split" else "", "whole": "", "flag": None}
        return empty.get(kind, math.nan)
    if kind == "text":
        return text
    if kind == "flag":
        if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
            raise DataError(f"{where}: {column}={text!r} is not true or false")
        return text.lower() in ("true", "1", "yes")
    try:
        value: float | None = float(text)
    except ValueError:
        value = None
    if value is not None and math.isnan(value):
        value = None  # "nan" is no number: an unknown value is an empty cell
    if kind == "whole":
        if not _whole(value):
            raise DataError(f"{where}: {column}={text!r} is not a whole number >= 0")
        return str(int(value))
    if value is None:
        raise DataError(f"{where}: {column}={text!r} is not a number")
    if column in REQUIRED and not math.isfinite(value):
        raise DataError(f"{where}: {column}={text!r} is not a finite number")
    if kind == "unit" and not 0.0 <= value <= 1.0:
        raise DataError(f"{where}: {column}={text} is outside [0, 1]")
    if kind == "gain" and not -2.0 <= value <= 2.0:
        raise DataError(f"{where}: {column}={text} is outside [-2, 2]")
    if kind == "count" and not _whole(value):
        raise DataError(f"{where}: {column}={text} is not a whole number >= 0")
    if column == "hd95_failed" and value not in (0, 1):
        raise DataError(f"{where}: hd95_failed={text} is not 0 or 1")
    if kind == "distance" and value < 0:
        raise DataError(f"{where}: {column}={text} is negative (a distance)")
    return value


def read_long_table(path: Path, required: Sequence[str] = REQUIRED) -> list[Row]:
    """Rows of a per-patient CSV, typed and checked whole; one DataError naming file, line and
    problem."""
    if not path.is_file():
        raise DataError(f"{path}: table not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's BOM is no column
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if not header:
                raise DataError(f"{path}: empty; expected a header with the columns "
                                f"{', '.join(required)}")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(missing)} (it has: {', '.join(header)})")
            known = [c for c in LONG_COLUMNS if c in header]
            shared: dict[str, str] = {}  # one object per distinct text: a long table repeats them
            rows = []
            for raw in reader:
                where = f"{path} line {reader.line_num}"
                if None in raw:
                    raise DataError(f"{where}: more fields than the header has")
                if None in raw.values():  # a short row's missing fields: not empty cells
                    given = sum(value is not None for value in raw.values())
                    raise DataError(f"{where}: fewer fields than the header has ({given} of "
                                    f"{len(header)})")
                row = {"split": PRIMARY_SPLIT} | {c: _cell(raw, c, where) for c in known}
                for column, value in row.items():
                    if isinstance(value, str) and column != "patient":
                        row[column] = shared.setdefault(value, value)
                if row.get("hd95") == math.inf and row.get("hd95_failed") != 1:
                    raise DataError(f"{where}: hd95=inf without hd95_failed=1 (an undefined "
                                    "HD95 is flagged as failed)")
                rows.append(row | {"line": reader.line_num})
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text (CSV) file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not rows:
        raise DataError(f"{path}: no rows below the header")
    check_filled(rows, str(path))
    check_unique(rows, str(path))
    check_per_loss(rows, str(path))
    return rows


def _empty(value: Any) -> bool:
    return value == "" or value != value  # an empty text, or NaN


def check_filled(rows: list[Row], source: str) -> None:
    """Each EVERY_ROW column of the table filled on every row or on none."""
    for column in EVERY_ROW:
        empty = [row["line"] for row in rows if column in row and _empty(row[column])]
        if empty and len(empty) < len(rows):
            raise DataError(f"{source} line {empty[0]}: {column} is empty, but other rows "
                            "have one; fill it, or leave the column out")


def check_per_loss(rows: list[Row], source: str) -> None:
    """Each PER_LOSS column holds one value per loss (empty cells say nothing); a run's own
    table, without a loss column, is one loss."""
    first: dict[tuple[str, str], tuple[Any, int]] = {}
    for row in rows:
        for column in PER_LOSS:
            value = row.get(column, "")
            if _empty(value):
                continue
            loss = row.get("loss", "")
            seen, line = first.setdefault((loss, column), (value, row["line"]))
            if seen != value:
                raise DataError(f"{source}: loss {loss} has {column} {_csv_value(seen)} "
                                f"on line {line} and {_csv_value(value)} on line {row['line']}; "
                                "give each configuration its own loss name")


def check_unique(rows: list[Row], source: str) -> None:
    """One row per KEY (a second would count twice), and a val patient in one fold per loss
    and seed (a second fold is a mislabelled row that would be averaged into it)."""
    seen: dict[tuple, int] = {}
    fold_of: dict[tuple, tuple[str, int]] = {}
    for row in rows:
        key = tuple(row.get(k, "") for k in KEY)
        described = ", ".join(f"{k}={row[k]}" for k in KEY if k in row)
        if key in seen:
            raise DataError(f"{source} line {row['line']}: duplicate of line {seen[key]} "
                            f"({described})")
        seen[key] = row["line"]
        if row.get("split") != PRIMARY_SPLIT:
            continue  # held-out test patients are scored by every fold's model
        who = (row.get("loss", ""), row.get("seed", ""), row["patient"])
        fold, line = fold_of.setdefault(who, (row.get("fold", ""), row["line"]))
        if fold != row.get("fold", ""):
            raise DataError(f"{source} line {row['line']}: patient {row['patient']} of "
                            f"{row.get('loss', '')} seed {row.get('seed', '')} is in fold "
                            f"{row.get('fold', '')} here and in fold {fold} on line {line}; "
                            "a validation patient belongs to one fold")


@dataclass
class Run:
    folder: Path
    name: str  # the folder relative to the sweep
    state: str  # completed | failed | interrupted | running | unfinished | broken | duplicate
    reason: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    columns: dict[str, Any] = field(default_factory=dict)  # RUN_COLUMNS, typed
    label: str = ""  # the loss as the report names it (see label_groups)
    across_code: bool = False  # pooled with runs of the same settings made by other code

    @property
    def loss(self) -> str:
        return str(self.results.get("loss", ""))

    @property
    def fold(self) -> str:
        return _text(self.results.get("fold"))

    @property
    def seed(self) -> str:
        return _text(self.results.get("seed"))

    @property
    def listed(self) -> str:
        return f"- `{self.name}`: {self.state} — {self.reason}"

    @property
    def group(self) -> str:
        if self.across_code:
            return group_across_code(self.identity) or f"loss {self.loss}"
        return str(self.results.get("group") or self.identity.get("group") or
                   f"loss {self.loss}")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _unfinished_reason(folder: Path, status: dict[str, Any] | None,
                       launcher: dict[str, Any] | None) -> tuple[str, str]:
    state = (status or {}).get("status")
    launched = (launcher or {}).get("status")
    error = str((status or {}).get("error") or (launcher or {}).get("error") or "").strip()
    if state == "failed" or launched == "failed":
        return "failed", (error.splitlines()[-1:] or ["no error recorded"])[0]
    if state == "interrupted" or launched == "interrupted":
        return "interrupted", (error.splitlines() or ["interrupted"])[0]
    if state == "running":
        holder = RunLock(folder).held_by_another()
        if holder:
            return "running", f"still running ({holder})"
        return "failed", ("status.json says running but no process works in the folder: killed "
                          "(e.g. SIGKILL, out of memory) before it could record why")
    if state == "completed":
        return "broken", "status.json says completed but results.json is missing"
    if status is None:
        return "unfinished", "no status.json: the job never started training"
    return "unfinished", f"status {state!r}"


def read_run(folder: Path, sweep_dir: Path) -> Run:
    """One run folder, classified; per-patient rows read only for completed runs, checked as
    table mode checks them, so one bad run cannot stop the report."""
    name = "." if folder == sweep_dir else str(folder.relative_to(sweep_dir))
    run = Run(folder=folder, name=name, state="broken")
    status, status_error = load_json_object(folder / STATUS_FILE)
    results, results_error = load_json_object(folder / RESULTS_FILE)
    run.results = results or {}
    identity = (status or {}).get("identity")
    run.identity = identity if isinstance(identity, dict) else {}
    table = folder / PER_PATIENT_FILE
    if status_error or results_error:
        run.reason = status_error or results_error
    elif (status or {}).get("status") != "completed" or results is None:
        launcher, _ = load_json_object(folder / LAUNCHER_FILE)
        run.state, run.reason = _unfinished_reason(folder, status, launcher)
    elif not run.loss:
        run.reason = "results.json names no loss"
    elif why := _not_a_replicate(folder, status or {}, run.identity):
        run.state, run.reason = "left out", why
    elif not table.is_file():
        run.reason = (f"completed, but has no {PER_PATIENT_FILE}: "
                      + run.results.get("not_evaluated", "trained by a version that did not "
                                        "write it?"))
    else:
        try:
            rows = read_long_table(table, required=("patient", "dice"))
            check_patients(rows, run.results.get("patients"), table)
            values = {**run.results, "late_gain": _late_gain(folder, run.results)}
            run.columns = {k: _cell({k: str(_csv_value(values.get(k)))}, k, RESULTS_FILE)
                           for k in RUN_COLUMNS}
            run.state, run.rows = "completed", rows
        except DataError as exc:
            run.reason = str(exc).replace(str(folder) + "/", "")
    return run


def _not_a_replicate(folder: Path, status: dict[str, Any],
                     identity: dict[str, Any]) -> str | None:
    """Why a completed run is no replicate of its configuration's training: it started from
    another run's weights (ckpt_path), or it is debug=overfit's, which trains a few batches over
    and over (a check of the pipeline); None for a run of the study."""
    # before started_from was kept (2026-12-07), the start's checkpoint is in resumed_from
    started = status.get("started_from") or status.get("resumed_from")
    if started and not Path(started).resolve().is_relative_to(folder.resolve()):
        return (f"started from {started} (ckpt_path), not from scratch: no replicate of its "
                "configuration's runs (report such runs with --table)")
    overfit = (identity.get("config") or {}).get("trainer.overfit_batches")
    if overfit not in (None, 0, 0.0):
        return f"a debug run (trainer.overfit_batches={overfit}), never a study's"
    return None


def _late_gain(folder: Path, results: dict[str, Any]) -> Any:
    """Read off the run's selection curve, so a run trained under an older convergence rule is
    judged by today's; results.json's value where the curve is missing or unreadable."""
    try:
        gain = run_late_gain(folder)
    except (OSError, ValueError, csv.Error):
        gain = None
    return results.get("late_gain") if gain is None else gain


def check_patients(rows: list[Row], listed: Any, table: Path) -> None:
    """The rows are the fold's patients that results.json lists, each split whole: a table cut
    short, or another fold's table copied in, would shift the run's mean unnoticed."""
    if listed is None:
        return  # trained by a version that did not list them
    if not isinstance(listed, dict) or not all(
            isinstance(ids, list) and all(isinstance(p, str) for p in ids)
            for ids in listed.values()):
        raise DataError(f"{RESULTS_FILE}: patients must map each split to a list of names")
    wanted = {(split, p) for split, ids in listed.items() for p in ids}
    found = {(r["split"], r["patient"]) for r in rows}
    for rule, pairs in (("missing", wanted - found), ("not of this fold", found - wanted)):
        if pairs:
            split = min(split for split, _ in pairs)
            mine = sorted(p for s, p in pairs if s == split)
            raise DataError(f"{table}: {len(mine)} {split} patient(s) {rule} (e.g. {mine[0]}), "
                            f"against the list in {RESULTS_FILE}")


def find_run_folders(sweep_dir: Path) -> list[Path]:
    """Every job of the sweep, whatever its fate: folders with a status, results or launcher
    file, or Hydra's .hydra/ (a job that started but wrote nothing else)."""
    report = sweep_dir / REPORT_DIR
    found = {p.parent for name in (STATUS_FILE, RESULTS_FILE, LAUNCHER_FILE)
             for p in sweep_dir.rglob(name)}
    found |= {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    return sorted(f for f in found if report not in (f, *f.parents))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def label_groups(runs: list[Run]) -> None:
    """Name each group of runs by its loss; groups sharing a loss add the settings that tell
    them apart (``bce (optimizer.lr=0.001)``), or the group hash."""
    groups: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.loss][run.group].append(run)
    for loss, by_group in groups.items():
        constant = {}  # group -> {key: value} for keys with one value in the whole group
        for group, members in by_group.items():
            configs = [m.identity.get("config") or {} for m in members]
            same = set.intersection(*({(k, _json(v)) for k, v in c.items()} for c in configs))
            constant[group] = {k: configs[0][k] for k, _ in same}
        shared_keys = set.intersection(*(set(c) for c in constant.values()))
        differing = sorted(k for k in shared_keys if not k.startswith(CODE_PREFIX)
                           and len({_json(c[k]) for c in constant.values()}) > 1)
        labels = {g: f"{loss} ({', '.join(f'{k}={constant[g][k]}' for k in differing[:3])})"
                  for g in by_group}
        if len(by_group) == 1:
            labels = dict.fromkeys(by_group, loss)
        elif not differing or len(set(labels.values())) < len(labels):  # not told apart
            labels = {g: f"{loss} (group {g[:8]})" for g in by_group}
        for group, members in by_group.items():
            for run in members:
                run.label = labels[group]


def _number_or_nan(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else math.nan


def long_rows(run: Run) -> list[Row]:
    """The run's per-patient rows as long-table rows: its label, fold, seed and run columns."""
    fixed = {"loss": run.label, "alpha": _number_or_nan(run.results.get("alpha")),
             "beta": _number_or_nan(run.results.get("beta")), "fold": run.fold,
             "seed": run.seed, "run": run.name, **run.columns}
    return [{**row, **fixed} for row in run.rows]


def collect_runs(sweep_dir: Path, allow_mixed_code: bool = False) -> list[Run]:
    """Every run folder, classified and labelled; a second completed run of one group, fold
    and seed is a duplicate; runs of different code are refused unless pooled on request."""
    runs = [read_run(folder, sweep_dir) for folder in find_run_folders(sweep_dir)]
    completed = [r for r in runs if r.state == "completed"]
    mixed = mixed_code(r.identity for r in completed)
    if mixed and not allow_mixed_code:
        raise DataError(f"{sweep_dir}: {mixed}; comparing them would compare code as well as "
                        "losses: train them with one version, or pass --allow-mixed-code")
    for run in completed:
        run.across_code = allow_mixed_code
    label_groups(completed)
    first: dict[tuple, Run] = {}
    for run in completed:
        original = first.setdefault((run.label, run.fold, run.seed), run)
        if original is not run:
            run.state = "duplicate"
            run.reason = (f"same configuration, fold and seed as {original.name}; only that "
                          "one is counted")
    return runs


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    if isinstance(value, float) and value.is_integer():
        return int(value)  # counts and epochs read back as floats: 3, not 3.0
    return value


def write_long_table(path: Path, rows: Iterable[Row]) -> None:
    write_csv(path, ({k: _csv_value(r.get(k)) for k in LONG_COLUMNS} for r in rows),
              list(LONG_COLUMNS))


def loss_order(name: str, alpha: float = math.nan) -> tuple[int, float, str]:
    """bce first, then the losses with an alpha by alpha, then the rest by name."""
    if name == DEFAULT_BASELINE or name.startswith(DEFAULT_BASELINE + " "):
        return (0, 0.0, name)
    return (1, alpha, name) if np.isfinite(alpha) else (2, 0.0, name)


def alphas_of(rows: Iterable[Row]) -> dict[str, float]:
    by_loss: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_loss[row["loss"]].append(row)
    return {loss: alpha_of(r) for loss, r in by_loss.items()}


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def summary_table(a: Analysis) -> list[str]:
    units = {s.hd95_unit for s in a.summaries if s.hd95_unit}
    hd_title = f"HD95 median ({next(iter(units))})" if len(units) == 1 else "HD95 median"
    own_unit = len(units) > 1  # losses on datasets of different units: each cell says its own
    header = ["Loss", "α", "Patients", "Runs", "Dice mean [95 % CI]", "Median", "Run SD",
              "Precision", "Recall", hd_title, "HD95 failed", "Flags"]
    return _markdown_table(header, ([
        s.loss, fmt(s.alpha, ".2f"), str(s.n_patients), str(s.n_runs),
        f"{fmt(s.dice_mean)} [{fmt(s.dice_ci_low, '.3f')}, {fmt(s.dice_ci_high, '.3f')}]",
        fmt(s.dice_median), fmt(s.run_sd, ".3f"), fmt(s.precision_mean),
        fmt(s.recall_mean),
        (f"— ({MIXED_UNITS})" if s.hd95_unit == MIXED_UNITS else fmt(s.hd95_median, ".2f")
         + (f" {s.hd95_unit}" if own_unit and s.hd95_unit else "")),
        fmt(s.hd95_failed, "d"),
        "; ".join(s.flags) or "—"] for s in a.summaries))


def comparison_table(a: Analysis) -> list[str]:
    header = ["Loss", "vs", "Patients", "Run pairs", "ΔDice [95 % CI]", "df", "p", "p (Holm)",
              "Significant", "Fold means: p (Holm)", "Folds disagree: p (Holm)", "d_z",
              "Favouring: run pairs, patients", "SD: run pair, patient"]
    return _markdown_table(header, ([
        c.loss, c.baseline, str(c.n_patients), str(c.n_run_pairs),
        f"{fmt(c.mean_diff, '+.4f')} [{fmt(c.ci_low, '+.3f')}, {fmt(c.ci_high, '+.3f')}]",
        fmt(c.df, ".1f"), fmt(c.p_value, ".2g"), fmt(c.p_holm, ".2g"),
        ("yes" if c.significant else "no")
        + (" (flagged: not interpreted)" if a.is_flagged(c) else ""),
        fmt(c.p_folds_holm, ".2g"), fmt(c.heterogeneity_p_holm, ".2g"), fmt(c.cohens_dz, ".2f"),
        f"{c.higher_first().loss}: {c.runs_favouring}/{c.n_run_pairs}, "
        f"{c.patients_favouring:.0%}",
        f"{fmt(c.run_sd, '.3f')}, {fmt(c.patient_sd, '.3f')}"] for c in a.comparisons))


def summary_rows(a: Analysis) -> list[dict[str, Any]]:
    return [asdict(s) | {"split": a.split, "flags": "; ".join(s.flags)} for s in a.summaries]


COMPARISON_COLUMNS = [f.name for f in fields(Comparison)] + ["flagged", "split"]


def comparison_rows(a: Analysis) -> list[dict[str, Any]]:
    return [asdict(c) | {"flagged": a.is_flagged(c), "split": a.split} for c in a.comparisons]


METHOD_PAGE = Path(__file__).resolve().parents[2] / "docs" / "METHOD.md"
METHODS = f"""## How these numbers are made

Per-patient Dice at the scan's original size; means and paired differences with 95 % CIs from
a mixed model with trained runs and patients as replicates, for this split's training sets
(over the folds' means alone: other training sets too); Holm over the comparisons at a
family-wise error rate of {SIGNIFICANCE}. The method, its assumptions and its calibration:
docs/METHOD.md of prostate-seg
({METHOD_PAGE if METHOD_PAGE.is_file() else "in the project's repository"}).
"""
FIXED = ("This report chooses nothing after seeing results: the baseline, the primary measure "
         "(per-patient Dice on the {split} split), the test and the correction are fixed in "
         "advance.\n")

SWEEP_PROTOCOL = """\
## Protocol: what chose what, on which patients

- Patients are split into folds (split.json, shared by every run). Each run trains on the
  other folds' patients except a few **selection** patients, on which it chooses its epoch
  (early stopping) and checkpoint (best per-volume Dice). Its own fold's **val** patients
  chose nothing: each is scored once, at its original size, by the model that never saw it.
  Held-out **test** patients, when there are any, chose nothing either and are scored by
  every fold's model.
- """ + FIXED.format(split=PRIMARY_SPLIT)

TABLE_PROTOCOL = """\
## Protocol

The table's provenance is not known to this report: if the checkpoints (or any setting) were
chosen on the patients scored here, every loss's score is optimistic.
""" + FIXED


@dataclass
class SweepExtras:
    """What only a sweep gives the report: runs (curves, previews, those not counted)."""
    sweep_dir: Path
    runs: list[Run]
    notes: list[str] = field(default_factory=list)  # problems met while drawing figures
    caution: list[str] = field(default_factory=list)  # said before the verdict

    def not_counted(self) -> list[Run]:
        return [r for r in self.runs if r.state != "completed"]


NO_BASELINE = (f"No {DEFAULT_BASELINE} baseline here, so every pair of losses is compared "
               "({pairs} comparisons share the Holm correction, which costs power). To compare "
               f"each loss with the baseline, sweep it too: python train.py -m "
               f"loss={DEFAULT_BASELINE},tversky loss.alpha=..., or name another with --baseline.")


def _resolve_baseline(baseline: str | None, losses: Sequence[str], source: str) -> str | None:
    if baseline is None:
        return DEFAULT_BASELINE if DEFAULT_BASELINE in losses else None
    if baseline not in losses:
        raise DataError(f"--baseline {baseline}: no such loss in {source} "
                        f"(losses: {', '.join(losses)})")
    return baseline


def check_not_input(table: Path, out: Path) -> None:
    """No file the report writes or removes in ``out`` is the table it reads (real locations:
    symlinks resolved): the report would replace its own input."""
    real = table.resolve()
    for name in REPORT_FILES:
        if (out / name).resolve() == real:
            raise ConfigError(f"--out {out}: the report's {name} would replace the input table "
                              f"{table}; choose another folder")


def _plan(rows: list[Row], baseline: str | None, split: str,
          source: str) -> tuple[list[str], dict[str, float], list[str], str | None]:
    """The splits (``split`` first), the losses' alphas, the losses in report order and the
    baseline; an option the rows cannot meet is refused, naming ``source``."""
    splits = sorted({r["split"] for r in rows}, key=lambda s: (s != split, s))
    if splits[0] != split:
        raise DataError(f"{source}: no rows with split={split} (splits: {', '.join(splits)})")
    alphas = alphas_of(rows)
    losses = sorted(alphas, key=lambda loss: loss_order(loss, alphas[loss]))
    return splits, alphas, losses, _resolve_baseline(baseline, losses, source)


def report_table(table: Path, out: Path, baseline: str | None = None, all_pairs: bool = False,
                 split: str = PRIMARY_SPLIT) -> list[str]:
    """Statistics, tables and figures of a long table into ``out``, all or none of them (a
    refused or failed report leaves the previous one); returns the verdict.

    ``baseline`` None means bce when the table has it, else every pair is compared."""
    check_not_input(table, out)
    check_writable_folder(out)  # a file in the way or a folder not writable: before the work
    rows = read_long_table(table)
    plan = _plan(rows, baseline, split, str(table))
    with replacing_files(out, REPORT_FILES) as staging:
        return _write_tables(table, rows, plan, staging, all_pairs, split)


def _write_tables(table: Path, rows: list[Row], plan: tuple, out: Path, all_pairs: bool,
                  split: str, sweep: SweepExtras | None = None) -> list[str]:
    """The report's files of ``rows`` (read from ``table``, planned by _plan) into ``out``."""
    splits, alphas, losses, baseline = plan
    analyses = [analyse([r for r in rows if r["split"] == s], losses, baseline, all_pairs, s)
                for s in splits]
    if baseline is None and len(losses) > 2:
        analyses[0].verdict.insert(0, NO_BASELINE.format(pairs=len(analyses[0].comparisons)))
    colours = figures.loss_colours(losses, alphas)
    written = _figures(analyses[0], [r for r in rows if r["split"] == split], colours, out,
                       sweep)
    write_csv(out / "results.csv", [r for a in analyses for r in summary_rows(a)],
              list(summary_rows(analyses[0])[0]))
    write_csv(out / "comparisons.csv",
              [{k: _csv_value(v) for k, v in r.items()} for a in analyses
               for r in comparison_rows(a)], COMPARISON_COLUMNS)
    write_text(out / "results.md", _markdown(analyses, table, written, sweep))
    return analyses[0].verdict


def _figures(a: Analysis, rows: list[Row], colours: dict[str, Any], out: Path,
             sweep: SweepExtras | None) -> list[str]:
    drawn = {"scores.png": figures.scores(rows, a, colours)}
    if len(a.summaries) > 1:
        drawn["paired.png"] = figures.paired(a, colours)
    if a.comparisons:
        drawn["forest.png"] = figures.forest(a)
    if sum(np.isfinite(s.alpha) for s in a.summaries) > 1:
        drawn["alpha_search.png"] = figures.alpha_curve(a, colours)
    if sweep is not None:
        counted = [r for r in sweep.runs if r.state == "completed"]
        columns = _contour_columns(counted, list(colours), sweep)
        if columns:
            drawn["contours.png"] = figures.contours(columns)
        curves = _curves(counted, list(colours), sweep)
        if curves:
            drawn["loss_curves.png"] = figures.loss_curves(curves, colours)
    for name, figure in drawn.items():
        with replacing(out / name) as tmp:
            figure.savefig(tmp, dpi=110)
    return [name for name in FIGURE_FILES if name in drawn]


def _markdown(analyses: list[Analysis], table: Path, written: list[str],
              sweep: SweepExtras | None) -> str:
    primary = analyses[0]
    md = []
    for line in (sweep.caution if sweep else []):
        md += [f"**{line}**", ""]
    for line in primary.verdict:  # what was decided in bold; what the runs measured plain
        md += [line if line.startswith(MEASURED) else f"**{line}**", ""]
    md += [f"Source: `{sweep.sweep_dir if sweep else table}` "
               f"({'sweep; long table ' + str(table.name) if sweep else 'table'})."]
    for a in analyses:
        title = "validation patients" if a.split == PRIMARY_SPLIT else f"{a.split} patients"
        if a is not primary:
            md += ["", f"## {a.split}: {title}, a separate family of comparisons"]
            for line in a.verdict:
                md += ["", line]
        md += ["", f"## Per loss ({title})", "", *summary_table(a)]
        if a.comparisons:
            against = (f"against {a.baseline}" + (" and all pairs" if a.all_pairs else "")
                       if a.baseline else "all pairs (no baseline in the table)")
            md += ["", f"## Paired comparisons ({title}, {against}; per-patient Dice, "
                       "positive Δ = the first loss scores higher)", "", *comparison_table(a)]
    if written:
        md += ["", "## Figures", ""] + [f"![{name[:-4]}]({name})" for name in written]
    md += ["", METHODS]
    md += [SWEEP_PROTOCOL if sweep else TABLE_PROTOCOL.format(split=primary.split)]
    if sweep is not None and (sweep.not_counted() or sweep.notes):
        md += ["## Runs not in the statistics, and other problems", ""]
        md += [r.listed for r in sweep.not_counted()]
        md += [f"- {note}" for note in sweep.notes]
        md += [""]
    return "\n".join(md) + "\n"


def _contour_columns(runs: list[Run], losses: list[str],
                     sweep: SweepExtras) -> list[figures.ContourColumn]:
    """One model per loss, on the fold and seed most losses have (the same slices), the
    lowest first. Every preview is opened, so a broken one is named even if not drawn."""
    previews = {run.name: _load_preview(run, sweep) for run in runs}
    common = Counter((run.fold, run.seed) for run in runs if previews[run.name] is not None)
    columns = []
    for label in losses:
        drawable = [run for run in runs if run.label == label and previews[run.name] is not None]
        if not drawable:
            continue
        run = min(drawable, key=lambda r: (-common[r.fold, r.seed], (r.fold, r.seed)))
        dice = float(np.mean([r["dice"] for r in run.rows if r["split"] == PRIMARY_SPLIT]
                             or [math.nan]))
        columns.append(figures.ContourColumn(label=label, run=run.name, dice=dice,
                                             **previews[run.name]))
    return columns


def _load_preview(run: Run, sweep: SweepExtras) -> dict[str, np.ndarray] | None:
    path = run.folder / PREVIEW_FILE
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            preview = {k: np.asarray(data[k]) for k in ("image", "mask", "prob", "names")}
        if not (preview["image"].shape == preview["mask"].shape == preview["prob"].shape
                and preview["image"].ndim == 3 and len(preview["names"]) == len(preview["image"])):
            raise ValueError("image, mask, prob and names do not match in shape")
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say so, draw the rest
        sweep.notes.append(f"`{run.name}`: {PREVIEW_FILE} unreadable ({exc}); its numbers are "
                           "counted, its contours are not drawn")
        return None
    return preview


def _curves(runs: list[Run], losses: list[str],
            sweep: SweepExtras) -> dict[str, list[figures.Curve]]:
    curves: dict[str, list[figures.Curve]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: losses.index(r.label)):
        try:
            history = read_history(run.folder)
        except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
            sweep.notes.append(f"`{run.name}`: {METRICS_FILE} unreadable ({exc}); its loss "
                               "curve is not drawn")
            continue
        if not history:
            continue
        name = f"fold {run.fold or '?'}, seed {run.seed or '?'}"
        curves[run.label].append(figures.Curve(name=name, history=history,
                                               best_epoch=run.results.get("best_epoch")))
    return dict(curves)


def write_report(sweep_dir: str | Path, baseline: str | None = None, all_pairs: bool = False,
                 split: str = PRIMARY_SPLIT, allow_mixed_code: bool = False,
                 out: Path | None = None) -> Path:
    """The long table, then the table mode on it, into ``out`` (SWEEP_DIR/report/ by default).
    Returns results.md."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DataError(f"{sweep_dir}: sweep folder not found")
    runs = collect_runs(sweep_dir, allow_mixed_code)
    if not runs:
        raise DataError(f"{sweep_dir}: no run folders inside (none holds {STATUS_FILE} or "
                        f"{RESULTS_FILE})")
    out = sweep_dir / REPORT_DIR if out is None else out
    sweep = SweepExtras(sweep_dir, runs)
    counted = [r for r in runs if r.state == "completed"]
    rows = [row for run in counted for row in long_rows(run)]
    if counted:
        _plan(rows, baseline, split, str(sweep_dir))  # the options refused before any writing
    mixed = mixed_code(r.identity for r in counted)
    if mixed:
        sweep.caution.append(f"Pooled on request (--allow-mixed-code): {mixed}. A difference "
                             "between losses may be one between code versions.")
    own = out.resolve() == (sweep_dir / REPORT_DIR).resolve()  # its files before records: ours
    with replacing_files(out, (LONG_TABLE, *REPORT_FILES), own_folder=own) as staging:
        if not counted:
            write_text(staging / "results.md", f"**No completed run with per-patient results "
                       f"in {sweep_dir}: nothing to compare.**\n\n"
                       + "".join(r.listed + "\n" for r in runs))
        else:  # the table mode on the long table as written
            table = staging / LONG_TABLE
            write_long_table(table, rows)
            try:
                rows = read_long_table(table)
                verdict = _write_tables(table, rows, _plan(rows, baseline, split, str(table)),
                                        staging, all_pairs, split, sweep)
            except DataError as exc:  # named where the table would have been
                raise DataError(str(exc).replace(str(staging), str(out))) from None
    if not counted:
        print(f"no completed run with per-patient results in {sweep_dir}; see "
              f"{out / 'results.md'}")
        return out / "results.md"
    print("\n".join(sweep.caution + verdict))
    print(f"report: {out / 'results.md'}\nTensorBoard: tensorboard --logdir {sweep_dir}")
    return out / "results.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prostate_seg report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", help="a multirun folder")
    parser.add_argument("--table", type=Path, help="a long table (CSV) instead of a sweep")
    parser.add_argument("--out", type=Path, help="the report's folder (a sweep's default: "
                        "SWEEP_DIR/report/)")
    parser.add_argument("--baseline", help=f"the loss every other is compared with (default: "
                        f"{DEFAULT_BASELINE} when present, else all pairs)")
    parser.add_argument("--all-pairs", action="store_true", help="compare every pair of losses "
                        "too (needed to call one loss best)")
    parser.add_argument("--allow-mixed-code", action="store_true", help="pool runs made by "
                        "different code versions (refused otherwise; the report says so)")
    parser.add_argument("--split", default=PRIMARY_SPLIT, help="the split the verdict is on "
                        "(default: val; every other split is reported separately)")
    args = parser.parse_args(argv)
    if (args.table is None) == (args.sweep_dir is None):
        parser.error("give either SWEEP_DIR or --table FILE.csv --out DIR")
    if args.table is not None and args.out is None:
        parser.error("--table needs --out DIR")
    try:
        if args.table is not None:
            verdict = report_table(args.table, args.out, args.baseline, args.all_pairs,
                                   args.split)
            print("\n".join(verdict))
            print(f"report: {args.out / 'results.md'}")
        else:
            write_report(args.sweep_dir, args.baseline, args.all_pairs, args.split,
                         args.allow_mixed_code, args.out)
    except (UserError, OSError) as exc:  # OSError: the path and reason, as every command says it
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    return 0

