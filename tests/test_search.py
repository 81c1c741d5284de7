"""The alpha search (experiment=alpha_search, hydra/sweeper=optuna_repeated): a stored Optuna
study whose trials are the mean of their runs' objective, resumed where it stopped, and the
objective-against-alpha figure of a sweep folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import TINY, run_cli

from prostate_seg.search import OBJECTIVE, alpha_table, plot_alpha_search

optuna = pytest.importorskip("optuna", reason="Optuna is the optional extra [optuna]")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the extra [optuna]")

SEEDS = [0, 1]


def _search(sweep: Path, prepared: Path, n_trials: int):
    # The sweep report is tested elsewhere; here it would only cost time.
    return run_cli("train.py", "experiment=alpha_search", f"hydra.sweep.dir={sweep}",
                   f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.seeds={SEEDS}",
                   "~hydra.callbacks.sweep_report", *TINY, f"data.dir={prepared}",
                   "trainer.max_epochs=1", cwd=sweep.parent)


@pytest.mark.slow
def test_search_stores_mean_objective_per_trial_and_resumes(prepared, tmp_path):
    """Three trials: one complete, one cut off by an interruption (left RUNNING), and the
    start after it, which runs the cut-off one again with its alpha until two are complete."""
    sweep = tmp_path / "search"
    first = _search(sweep, prepared, n_trials=1)
    assert first.returncode == 0, first.stderr[-3000:]
    storage = f"sqlite:///{sweep}/optuna.db"
    study = optuna.load_study(study_name="alpha_search", storage=storage)
    cut_off = study.ask({"loss.alpha": optuna.distributions.UniformDistribution(0.05, 0.95)})
    alpha = cut_off.params["loss.alpha"]

    again = _search(sweep, prepared, n_trials=2)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name="alpha_search", storage=storage).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3 and trials[cut_off.number].state == optuna.trial.TrialState.FAIL
    assert len(complete) == 2 and complete[1].params["loss.alpha"] == alpha
    # Each trial's value is the mean over its runs (one per seed) of what they wrote.
    runs = {}
    for path in sweep.glob("*/results.json"):
        results = json.loads(path.read_text())
        runs.setdefault(results["alpha"], {})[(results["fold"], results["seed"])] = results
    for trial in complete:
        alpha = trial.params["loss.alpha"]
        assert 0.05 <= alpha <= 0.95 and sorted(runs[alpha]) == [(0, seed) for seed in SEEDS]
        values = [r[OBJECTIVE] for r in runs[alpha].values()]
        assert trial.value == pytest.approx(math.fsum(values) / len(values))

    rows = alpha_table(sweep)
    assert {r["alpha"]: r["mean"] for r in rows} == pytest.approx(
        {t.params["loss.alpha"]: t.value for t in complete})
    assert plot_alpha_search(sweep, tmp_path / "figures").stat().st_size > 0


def _write_run(sweep: Path, name: str, **results) -> None:
    (sweep / name).mkdir(parents=True)
    (sweep / name / "results.json").write_text(json.dumps(results))


def test_alpha_table_groups_runs_by_alpha_and_averages_them(tmp_path):
    _write_run(tmp_path, "a", alpha=0.3, seed=0, fold=0, **{OBJECTIVE: 0.80})
    _write_run(tmp_path, "b", alpha=0.3, seed=1, fold=0, **{OBJECTIVE: 0.70})
    _write_run(tmp_path, "c", alpha=0.1, seed=0, fold=0, **{OBJECTIVE: 0.60})
    _write_run(tmp_path, "bce", alpha="-", seed=0, **{OBJECTIVE: 0.9})     # no alpha: left out
    _write_run(tmp_path, "failed", alpha=0.5, seed=0)                     # no objective
    rows = alpha_table(tmp_path)
    assert [(r["alpha"], len(r["runs"])) for r in rows] == [(0.1, 1), (0.3, 2)]
    assert rows[1]["mean"] == pytest.approx(0.75)
    assert plot_alpha_search(tmp_path, tmp_path / "out").name == "alpha_search.png"
    assert plot_alpha_search(tmp_path / "a", tmp_path / "none") is None  # fewer than two alphas
