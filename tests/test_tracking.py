"""MLflow tracking (logger=mlflow, logger=tensorboard_mlflow), read back with MLflow's own
client: experiments and runs named like the folders, params, per-epoch metrics, files."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import TINY, compose_train, run_cli

from prostate_seg.training.checks import check_train_config
from prostate_seg.errors import ConfigError

mlflow = pytest.importorskip("mlflow", reason="MLflow is the optional extra [mlflow]")


def _runs(store: str, experiment: str):
    mlflow.set_tracking_uri(store)
    return mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.run_name"])


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.slow
def test_sweep_is_one_experiment_with_a_run_per_job_and_the_report(prepared, tmp_path):
    done = run_cli("train.py", "-m", "logger=tensorboard_mlflow", "loss.alpha=0.3,0.7",
                   "hydra.sweep.dir=sweep", "hydra.sweep.subdir=a${loss.alpha}", *TINY,
                   f"data.dir={prepared}", "trainer.max_epochs=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    # The default store: a SQLite database under outputs/ of the folder the command ran in.
    store = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    runs = _runs(store, "sweep")
    assert list(runs["tags.mlflow.runName"]) == ["a0.3", "a0.7", "report"]
    client = mlflow.MlflowClient(store)
    for _, run in runs.iloc[:2].iterrows():
        folder = tmp_path / "sweep" / run["tags.mlflow.runName"]
        results = json.loads((folder / "results.json").read_text())
        assert run["tags.prostate_seg.run_dir"] == str(folder)
        assert run["params.loss"] == f"tversky_a{results['alpha']}"
        assert float(run["params.beta"]) == pytest.approx(1 - results["alpha"])
        assert (run["params.seed"], run["params.fold"], run["params.lr"], run["params.batch_size"],
                run["params.image_size"]) == ("0", "0", "0.003", "8", "48")
        assert run["params.identity"] == results["identity"]
        assert run["metrics.results/select/dice"] == pytest.approx(results["select/dice"])
        history = client.get_metric_history(run.run_id, "train/loss")
        assert len(history) == 2  # one per epoch
        assert {h.step for h in client.get_metric_history(run.run_id, "epoch")} >= {
            h.step for h in history}
        files = _artifacts(client, run.run_id)
        assert {"results.json", "per_patient.csv", "config.yaml",
                "select/predictions/step0000.png"} <= files
        assert run["metrics.results/val/dice_original"] == pytest.approx(
            results["val/dice_original"])
        assert list(folder.glob("events.out.tfevents.*"))  # TensorBoard as well
    report = runs.iloc[2]
    assert {"report/results.md", "report/results.csv"} <= _artifacts(client, report.run_id)
    assert str(tmp_path / "outputs" / "mlartifacts") in runs.iloc[0].artifact_uri


def test_a_resumed_run_continues_its_mlflow_run(prepared, tmp_path, caplog):
    from prostate_seg.training.fit import train

    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = tmp_path / "runs" / "job"
    overrides = [*TINY, f"data.dir={prepared}", "logger=mlflow",
                 f"logger.mlflow.tracking_uri={store}"]
    train(compose_train([*overrides, "trainer.max_epochs=1"], run_dir))
    first = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    # Continue the same folder from its last.ckpt for a second epoch (an explicit checkpoint
    # path: ckpt_path=last would refuse the changed max_epochs as another config).
    last = run_dir / "checkpoints" / "last.ckpt"
    train(compose_train([*overrides, "trainer.max_epochs=2", f"ckpt_path={last}"], run_dir))

    runs = _runs(store, str(tmp_path / "runs"))  # outside the working directory: full path
    assert list(runs.run_id) == [first] and list(runs["tags.mlflow.runName"]) == ["job"]
    losses = mlflow.MlflowClient(store).get_metric_history(first, "train/loss")
    assert len(losses) == 2
    assert runs.loc[0, "metrics.results/epochs_trained"] == 2
    # MLflow params cannot change: the run keeps its first max_epochs, and says so.
    assert runs.loc[0, "params.max_epochs"] == "1"
    assert "keeps its earlier max_epochs=1" in caplog.text


def test_missing_mlflow_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    cfg = compose_train(["logger=mlflow", "data.dir=."], tmp_path)
    del cfg.hydra  # as a run's task sees its config
    with pytest.raises(ConfigError) as error:
        check_train_config(cfg)
    assert str(error.value) == ("logger.mlflow: prostate_seg.training.tracking.MLflowRunLogger needs "
                                "mlflow, which is not installed "
                                '(pip install "prostate-seg[mlflow]")')


def _refused_with_nothing_written(tmp_path, *args: str) -> str:
    """The command's one error line; it exits 2 and writes nothing into ``tmp_path``."""
    before = sorted(tmp_path.rglob("*"))
    done = run_cli("train.py", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert sorted(tmp_path.rglob("*")) == before  # no run folder, store or log
    return line


@pytest.mark.parametrize("uri, problem", [
    ("ftp://host/mlruns", "MLflow has no tracking store for ftp:"),
    ("sqlite:///{file}/mlflow.db", "{file} is a file, not a folder"),
    ("file:{file}/mlruns", "{file} is a file, not a folder"),
    ("{file}", "{file} is a file, not a folder"),  # a plain path: a folder of runs
    ("{file}/deeper/mlruns", "{file} is a file, not a folder"),
])
def test_a_tracking_store_that_cannot_be_used_is_refused_before_the_data_check(
        tmp_path, uri, problem):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    uri, problem = uri.format(file=a_file), problem.format(file=a_file)
    # data.dir does not exist: the store is named first, before any data is looked at
    line = _refused_with_nothing_written(tmp_path, "logger=mlflow",
                                         f"logger.mlflow.tracking_uri={uri}", "data.dir=nowhere",
                                         "hydra.run.dir=run")
    assert line.startswith(f"error: logger.mlflow.tracking_uri={uri}: {problem}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_store_folder_is_refused(prepared, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        uri = f"sqlite:///{locked}/store/mlflow.db"
        line = _refused_with_nothing_written(tmp_path, "logger=mlflow", *TINY,
                                             f"logger.mlflow.tracking_uri={uri}",
                                             f"data.dir={prepared}", "hydra.run.dir=run")
        assert line == f"error: logger.mlflow.tracking_uri={uri}: {locked} is not writable"
    finally:
        locked.chmod(0o755)


def test_a_sweep_with_an_unusable_store_is_refused_before_any_job(prepared, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    uri = f"sqlite:///{a_file}/mlflow.db"
    line = _refused_with_nothing_written(tmp_path, "-m", "logger=mlflow", "loss.alpha=0.3,0.7",
                                         f"logger.mlflow.tracking_uri={uri}", *TINY,
                                         f"data.dir={prepared}", "hydra.sweep.dir=sweep")
    # the sweeper checks every job before any starts, and names the first it refuses
    assert line == (f"error: job loss.alpha=0.3: logger.mlflow.tracking_uri={uri}: {a_file} "
                    "is a file, not a folder")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.extra  # a server process: in make check-extra
def test_the_mlflow_server_serves_the_trained_run(prepared, tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    done = run_cli("train.py", "logger=mlflow", f"logger.mlflow.tracking_uri={store}", *TINY,
                   f"data.dir={prepared}", "trainer.max_epochs=1", "hydra.run.dir=runs/job",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "job" / "results.json").read_text())

    port, log = _free_port(), (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow server did not answer in 60 s"
                time.sleep(1)
        # the experiment is the run folder's parent, relative to where the command ran
        experiment = _api(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=runs")
        found = _api(base, "/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [experiment["experiment"]["experiment_id"]]})
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    (run,) = found["runs"]
    assert run["info"]["run_name"] == "job" and run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert params["loss"] == results["loss"] and float(params["alpha"]) == results["alpha"]
    assert params["identity"] == results["identity"]
    assert {"train/loss", "select/loss", "select/dice"} <= set(metrics)
    assert metrics["results/select/dice"] == pytest.approx(results["select/dice"])
