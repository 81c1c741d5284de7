"""``hydra/launcher=slurm`` on a real single-node SLURM cluster (``scripts/local_slurm.sh``).

The study's sweep runs as one SLURM array job in the folders the basic launcher uses and
writes its report; a task that SLURM requeues and a task that reaches its time limit save
last.ckpt, are requeued and resume to the full number of epochs; a task killed for good is
reported as failed while the others finish.

Needs root: the cluster is started here unless it runs (CI starts it first, see .ci/run), and
raising a job's time limit is an administrator's right. Skipped, saying why, otherwise.
"""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, TINY, run_cli
from omegaconf import OmegaConf

from prostate_seg.data.prepare import PrepareSettings, prepare
from prostate_seg.runs import read_history

pytestmark = [pytest.mark.slurm, pytest.mark.extra]

CLUSTER = REPO / "scripts" / "local_slurm.sh"
LOCAL_CONF_MARK = "Written by prostate-seg scripts/local_slurm.sh"
SMALL = [o for o in TINY if not o.startswith(("data.image_size=", "data.batch_size="))]
# The test node has CPUs only: one core and 2 GB per task, so two tasks run at a time.
ON_TEST_CLUSTER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug",
                   "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
                   "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=5"]
LOSSES = ["bce", "tversky_a0.25", "tversky_a0.75"]  # sweep job i = array task i


