"""The sweeper: every job checked and named before the first starts, one sweep per folder."""


import pytest
from helpers import TINY, run_cli


SMALL = [o for o in TINY if not o.startswith("trainer=")] + ["trainer=cpu", "trainer.max_epochs=1"]


@pytest.mark.parametrize("overrides, message", [
    (["loss.alpha=0.25,1.5"], "job loss.alpha=1.5: loss.alpha=1.5: must be a number in [0, 1]"),
    (["loss.smooth=1,2", "hydra.sweep.subdir=same"], "would share the folder"),
])
def test_a_bad_job_stops_the_sweep_before_anything_starts(prepared_copy, tmp_path, overrides,
                                                          message):
    sweep = tmp_path / "sweep"
    result = run_cli("train.py", "-m", f"data.dir={prepared_copy}", *SMALL, *overrides,
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("error:") == 1, result.stderr
    assert not sweep.exists()  # nothing written, not even an empty sweep folder


def test_a_dry_run_lists_the_checked_jobs_and_writes_nothing(prepared_copy, tmp_path):
    sweep = tmp_path / "sweep"
    (prepared_copy / "split.json").unlink(missing_ok=True)  # a new dataset's first sweep
    args = ("train.py", "-m", f"data.dir={prepared_copy}", *SMALL, "loss=bce,tversky",
            "loss.alpha=0.25,0.75", f"hydra.sweep.dir={sweep}", "hydra.sweeper.dry_run=true")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = [line.split("] ", 1)[1] for line in result.stdout.splitlines() if "] job " in line]
    assert listed == ["job 1/3: bce-fold0-seed0 (loss=bce)",
                      "job 2/3: tversky_a0.25-fold0-seed0 (loss=tversky loss.alpha=0.25)",
                      "job 3/3: tversky_a0.75-fold0-seed0 (loss=tversky loss.alpha=0.75)"]
    assert f"dry run: 3 jobs checked; none launched, nothing written (the sweep folder would " \
           f"be {sweep})" in result.stdout
    assert not sweep.exists() and not (tmp_path / "outputs").exists()  # no folder, no logs
    assert not (prepared_copy / "split.json").exists()  # nor a split that binds later runs
    bad = run_cli(*args, "loss.smooth=-1", cwd=tmp_path)  # checked as a sweep is
    assert bad.returncode == 2 and "loss.smooth=-1" in bad.stderr


def test_unprepared_data_stops_the_sweep_in_one_line(phantoms, tmp_path):
    """Scans, not a prepared dataset (a missing folder is the same check: test_faults)."""
    result = run_cli("train.py", "-m", f"data.dir={phantoms}", *SMALL, "loss.alpha=0.25,0.5",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: job loss.alpha=0.25: data.dir=") and len(
        [line for line in lines if "Traceback" in line]) == 0, result.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_named_job_is_the_config_hydra_composes_with_its_name(tmp_path):
    """The sweeper composes each job once and adds its folder name to that config; the
    launcher gets this config back: the same as Hydra's own composition with the name."""
    import pickle

    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from prostate_seg.config import initialize_configs

    GlobalHydra.instance().clear()
    with initialize_configs():  # (Hydra's plugin scan imports the sweeper module anew)
        from hydra_plugins.study_sweeper.study_sweeper import ComposedJobs, check_and_name_jobs

        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(
            "train", ["data.dir=.", f"hydra.sweep.dir={tmp_path}"], RunMode.MULTIRUN)
        composed = ComposedJobs(loader)
        jobs = check_and_name_jobs(master, composed, None,
                                   [["loss=bce", "seed=0"], ["loss=tversky", "seed=0"]])
        assert jobs == [["loss=bce", "seed=0", "hydra.sweep.subdir=bce-fold0-seed0",
                         "++hydra.job.env_set.PROSTATE_SEG_JOB=1/2"],
                        ["loss=tversky", "seed=0", "hydra.sweep.subdir=tversky_a0.5-fold0-seed0",
                         "++hydra.job.env_set.PROSTATE_SEG_JOB=2/2"]]
        added = check_and_name_jobs(master, composed, None,  # a key a job adds, swept
                                    [["+trainer.gradient_clip_val=0.5"],
                                     ["+trainer.gradient_clip_val=1.0"]])
        assert [job[1] for job in added] == ["hydra.sweep.subdir=tversky_a0.5-fold0-seed0-"
                                             "gradient_clip_val0.5",
                                             "hydra.sweep.subdir=tversky_a0.5-fold0-seed0-"
                                             "gradient_clip_val1.0"]
        for job in jobs:
            given = composed.load_sweep_config(master, job)
            assert OmegaConf.to_yaml(given) == OmegaConf.to_yaml(
                loader.load_sweep_config(master, job))
            given.seed = 7  # a copy: the next launcher gets the checked config again
            assert composed.load_sweep_config(master, job).seed == 0
    GlobalHydra.instance().clear()
    assert pickle.loads(pickle.dumps(composed)).jobs == {}  # not shipped with every SLURM task
