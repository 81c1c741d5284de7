"""benchmarks/real_data_accuracy.py's tables, on hand-made rows: runs of several seeds are
summarised with the trained run as the replicate, and pooled over folds once per seed."""

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_train, load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("real_data_accuracy")


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
    assert f"| {bench.RECIPE} | mean of 2 seeds | | | 0.6500 ± 0.0707 (SD over seeds) |" in text
    single = bench.markdown("cpu", [row(bench, 0, None, 0.7)], "cmd", 60)
    assert "Over seeds" not in single and f"| {bench.RECIPE} | 0 | config |" in single


def test_a_run_is_reused_only_for_the_same_seed_and_augmentation_streams(bench, tmp_path,
                                                                           monkeypatch):
    """A finished run is evaluated again, not retrained, for the same run, fold and seed; a run
    of another seed, or one trained before each transform drew from its own stream (its tag
    lacks the mark), is not taken (training and evaluation stubbed)."""
    def train(folder):
        results = {"epochs_trained": 2, "select/dice": 0.8, "best_epoch": 1,
                   "best_checkpoint": str(folder / "final.ckpt")}
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr(bench, "compose_config", lambda name, overrides, folder: folder)
    monkeypatch.setattr(bench, "train", train)
    monkeypatch.setattr(bench, "run_late_gain", lambda folder: 0.0)
    monkeypatch.setattr(bench, "not_averaged", lambda last: last)
    monkeypatch.setattr(bench, "evaluate_checkpoint",
                        lambda *args, **kwargs: [{"dice": 0.7, "precision": 0.7, "recall": 0.7}])
    setting = {**bench.SETTINGS["cpu"], "overrides": ["seed=1"]}
    work = tmp_path / "work"
    work.mkdir()

    def reused(seed_setting):
        return bench.run_one(bench.RECIPE, 0, 1, tmp_path, work / "1", seed_setting,
                             list(work.rglob(bench.TAG)), only_reused=True)

    assert bench.run_one(bench.RECIPE, 0, 1, tmp_path, work / "0", setting,
                         [])["reused"] is False
    assert reused(setting)["reused"] is True
    assert reused({**setting, "overrides": ["seed=2"]}) is None
    tag = work / "0" / bench.TAG
    record = json.loads(tag.read_text())
    del record["augment_streams"]
    tag.write_text(json.dumps(record))
    assert reused(setting) is None


def test_a_run_of_its_own_size_trains_and_prepares_at_it(bench, tmp_path, monkeypatch):
    """The 160-px run: one image size in its overrides (Hydra would take the last of two, a
    reused run's tag would not), scans prepared at 160 px; the recipe keeps the setting's 128."""
    composed, made = [], []

    class Composed(Exception):
        pass

    def compose(name, overrides, folder):
        composed.append(overrides)
        raise Composed  # what it trains is all this test asks

    monkeypatch.setattr(bench, "compose_config", compose)
    monkeypatch.setattr(bench, "prepare", lambda src, out, settings, workers: made.append(
        (out.name, settings.image_size)))
    setting = bench.SETTINGS["cpu"]
    for name in (bench.RECIPE, "recipe at 160 px"):
        with pytest.raises(Composed):
            bench.run_one(name, 0, None, tmp_path, tmp_path, setting, [])
    sizes = [[o for o in overrides if o.startswith("data.image_size=")] for overrides in composed]
    assert sizes == [["data.image_size=128"], ["data.image_size=160"]]
    args = bench.argparse.Namespace(workdir=tmp_path, data=tmp_path)
    for name in (bench.RECIPE, "recipe at 160 px"):
        bench.prepared(args, bench.image_size(name, setting), "window")
    assert made == [("promise12_128", 128), ("promise12_160", 160)]


@pytest.mark.parametrize("option, value", [("--seeds", "1,x"), ("--seeds", "2,2"),
                                           ("--folds", ""), ("--folds", "-1"),
                                           ("--jobs", "0"), ("--jobs", "two")])