@pytest.fixture(scope="module")
def cluster():
    """The local test cluster, started here unless it already runs."""
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root: they start a local cluster with "
                    "scripts/local_slurm.sh (apt-get, daemons) and change jobs' time limits")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM tests need SLURM installed, or apt-get to install it")
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and LOCAL_CONF_MARK not in conf.read_text():
        pytest.skip(f"{conf} is a real cluster's; SLURM tests only use scripts/local_slurm.sh's")
    was_running = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    started = subprocess.run([CLUSTER, "start"], capture_output=True, text=True)
    if started.returncode == 3:  # SLURM cannot be installed here (apt-get failed)
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stdout + started.stderr
    yield
    if not was_running:
        subprocess.run([CLUSTER, "stop"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def data32(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm") / "png32"
    prepare(phantoms, out, PrepareSettings(image_size=32))
    return out


def sweep_overrides(data: Path, *more: str) -> list[str]:
    """experiment=paper at test size, the losses swept on fold 0, one seed (no launcher, no
    folder)."""
    return ["experiment=paper", "loss=bce,tversky", "loss.alpha=0.25,0.75", "study.folds=[0]",
            "study.seeds=[0]",
            *SMALL, "data.image_size=32", f"data.dir={data}", *more]


def slurm(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def sacct(job: str, field: str) -> list[str]:
    """``field`` of every run of ``job`` (an array job: of every task), oldest first."""
    out = slurm("sacct", "--noheader", "--parsable2", "--allocations", "--duplicates",
                f"--jobs={job}", f"--format={field}")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def array_job(sweep: Path) -> str:
    """The SLURM array job id submitit used (its folders .submitit/<id>_<task>)."""
    ids = {p.name.split("_")[0] for p in (sweep / ".submitit").glob("[0-9]*_*")}
    assert len(ids) == 1, ids
    return ids.pop()


def task_folder(sweep: Path, task: str) -> Path | None:
    """The job folder of SLURM task ``task`` (``<array id>_<i>``): Hydra records the id as
    hydra.job.id when the job starts."""
    for path in sweep.glob("*/.hydra/hydra.yaml"):
        if str(OmegaConf.select(OmegaConf.load(path), "hydra.job.id")) == task:
            return path.parent.parent
    return None


def job_folders(sweep: Path) -> set[str]:
    return {p.name for p in sweep.iterdir() if p.is_dir() and p.name not in (".submitit", "report")}


def epochs(run: Path | None) -> list[int]:
    return [] if run is None else [int(row["epoch"]) for row in read_history(run)]


def report(sweep: Path) -> tuple[dict[str, dict], str]:
    """The sweep report's row per loss (results.csv) and its text (results.md)."""
    with open(sweep / "report" / "results.csv", newline="") as f:
        rows = {row["loss"]: row for row in csv.DictReader(f)}
    return rows, (sweep / "report" / "results.md").read_text()


def test_sweep_is_one_array_job_in_the_basic_launchers_folders_with_its_report(
        cluster, data32, tmp_path):
    overrides = sweep_overrides(data32, "trainer.max_epochs=2")
    sweep = tmp_path / "slurm"
    on_slurm: list = []
    driver = threading.Thread(target=lambda: on_slurm.append(run_cli(
        "train.py", "-m", *overrides, *ON_TEST_CLUSTER, "hydra.launcher.array_parallelism=2",
        "hydra.launcher.setup=['echo setup line ran']",
        "+hydra.launcher.additional_parameters.comment=prostate-seg-test",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)))
    driver.start()  # meanwhile, the same sweep with Hydra's basic launcher, in its process
    basic = run_cli("train.py", "-m", *overrides, f"hydra.sweep.dir={tmp_path / 'basic'}",
                    cwd=tmp_path, timeout=300)
    driver.join()
    assert basic.returncode == 0, basic.stderr[-3000:]
    assert on_slurm[0].returncode == 0, on_slurm[0].stderr[-3000:]

    assert job_folders(sweep) == job_folders(tmp_path / "basic")
    job = array_job(sweep)
    tasks = [f"{job}_{i}" for i in range(len(LOSSES))]
    assert sacct(job, "JobID") == tasks and sacct(job, "State") == ["COMPLETED"] * len(LOSSES)
    for task, loss in zip(tasks, LOSSES):
        run = task_folder(sweep, task)
        results = json.loads((run / "results.json").read_text())
        assert results["loss"] == loss and results["epochs_trained"] == 2 and epochs(run) == [0, 1]
        assert json.loads((run / "status.json").read_text())["status"] == "completed"
        assert "setup line ran" in (sweep / ".submitit" / task / f"{task}_0_log.out").read_text()
    script = (sweep / ".submitit" / job / f"{job}_submission.sh").read_text()
    for flag in ("--array=0-2%2", "--partition=debug", "--cpus-per-task=1", "--mem=2GB",
                 "--time=5", "--signal=USR2@120", "--comment=prostate-seg-test"):
        assert f"#SBATCH {flag}\n" in script
    assert "--gpus-per-node" not in script
    rows, _ = report(sweep)
    assert sorted(rows) == sorted(LOSSES) == sorted(report(tmp_path / "basic")[0])
    assert all(row["n_runs"] == "1" for row in rows.values())


@dataclass
class Interrupted:
    sweep: Path
    job: str
    result: subprocess.CompletedProcess
    killed: Path        # task 0: SIGKILL mid-training, as from the out-of-memory killer
    time_limit: Path    # task 1: a time limit under a minute away once it trains
    requeued: Path      # task 2: `scontrol requeue` mid-training
    epochs: int


def _wait_for(what: str, value, deadline: float):
    """Poll ``value()`` until it is truthy; return it."""
    while not (found := value()):
        if time.time() > deadline:
            raise TimeoutError(f"SLURM test: {what} did not happen in time")
        time.sleep(0.5)
    return found


@pytest.fixture(scope="module")
def interrupted(cluster, data32, tmp_path_factory) -> Interrupted:
    """One sweep of three tasks, each interrupted its own way while the sweep runs."""
    tmp = tmp_path_factory.mktemp("interrupted")
    sweep = tmp / "sweep"
    max_epochs = 12  # 16 batches of 8 slices, 0.2 s each: > 38 s of training per task
    overrides = [
        *sweep_overrides(data32, "data.batch_size=8", f"trainer.max_epochs={max_epochs}"),
        "callbacks.early_stopping.patience=100", "+callbacks.pace._target_=helpers.Pace",
        "+callbacks.pace.seconds=0.2", *ON_TEST_CLUSTER,
        # SIGUSR2 90 s before the limit: with the limit 40-100 s away that task 1 gets
        # mid-run, SLURM sends it at its next time-limit check (one every 30 s).
        "hydra.launcher.signal_delay_s=90", "hydra.launcher.max_num_timeout=2",
        f"hydra.sweep.dir={sweep}"]
    outcome: list = []
    driver = threading.Thread(target=lambda: outcome.append(run_cli(
        "train.py", "-m", *overrides, cwd=tmp, timeout=420,
        env={"PYTHONPATH": str(REPO / "tests")})))  # the tasks import helpers.Pace
    driver.start()
    deadline = time.time() + 400
    job = None
    try:
        _wait_for("submission", lambda: list((sweep / ".submitit").glob("[0-9]*_2")), deadline)
        job = array_job(sweep)
        killed = _wait_for("task 0 training", lambda: epochs(task_folder(sweep, f"{job}_0"))
                           and task_folder(sweep, f"{job}_0"), deadline)
        os.kill(json.loads((killed / "status.json").read_text())["pid"], signal.SIGKILL)
        time_limit = _wait_for("task 1 training", lambda: epochs(task_folder(sweep, f"{job}_1"))
                               and task_folder(sweep, f"{job}_1"), deadline)
        # A limit 40-100 s away: SLURM's next check (within 30 s) sends the signal, before it.
        elapsed = int(sacct(f"{job}_1", "ElapsedRaw")[-1])
        slurm("scontrol", "update", f"JobId={job}_1", f"TimeLimit={math.ceil((elapsed + 40) / 60)}")
        requeued = _wait_for("task 2 training", lambda: epochs(task_folder(sweep, f"{job}_2"))
                             and task_folder(sweep, f"{job}_2"), deadline)
        done = len(epochs(requeued))  # requeued just after an epoch ends: mid-epoch, not in
        _wait_for("task 2's next epoch", lambda: len(epochs(requeued)) > done, deadline)
        slurm("scontrol", "requeue", f"{job}_2")  # its validation (where nothing is saved)
        _wait_for("task 1 requeued at its time limit",
                  lambda: "REQUEUED" in sacct(f"{job}_1", "State"), deadline)
        slurm("scontrol", "update", f"JobId={job}_1", "TimeLimit=5")  # the next run finishes
        driver.join(max(0.0, deadline - time.time()))
        assert not driver.is_alive(), "the sweep did not end"
    finally:  # nothing left running, whatever happened (the driver then ends too)
        if job is not None:
            subprocess.run(["scancel", job], capture_output=True)
        driver.join(60)
    return Interrupted(sweep=sweep, job=job, result=outcome[0], killed=killed,
                       time_limit=time_limit, requeued=requeued, epochs=max_epochs)


def _interruption(run: Path) -> tuple[int, int]:
    """(epoch, step) at which InterruptCheckpoint saved last.ckpt, from the run's log."""
    saved = re.findall(r"interrupted \(SIGTERMException\): saved \S+last\.ckpt at epoch (\d+), "
                       r"step (\d+)", (run / "train.log").read_text())
    assert len(saved) == 1, saved
    return int(saved[0][0]), int(saved[0][1])


def _assert_resumed_to_the_end(run: Path, max_epochs: int) -> None:
    """Completed from its own last.ckpt, saved mid-epoch, every epoch trained exactly once."""
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed"
    assert status["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert json.loads((run / "results.json").read_text())["epochs_trained"] == max_epochs
    assert epochs(run) == list(range(max_epochs))  # as an uninterrupted run
    # saved at the signal (mid-epoch, or at an epoch's end when SLURM's signal lands there:
    # the mid-epoch save itself is checked at a chosen batch in test_faults.py)
    epoch, step = _interruption(run)
    assert 0 < epoch < max_epochs and step > 0
    assert "continuing from" in (run / "train.log").read_text()


def test_task_requeued_by_slurm_resumes_from_its_checkpoint(interrupted):
    run = interrupted.requeued
    assert sacct(f"{interrupted.job}_2", "State") == ["REQUEUED", "COMPLETED"]
    _assert_resumed_to_the_end(run, interrupted.epochs)
    assert "SIGUSR2" not in (run / "train.log").read_text()  # SIGTERM from SLURM, no timeout


def test_task_at_its_time_limit_saves_requeues_and_resumes(interrupted):
    run = interrupted.time_limit
    assert sacct(f"{interrupted.job}_1", "State") == ["REQUEUED", "COMPLETED"]
    _assert_resumed_to_the_end(run, interrupted.epochs)
    log = (run / "train.log").read_text()
    # SLURM's own signal (sbatch --signal=USR2@90 from signal_delay_s), then submitit requeued
    assert "SIGUSR2: SLURM's time limit is near" in log
    assert re.search(r"Requeued job \S+ \(1 remaining timeouts\)", log)


def test_task_killed_for_good_is_failed_while_the_others_finish(interrupted):
    task = f"{interrupted.job}_0"
    assert sacct(task, "State") == ["FAILED"]
    record = json.loads((interrupted.killed / "launcher.json").read_text())
    assert record["status"] == "failed" and record["slurm_job_id"] == task
    assert record["slurm_state"] == "FAILED"
    assert interrupted.result.returncode != 0  # the sweep says a job failed ...
    assert interrupted.result.stderr.startswith("error: 1 of 3 jobs failed")
    rows, text = report(interrupted.sweep)  # ... after the others finished, in its report
    killed, *finished = LOSSES
    assert sorted(rows) == sorted(finished) and all(rows[f]["n_runs"] == "1" for f in finished)
    assert f"`{interrupted.killed.name}`: failed — SLURM task {task} (FAILED)" in text
