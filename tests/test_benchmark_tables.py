"""benchmarks/real_data_accuracy.py's tables, on hand-made rows: runs of several seeds are
summarised with the trained run as the replicate, and pooled over folds once per seed."""

import importlib.util
import re

import pytest
from helpers import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "real_data_accuracy", REPO / "benchmarks" / "real_data_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(bench, fold, seed, dice):
    patients = [{"patient": f"Case{fold}{k}", "dice": dice + d, "precision": 0.8,
                 "recall": 0.7, "hd95": 3.0, "hd95_unit": "px"} for k, d in enumerate((-0.1, 0.1))]
    scored = {label: patients for label, *_ in bench.EVALUATIONS}
    return {"run": bench.RECIPE, "fold": fold, "seed": seed, "epochs": 16, "train_min": 6.0,
            "select_dice_training": 0.8, "late_gain": 0.004, "reused": False, **scored}


def test_seeds_are_summarised_over_runs_not_patients(bench):
    """Three runs whose patients average 0.70, 0.80 and 0.90: 0.80 ± 0.10 over the runs, the
    95 % t interval 0.80 ± 4.303 × 0.10 / √3 = 0.552 - 1.048 (the patients' own spread, ±0.1
    around each run, does not narrow it)."""
    rows = [row(bench, 0, seed, dice) for seed, dice in ((0, 0.7), (1, 0.8), (2, 0.9))]
    text = bench.markdown("cpu", rows, "cmd", 60)
    (line,) = [l for l in text.splitlines() if l.startswith(f"| {bench.RECIPE} | 0 | 3 |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:6] == ["0.8000 ± 0.1000", "0.552 - 1.048", "0.700 - 0.900"]
    assert cells[-1] == "0.800 / 0.700"
    assert len(re.findall(rf"^\| {re.escape(bench.RECIPE)} \| 0 \| [012] \| ", text, re.M)) == 3


def test_folds_are_pooled_once_a_seed_and_one_seed_has_no_seed_summary(bench):
    rows = [row(bench, fold, seed, 0.6 + 0.1 * seed) for fold in (0, 1) for seed in (0, 1)]
    text = bench.markdown("cpu", rows, "cmd", 60)
    pooled = re.findall(rf"^\| {re.escape(bench.RECIPE)} \| (\d) \| 2 \| 4 \| ([0-9.]+) ±", text,
                        re.M)
    assert pooled == [("0", "0.6000"), ("1", "0.7000")]  # 2 folds, 4 patients, each seed apart
    single = bench.markdown("cpu", [row(bench, 0, None, 0.7)], "cmd", 60)
    assert "Over seeds" not in single and f"| {bench.RECIPE} | 0 | config |" in single