def test_bad_folds_seeds_or_jobs_are_one_line_naming_the_option(bench, option, value, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main([option, value])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert f"argument {option}: {value!r}" in line


def test_the_seeds_interval_covers_the_recipes_mean_95_percent_of_the_time(bench):
    """Simulated fold: 8 patients with their own difficulty (shared by every run), each run
    shifted as a whole (training luck, SD 0.025) plus per-patient noise; four seeds a sweep.
    The interval over runs covers the fold's true mean in about 95 % of 1,000 sweeps; one that
    treated the 32 patient scores as independent is too narrow: it misses three times as often."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 0.08, 8)
    truth, hits, naive_hits = 0.75 + difficulty.mean(), 0, 0
    for _ in range(1000):
        rows = []
        for seed in range(4):
            dice = 0.75 + difficulty + rng.normal(0, 0.025) + rng.normal(0, 0.03, 8)
            rows.append(row(bench, 0, seed, 0.0))
            patients = [{**rows[-1]["plain"][0], "dice": d} for d in dice]
            rows[-1].update({label: patients for label, *_ in bench.EVALUATIONS})
        line = bench.over_seeds(rows, [bench.RECIPE], [0])[-1]
        low, high = (float(x) for x in line.split("|")[5].split(" - "))
        hits += low <= truth <= high
        scores = np.array([p["dice"] for r in rows for p in r["plain"]])
        half = 1.96 * scores.std(ddof=1) / np.sqrt(scores.size)
        naive_hits += abs(scores.mean() - truth) <= half
    assert 0.93 <= hits / 1000 <= 0.97, hits
    assert naive_hits / 1000 < 0.90, naive_hits  # 0.85: three times the misses


@pytest.mark.parametrize("setting", ["cpu", "gpu"])
def test_every_run_of_every_group_composes_into_a_train_config(bench, setting, tmp_path):
    """A misspelt override in RUNS would otherwise surface only after the scans are prepared."""
    assert {n for runs in bench.GROUPS.values() for n in runs} <= set(bench.RUNS)
    for name in bench.RUNS:
        overrides = bench.run_overrides(name, 1, bench.SETTINGS[setting])
        cfg = compose_train(overrides, tmp_path / "run")
        assert cfg.data.fold == 1
        assert cfg.data.image_size == bench.image_size(name, bench.SETTINGS[setting])


def test_the_benchmarks_cpu_recipe_is_what_experiment_cpu_trains(bench, tmp_path):
    """The recipe is written twice, as experiment=cpu and as the benchmark's cpu setting with
    its base overrides (kept apart so that earlier runs stay reusable): they must not drift."""
    setting = bench.SETTINGS["cpu"]
    extra = bench.run_overrides(bench.RECIPE, 0, setting)[-3:]  # time cap, no early stop, quiet
    benchmark = compose_train(bench.run_overrides(bench.RECIPE, 0, setting), tmp_path / "b")
    experiment = compose_train(["experiment=cpu", "loss=dice",  # the benchmark's loss, named
                                f"{bench.SIZE}{setting['image_size']}", "data.fold=0", *extra],
                               tmp_path / "e")
    for key in ("data", "augment", "model", "loss", "optimizer", "scheduler", "trainer",
                "callbacks"):
        assert benchmark[key] == experiment[key], key


def where(index: int, marks: str) -> tuple[int, str | None, str | None, str | None]:
    """A call for in_processes: the process it ran in, its GPU, CPU share and threads. The
    fifth call fails at once, the ones after it take longer (the failure is seen before any of
    them ends); each marks that it started."""
    Path(marks, str(index)).touch()
    if index == 4:
        raise ValueError("call 4 failed")
    time.sleep(0.2 if index < 4 else 1.0)
    return (os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"),
            os.environ.get("PROSTATE_SEG_CPUS"), os.environ.get("OMP_NUM_THREADS"))


def test_jobs_run_in_processes_of_their_own_gpu_and_cpus_and_a_failure_stops_the_rest(
        bench, tmp_path, monkeypatch):
    """--jobs 2 on two GPUs: each worker process keeps one GPU and half the CPUs (its loader
    workers and threads are sized from them); after a failed run no other starts, the one
    running finishes and is yielded, and the failure is raised naming its run."""
    monkeypatch.setattr(bench, "visible_gpus", lambda: ["3", "5"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # the worker processes import the calls by name, as they do __main__'s for the script
    monkeypatch.syspath_prepend(str(bench.REPO / "benchmarks"))
    monkeypatch.setitem(sys.modules, bench.__name__, bench)
    finished = []
    calls = [(i, str(tmp_path)) for i in range(12)]
    with pytest.raises(ValueError, match="call 4 failed") as failed:
        for index, result in bench.in_processes(where, calls, 2, [f"run {i}" for i in range(12)]):
            finished.append((index, *result))
    assert failed.value.__notes__ == ["in run 4"]
    started = sorted(int(mark.name) for mark in tmp_path.iterdir())
    assert started in ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5])  # at most one beside the failure
    assert sorted(index for index, *_ in finished) == [i for i in started if i != 4]
    share = str(max(1, bench.available_cpus() // 2))
    assert {(cpus, threads) for *_, cpus, threads in finished} == {(share, share)}
    gpu_of = {pid: {gpu for _, p, gpu, *_ in finished if p == pid} for _, pid, *_ in finished}
    assert all(len(gpus) == 1 for gpus in gpu_of.values()), gpu_of  # a process keeps its GPU
    assert len(set.union(*gpu_of.values())) == len(gpu_of) <= 2  # and shares it with none
    assert set.union(*gpu_of.values()) <= {"3", "5"}
    assert "PROSTATE_SEG_CPUS" not in os.environ  # the parent's environment is given back


def test_runs_of_several_jobs_are_tabulated_in_the_commands_order(bench, tmp_path, monkeypatch):
    """The runs end in any order; each has its own folder and the table keeps the command's
    order (its per-patient section shows the first run)."""
    given = {}

    def in_processes(function, calls, jobs, labels):
        given.update(jobs=jobs, folders=[call[4] for call in calls], labels=labels)
        for index in reversed(range(len(calls))):
            yield index, row(bench, calls[index][1], None, 0.6 + 0.1 * index)

    monkeypatch.setattr(bench, "in_processes", in_processes)
    monkeypatch.setattr(bench, "prepared", lambda args, size, intensity: tmp_path)
    results = tmp_path / "RESULTS.md"
    rows = bench.main(["--folds", "2,0,1", "--jobs", "3", "--workdir", str(tmp_path),
                       "--results", str(results)])
    assert [r["fold"] for r in rows] == [2, 0, 1]
    assert given["jobs"] == 3 and [f.name for f in given["folders"]] == ["0", "1", "2"]
    assert given["labels"][0] == f"{bench.RECIPE}, fold 2"
    text = results.read_text()
    assert "3 runs trained at a time" in text
    assert f"Per patient ({bench.RECIPE}, fold 2, plain)" in text


def test_the_benchmarks_gpu_recipe_is_what_the_study_script_trains(bench, tmp_path):
    """The GPU recipe is written in benchmarks/study.sh (the study's sweep) and as the
    benchmark's gpu setting: but for the loss the study sweeps, they must not drift."""
    script = (bench.REPO / "benchmarks" / "study.sh").read_text()
    command = script.split('"$here/train.py" -m', 1)[1].split('"$@"', 1)[0]
    words = [word for word in shlex.split(command.replace("\\\n", " ")) if "=" in word]
    overrides = [word for word in words if "$" not in word and not word.startswith("hydra")]
    # what the script sets per machine or seed, not the recipe (a new setting here is compared)
    assert {word.split("=")[0] for word in words if word not in overrides} == {
        "data.dir", "data.image_size", "hydra.sweep.dir", "study.seeds", "hydra/launcher",
        "hydra.launcher.jobs_per_gpu"}
    assert "experiment=paper" in overrides, overrides
    setting = bench.SETTINGS["gpu"]
    extra = bench.run_overrides(bench.RECIPE, 0, setting)[-3:]  # time cap, no early stop, quiet
    benchmark = compose_train(bench.run_overrides(bench.RECIPE, 0, setting), tmp_path / "b")
    study = compose_train([*overrides, "trainer=gpu",  # trainer=auto, on the study's GPU
                           "loss=dice", f"{bench.SIZE}{setting['image_size']}", "data.fold=0",
                           *extra], tmp_path / "s")
    for key in ("data", "augment", "model", "loss", "optimizer", "scheduler", "trainer",
                "callbacks"):
        assert benchmark[key] == study[key], key
