"""What a run is: the code that computed it, the data by content, the number of processes it
trained on; a run folder is never continued or skipped under another of these, and a run
completed without its per-patient results gets them when they are asked for."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, TINY, compose_train

from prostate_seg.data.prepare import PrepareSettings, prepare
from prostate_seg.errors import ConfigError
from prostate_seg import runs
from prostate_seg.runs import (
    RunStatus,
    code_version,
    config_identity,
    describe_code,
    mixed_code,
)
from prostate_seg.training.fit import identity_of, refuse_other_config, train


# --- the code -------------------------------------------------------------------------------
def _git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


def _code_version_of(package_parent):
    """code_version() of the package copy in ``package_parent``, imported from there."""
    out = subprocess.run(
        [sys.executable, "-c", "import json; from prostate_seg.runs import code_version; "
                               "import prostate_seg; print(prostate_seg.__file__); "
                               "print(json.dumps(code_version()))"],
        cwd=package_parent, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(package_parent)}).stdout.splitlines()
    assert out[0] == str(package_parent / "prostate_seg" / "__init__.py")  # the copy, not ours
    return json.loads(out[1])


NEEDS_GIT = pytest.mark.skipif(shutil.which("git") is None, reason="no git on this machine")


@NEEDS_GIT
@pytest.mark.skipif(not (REPO / ".git").exists(), reason="the project is not a git checkout here")
def test_the_code_version_is_the_checkout_commit_and_its_uncommitted_changes():
    here = code_version()
    assert here["commit"] == _git(REPO, "rev-parse", "HEAD")
    assert here["dirty"] == bool(_git(REPO, "status", "--porcelain", "--untracked-files=no"))


@NEEDS_GIT
def test_the_code_version_follows_every_change_of_a_checkout_and_is_the_version_installed(
        tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "prostate_seg", checkout / "prostate_seg",
                    ignore=shutil.ignore_patterns("__pycache__"))
    installed = _code_version_of(checkout)  # no git: a package as pip installs it
    assert installed == {"version": _code_version_of(checkout)["version"]}
    _git(checkout, "init", "-q")
    _git(checkout, "add", ".")
    _git(checkout, "commit", "-q", "-m", "first")
    clean = _code_version_of(checkout)
    assert clean == {**installed, "commit": _git(checkout, "rev-parse", "HEAD"), "dirty": False}
    module = checkout / "prostate_seg" / "errors.py"
    module.write_text(module.read_text() + "\n# one change\n")
    edited = _code_version_of(checkout)
    module.write_text(module.read_text() + "# another\n")
    edited_again = _code_version_of(checkout)
    assert edited["commit"] == clean["commit"] and edited["dirty"] and edited_again["dirty"]
    assert len({edited["changes"], edited_again["changes"]}) == 2
    _git(checkout, "commit", "-q", "-am", "second")
    committed = _code_version_of(checkout)
    assert not committed["dirty"] and committed["commit"] not in (clean["commit"], None)


def test_status_and_results_record_the_code_of_the_run(trained_run):
    status = json.loads((trained_run / "status.json").read_text())
    results = json.loads((trained_run / "results.json").read_text())
    assert status["code"] == results["code"] == code_version()
    assert status["identity"]["config"]["code.commit"] == code_version()["commit"]


def _trained_run_config(prepared, run_dir):
    return compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=8",
                          "callbacks.early_stopping.patience=8", "loss=bce_tversky"], run_dir)


def test_a_run_is_never_continued_or_skipped_under_other_code(trained_run, prepared,
                                                              monkeypatch):
    cfg = _trained_run_config(prepared, trained_run)
    stored = identity_of(cfg)
    assert stored.hash == RunStatus(trained_run).identity.hash
    before = (trained_run / "results.json").read_text()
    ours = describe_code(code_version())
    other = {"version": code_version()["version"], "commit": "f" * 40, "dirty": False}
    monkeypatch.setattr(runs, "code_version", lambda: other)
    identity = identity_of(cfg)
    assert identity.hash != stored.hash and identity.group != stored.group  # never pooled
    with pytest.raises(ConfigError) as refused:
        train(cfg)
    message = str(refused.value)
    assert "\n" not in message
    assert f"(code: {ours} -> {other['version']} commit ffffffffffff);" in message, message
    assert (trained_run / "results.json").read_text() == before


def test_runs_of_different_code_are_named_in_one_line():
    def identity(**code):
        return {"hash": "h", "group": "g", "config": {"loss.name": "bce",
                                                      **{f"code.{k}": v for k, v in code.items()}}}

    same = [identity(version="0.1.0", commit="a" * 40, dirty=False)] * 3
    assert mixed_code(same) is None
    mixed = [*same, identity(version="0.1.0", commit="b" * 40, dirty=True, changes="c0ffee"),
             identity(version="0.2.0"), None]
    assert mixed_code(mixed) == (
        "runs made by different code: 3 by 0.1.0 commit aaaaaaaaaaaa; 1 by 0.1.0 commit "
        "bbbbbbbbbbbb with uncommitted changes c0ffee; 1 by 0.2.0; 1 by unrecorded code")


# --- the processes --------------------------------------------------------------------------
def test_the_devices_enter_as_the_number_of_processes(monkeypatch, tmp_path):
    def world(gpus, *overrides):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        cfg = compose_train(["trainer=gpu", "data.dir=.", *overrides], tmp_path)
        return config_identity(cfg, "data", "split")

    four = world(4, "trainer.devices=4")
    assert four.config["trainer.world_size"] == 4
    for same in (["trainer.devices=-1"], ["trainer.devices=auto"], ["trainer.devices=[0,1,2,3]"],
                 ["trainer.devices=2", "+trainer.num_nodes=2"]):
        assert world(4, *same).hash == four.hash, same
    assert world(2, "trainer.devices=-1").hash != four.hash
    assert world(4, "trainer=ddp").config["trainer.sync_batchnorm"] is True
    unsynced = world(4, "trainer=ddp", "trainer.sync_batchnorm=false")
    assert unsynced.hash != world(4, "trainer=ddp").hash
    # one process: nothing to share, the same run whatever sync_batchnorm says
    assert world(4, "trainer=ddp", "trainer.devices=1").hash == world(4, "trainer.devices=1").hash
    assert world(0, "trainer.devices=-1").config["trainer.world_size"] is None


def test_a_host_without_gpus_checks_gpu_jobs_on_everything_but_their_count(prepared_copy,
                                                                           tmp_path, monkeypatch):
    """A sweep submitted from a login node: all-GPU jobs cannot be counted there."""
    run_dir = tmp_path / "job"
    overrides = ["trainer=gpu", "trainer.devices=-1", f"data.dir={prepared_copy}"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = compose_train(overrides, run_dir)
    status = RunStatus(run_dir)
    status.running(resumed_from=None, identity=identity_of(cfg))
    status.completed()
    (run_dir / "results.json").write_text(json.dumps({"loss": "dice"}))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    refuse_other_config(cfg, run_dir)  # not refused
    with pytest.raises(ConfigError, match=r"optimizer.lr: 0.0001 -> 0.5\)"):
        refuse_other_config(compose_train([*overrides, "optimizer.lr=0.5"], run_dir), run_dir)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"trainer.world_size: 4 -> 2\)"):
        refuse_other_config(cfg, run_dir)


# --- the data -------------------------------------------------------------------------------
def test_data_prepared_again_are_not_the_completed_run_s_data(phantoms, tmp_path):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    prepare(phantoms, data, PrepareSettings(image_size=48))
    cfg = compose_train([*TINY, f"data.dir={data}", "trainer.max_epochs=1"], run_dir)
    train(cfg)
    split = (data / "split.json").read_bytes()
    # the same scans but one, whose intensities changed (not its mask): same names, sizes,
    # gland areas and settings, other pixels
    scans = tmp_path / "scans"
    shutil.copytree(phantoms, scans)
    path = sorted((scans / "images").iterdir())[0]
    image = nib.load(path)
    voxels = np.asarray(image.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.sqrt(voxels - voxels.min()), image.affine, image.header), path)
    for source, settings in ((scans, PrepareSettings(image_size=48)),
                             (phantoms, PrepareSettings(image_size=48, window=(2.0, 98.0)))):
        prepare(source, data, settings, overwrite=True)
        (data / "split.json").write_bytes(split)  # the same patients, split alike
        with pytest.raises(ConfigError) as refused:
            train(cfg)
        message = str(refused.value)
        assert "\n" not in message and "(data.content: " in message and "data.split" not in message


# --- a completed run without its per-patient results ----------------------------------------
def test_a_completed_run_gets_its_per_patient_results_when_they_are_asked_for(prepared,
                                                                               tmp_path):
    run_dir = tmp_path / "run"
    common = [*TINY, f"data.dir={prepared}", "trainer.max_epochs=2"]
    train(compose_train([*common, "evaluate_best=false"], run_dir))
    first = json.loads((run_dir / "results.json").read_text())
    assert not (run_dir / "per_patient.csv").exists() and "val/dice_original" not in first
    trained = {p: p.read_bytes() for p in [*run_dir.glob("metrics/*/metrics.csv"),
                                            run_dir / "checkpoints" / "last.ckpt"]}

    results = train(compose_train(common, run_dir))  # scored, not trained again
    assert (run_dir / "per_patient.csv").exists()
    stored = json.loads((run_dir / "results.json").read_text())
    assert stored == results and 0.0 <= stored["val/dice_original"] <= 1.0
    assert stored["epochs_trained"] == first["epochs_trained"] and "select/dice" in stored
    assert {p: p.read_bytes() for p in trained} == trained
    assert train(compose_train(common, run_dir)) == stored  # now complete: nothing to do

    # without a best checkpoint to score, the run is trained again (not continued from the
    # last.ckpt of its finished training)
    (run_dir / "per_patient.csv").unlink()
    os.remove(stored["best_checkpoint"])
    again = train(compose_train(common, run_dir))
    assert json.loads((run_dir / "status.json").read_text())["resumed_from"] is None
    assert (run_dir / "per_patient.csv").exists() and os.path.exists(again["best_checkpoint"])
    assert again["epochs_trained"] == 2


def test_a_run_trained_anew_does_not_continue_the_last_checkpoint_it_replaces(prepared, tmp_path):
    """resume=false beside a last.ckpt (here of another seed): Lightning's fit would continue
    from any last.ckpt in the folder when given no checkpoint."""
    run_dir = tmp_path / "run"
    common = [*TINY, f"data.dir={prepared}", "trainer.max_epochs=2"]
    train(compose_train([*common, "trainer.max_epochs=1"], run_dir))
    (first,) = runs.read_history(run_dir)
    train(compose_train([*common, "seed=1", "resume=false"], run_dir))
    again = runs.read_history(run_dir)
    # epoch 0 trained again, from seed 1, then epoch 1
    assert len(again) == 2 and again[0]["train/loss"] != first["train/loss"]
    assert json.loads((run_dir / "status.json").read_text())["resumed_from"] is None


def test_a_run_started_from_another_runs_weights_says_so_through_its_resumes(tmp_path):
    """The report leaves such a run out; resuming from its own last.ckpt keeps the origin, a
    start from scratch in the same folder clears it."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    identity = runs.config_identity(OmegaConf.create({"seed": 0}), "data", "split")

    def started_from(resumed_from):
        status = runs.RunStatus(run_dir)
        status.running(resumed_from=resumed_from, identity=identity)
        return json.loads(status.path.read_text())["started_from"]

    assert started_from(str(tmp_path / "other" / "last.ckpt")) == str(tmp_path / "other" /
                                                                      "last.ckpt")
    assert started_from(str(run_dir / "checkpoints" / "last.ckpt")) == str(tmp_path / "other" /
                                                                           "last.ckpt")
    assert started_from(None) is None


@pytest.mark.parametrize("loss, alpha, beta", [
    (["loss=dice"], 0.5, 0.5),  # fixed by the loss, not set in its config: recorded all the same
    (["loss=tversky", "loss.alpha=0.35"], 0.35, 0.65), (["loss=bce"], None, None)])
def test_a_run_records_its_losss_alpha_and_beta(loss, alpha, beta, tmp_path):
    from prostate_seg.training.fit import hparams_of

    recorded = hparams_of(compose_train([*loss, "data.dir=."], tmp_path))
    assert (recorded["alpha"], recorded["beta"]) == (alpha, beta)
