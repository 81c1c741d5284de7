"""The command line's answers to mistakes, each its own process as a user meets it: one line
naming the key or file, exit status 2, no traceback, no folder or file left behind."""

import subprocess
import sys
import time

import pytest
from helpers import REPO, run_cli

from prostate_seg.command_line import config_problem


@pytest.mark.parametrize("override, message", [
    ("loss.alpha=1.5", "loss.alpha=1.5: must be a number in [0, 1]"),
    # found by the network's constructor, which Hydra's instantiate wraps in its own error
    ("model.net.norm=layer", "model.net.norm=layer: choose one of batch, instance"),
    # a logger's arguments, against its signature: it is built only once the folder is made
    ("+logger.csv.bogus=1", "logger.csv.bogus: CSVLogger takes no such argument; it takes "
     "save_dir, name, version, prefix, flush_logs_every_n_steps"),
    # the datamodule's own, built before the run folder is claimed
    ("data._target_=nope.DataModule", "data: Error loading 'nope.DataModule': "
     "ModuleNotFoundError(\"No module named 'nope'\"); Are you sure that module 'nope' is "
     "installed?"),
])
def test_cli_config_error_is_one_line_without_traceback_and_leaves_no_folder(
        override, message, prepared, tmp_path):
    run_dir = tmp_path / "outputs" / "runs" / "day" / "run"
    args = ("train.py", f"data.dir={prepared}", override, f"hydra.run.dir={run_dir}")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {message}"
    assert "Traceback" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # the run folder and the empty ones above it are gone
    if override != "loss.alpha=1.5":
        return
    traced = run_cli(*args, cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert traced.returncode != 0 and "Traceback" in traced.stderr
    assert "ConfigError: loss.alpha=1.5" in traced.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("users_choice, child_shows_tracebacks", [(None, "False"), ("1", "True")])
def test_jobs_a_tool_starts_keep_the_users_traceback_choice(users_choice, child_shows_tracebacks,
                                                            monkeypatch):
    """A sweep's launcher sets HYDRA_FULL_ERROR=1 for Hydra in its own process; the jobs it
    starts (gpu_pool, SLURM) inherit the environment but still end a user error in one line
    unless the user asked for tracebacks."""
    from prostate_seg.cli import TRACEBACKS, one_line_errors

    monkeypatch.delenv(TRACEBACKS, raising=False)
    if users_choice is None:
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    else:
        monkeypatch.setenv("HYDRA_FULL_ERROR", users_choice)
    with one_line_errors():
        job = subprocess.run([sys.executable, "-c", "from prostate_seg.cli import "
                              "tracebacks_wanted; print(tracebacks_wanted())"],
                             capture_output=True, text=True, check=True)
    assert job.stdout.strip() == child_shows_tracebacks


def test_cli_unknown_group_option_lists_the_valid_ones(tmp_path):
    result = run_cli("train.py", "loss=focal", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: loss=focal: unknown loss; valid: bce,")
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_unknown_key_is_one_line_with_the_closest_key_and_writes_nothing(tmp_path):
    for args in (["loss.alpa=0.3"], ["-m", "loss.alpa=0.3,0.5"]):
        result = run_cli("train.py", *args, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr == "error: loss.alpa: no such key; did you mean loss.alpha?\n"
        assert list(tmp_path.iterdir()) == []


# What takes seconds to import; a command that only answers (help, a mistake) needs none of it.
HEAVY_IMPORTS = {"torch", "pytorch_lightning", "lightning", "torchmetrics", "albumentations",
                 "cv2", "matplotlib", "scipy", "numpy", "mlflow", "monai", "tensorboard"}


@pytest.mark.parametrize("args, answer", [
    (["--help"], "python train.py [group=option ...] [key=value ...]"),
    (["loss.alpa=0.3"], "error: loss.alpa: no such key; did you mean loss.alpha?"),
    (["data.dir=missing"], "error: data.dir=missing: folder not found"),
])
def test_help_and_mistakes_answer_without_the_heavy_imports(args, answer, tmp_path):
    """Within seconds (about 1 s on an idle core; 9 s when they imported torch): none of the
    stage's libraries is imported (Python's own -X importtime lists every import)."""
    start = time.monotonic()
    result = run_cli("-X", "importtime", str(REPO / "train.py"), *args, cwd=tmp_path)
    took = time.monotonic() - start
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported and not imported & HEAVY_IMPORTS, imported & HEAVY_IMPORTS
    output = [line for line in (result.stdout + result.stderr).splitlines()
              if not line.startswith("import time:")]
    assert any(line.startswith(answer) for line in output), output
    assert took < 5.0 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["-m", "prostate_seg", "prepare", "input_dir=nothere", "output_dir=out"],
     "error: input_dir=nothere: folder not found"),
    (["-m", "prostate_seg", "synthetic", "output_dir=out", "num_patients=0"], "error: num_patients"),
    (["evaluate.py", "ckpt_path=missing.ckpt"], "error: ckpt_path=missing.ckpt: checkpoint file not found"),
    (["evaluate.py", "ckpt_path=."], "error: ckpt_path=.: is a folder, not a checkpoint file"),
    (["predict.py", "ckpt_path=missing.ckpt", "input=a.nii.gz", "output=b.nii.gz"], "error: "),
])
def test_a_tool_that_fails_leaves_no_log_folder(args, message, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


PREPARE = ["-m", "prostate_seg", "prepare", "input_dir=in", "output_dir=out"]
PREDICT = ["predict.py", "ckpt_path=m.ckpt", "input=a.nii.gz", "output=b.nii.gz"]


@pytest.mark.parametrize("args, message", [
    ([*PREPARE, "image_size=abc"], "image_size=abc: must be an integer in 8..4096"),
    ([*PREPARE, "image_size=[1,2]"], "image_size=[1, 2]: must be an integer in 8..4096"),
    ([*PREPARE, "image_size=100000"], "image_size=100000: must be an integer in 8..4096"),
    ([*PREPARE, "workers=2.5"], "workers=2.5: must be an integer >= 0"),
    ([*PREPARE, "window=5"], "window=5: must be a list of 2 numbers, each a number in [0, 100]"),
    ([*PREPARE, "window=[1,2,3]"], "window=[1, 2, 3]: must be a list of 2 numbers"),
    ([*PREPARE, "mask_labels=1"], "mask_labels=1: must be a list of 1 or more numbers"),
    ([*PREPARE, "overwrite=yes"], "overwrite=yes: must be true or false"),
    (["-m", "prostate_seg", "synthetic", "output_dir=out", "size=[3]"],
     "size=[3]: must be an integer in 32..4096"),
    (["-m", "prostate_seg", "synthetic", "output_dir=out", "seed=-1"],
     "seed=-1: must be an integer in 0..4294967295"),
    ([*PREDICT, "batch_size=many"], "batch_size=many: must be an integer >= 1"),
    ([*PREDICT, "tta=maybe"], "tta=maybe: must be true or false"),
    (["evaluate.py", "ckpt_path=m.ckpt", "batch_size=1.5"], "batch_size=1.5: must be an integer"),
    (["train.py", "data.dir=.", "data.test_patients=Case00"],
     "data.test_patients=Case00: must be a list of 1 or more names"),
    (["train.py", "data.dir=.", "model.net.features=8"],
     "model.net.features=8: must be a list of 2 or more numbers, each an integer >= 1"),
    (["train.py", "data.dir=.", "optimizer.lr=fast"], "optimizer.lr=fast: must be > 0"),
    (["train.py", "data.dir=.", "augment.scale_p=2"],
     "augment.scale_p=2: must be a number in [0, 1]"),
    (["train.py", "data.dir=.", "~augment"],
     "~augment: train cannot run without augment; choose one of default, study instead"),
    (["train.py", "data.dir=.", "~paths"], "~paths: train cannot run without paths; choose one"),
    (["train.py", "-m", "data.dir=.", "loss=bce,dice", "~seed"],  # before the sweep starts
     "~seed: train cannot run without seed; give it a value instead"),
    (["train.py", "data.dir=.", "~model.net"], "~model.net: train cannot run without model.net"),
    (["evaluate.py", "ckpt_path=m.ckpt", "~inference"],
     "~inference: evaluate cannot run without inference; choose one of default, plain instead"),
    ([*PREDICT, "~largest_component"], "~largest_component: predict cannot run without"),
    (["-m", "prostate_seg", "prepare", "input_dir=a", "output_dir=b", "~window"],
     "~window: prepare cannot run without window; give it a value instead"),
    (["evaluate.py", "ckpt_path=m.ckpt", "subset=null"], "subset=null: choose one of val, test"),
    (["evaluate.py", "ckpt_path=m.ckpt", "device=null"],
     "device=null: choose auto, cpu, cuda or cuda:N"),
    (["evaluate.py", "ckpt_path=m.ckpt", "device=cuda:99"], "device=cuda:99: this machine has"),
    ([*PREDICT, "device=tpu"], "device=tpu: choose auto, cpu, cuda or cuda:N"),
    # the output's folder is made with its first file, not before a checkpoint is read
    (["evaluate.py", "ckpt_path=m.ckpt", "output=scores/x.csv"], "ckpt_path=m.ckpt: "),
    (["evaluate.py", "ckpt_path=m.ckpt", "output=m.ckpt", "overwrite=true"],
     "output=m.ckpt would replace the checkpoint it evaluates"),
    (["evaluate.py", "ckpt_path=5"], "ckpt_path=5: must be a path"),
    (["predict.py", "ckpt_path=null", "input=a", "output=b"], "ckpt_path=null: must be a path"),
    (["-m", "prostate_seg", "synthetic", "output_dir="], "output_dir='': must be a path"),
    (["train.py", "data.dir=[a]"], "data.dir=[a]: must be a path"),
    (["train.py", "data.dir=.", "~los"], "los: no such key; did you mean loss?"),
    (["train.py", "data.dir=.", "~callbacks.early_stopping.monitor"],
     "~callbacks.early_stopping.monitor: train cannot run without"),
    (["evaluate.py", "--bogus"], "unrecognized arguments: --bogus (--help lists"),
    (["train.py", "data.dir=.", "paths.output_root=null"], "paths.output_root=null: must be a"),
    (["train.py", "data.dir=.", "~hydra/job_logging"],
     "~hydra/job_logging: train cannot run without hydra/job_logging; choose one of"),
    (["-m", "prostate_seg", "synthetic", "output_dir=o",
      "hydra.run.dir=${oc.env:PS_NO_SUCH_VARIABLE}/x"],
     "hydra.run.dir: KeyError raised while resolving interpolation"),
    # a tool's sweep: every job checked before the first writes anything
    (["-m", "prostate_seg", "synthetic", "-m", "output_dir=s", "num_patients=1,0"],
     "job num_patients=0: num_patients=0: must be an integer >= 1"),
    (["-m", "prostate_seg", "synthetic", "-m", "output_dir=s", "num_patients=1,2"],
     "jobs 0 and 1 would write the same output_dir=s (output_dir=s num_patients=1 / "
     "output_dir=s num_patients=2); name what tells them apart in it: "
     "'output_dir=s_${num_patients}'"),
    (["evaluate.py", "-m", "ckpt_path=m.ckpt", "data.dir=a,b"],  # the table's name, derived
     "jobs 0 and 1 would write the same output=m.ckpt.eval-lcc-tta.csv"),
    (["predict.py", "-m", "ckpt_path=m.ckpt", "input=a.nii.gz", "output=b.nii.gz",
      "batch_size=1,${nope}"], "job batch_size=$\\{nope\\}: batch_size: refers to nope"),
    (["train.py", "-m", "data.dir=.", "seed=${seed}"],  # a sweep's job named from a cycle
     r"job data.dir=. seed=$\{seed\}: hydra.sweep.subdir: Recursive interpolation detected"),
    (["train.py", "data.dir=.", "~trainer.accelerator"],
     "~trainer.accelerator: train cannot run without trainer.accelerator"),
    (["train.py", "data.dir=.", "model.net=null"],
     "model.net=null in config 'train': train needs a group of settings there"),
    (["train.py", "data.dir=.", "loss.smooth=${nope}"], "loss.smooth: refers to nope, which"),
    (["train.py", "data.dir=.", "trainer.max_epochs=${oc.env:PS_NO_SUCH_VARIABLE}"],
     "trainer.max_epochs: KeyError raised while resolving interpolation"),
    (["train.py", "data.dir=.", "trainer.max_epochs=${trainer.max_epochs}"],
     "trainer.max_epochs: Recursive interpolation detected"),
    # Hydra reads a value before removing it: the run's folder is not known yet, null is absent
    (["train.py", "data.dir=.", "~trainer.default_root_dir"],
     "~trainer.default_root_dir: Hydra reads a value before removing it, and ${paths.output_dir}"),
    (["train.py", "data.dir=.", "trainer.devices=null", "~trainer.devices"],
     "~trainer.devices: it is null already"),
    (["train.py", "data.dir=.", "trainer.max_epochs=${hydra:nope}"],  # Hydra would give null
     "trainer.max_epochs: refers to hydra:nope, which Hydra's settings lack"),
    (["train.py", "-m", "data.dir=.", "scheduler=cosine,null"], "scheduler=cosine,null: Hydra "
     "sweeps a group over its options' names, and null is not one; for runs without scheduler"),
    (["train.py", "-m", "data.dir=.", "seed=0,1", "hydra.job.chdir=true"],
     "hydra.job.chdir=true: the commands keep the folder they run in"),
    # printing the config resolved: the key that cannot be, not OmegaConf's traceback
    (["train.py", "--cfg", "job", "--resolve", "loss.alpha=${oc.env:PS_NO_SUCH_VARIABLE}"],
     "loss.alpha: KeyError raised while resolving interpolation"),
    (["predict.py", "--cfg", "job", "--resolve", "output=${nope}"], "output: refers to nope"),
    (["train.py", "--cfg", "all", "--resolve", "hydra.run.dir=${nope}"],
     "hydra.run.dir: refers to nope"),
    (["train.py", "--cfg", "hydra", "--resolve"], "--cfg hydra --resolve: Hydra resolves its "
     "settings apart from the config, which they refer to (paths.output_root); --cfg all"),
])
def test_a_value_of_the_wrong_type_is_one_line_before_any_work(args, message, tmp_path):
    """Any command, any numeric, list or yes/no key: one line naming key and value, exit 2,
    before a file is read (the inputs named here do not exist) and nothing written."""
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["train.py", "--config-name", "predict"],
     "predict: this config lacks seed, resume, verbose, evaluate_best and 9 more, which train"),
    (["predict.py", "--config-name", "train"], "train: this config lacks tta, largest_component"),
    (["evaluate.py", "--config-name", "synthetic"],
     "synthetic: this config lacks tta, largest_component, ckpt_path, data and 4 more"),
    (["train.py", "--config-dir", "{mine}", "--config-name", "bare"],
     "bare: this config lacks ckpt_path, resume"),
    (["train.py", "--config-path", "{mine}", "--config-name", "bare"],
     "bare: this config lacks ckpt_path, resume"),
    (["train.py", "--config-dir", "{mine}", "--config-name", "mine", "~seed"],
     "~seed: train cannot run without seed; give it a value instead"),
    (["train.py", "--config-dir", "{mine}", "--config-name", "mine", "~data.dir"],
     "~data.dir: train cannot run without data.dir"),
    (["train.py", "--config-path", "{mine}", "--config-name", "bare", "~seed"],
     "~seed: train cannot run without seed; give it a value instead"),
    (["predict.py", "--config-dir", "{mine}", "--config-name", "mine"],
     "mine: this config lacks tta, largest_component"),
    # a group set to null, or to an option's name as a plain value
    (["train.py", "--config-dir", "{mine}", "--config-name", "null_loss"],
     "loss=null in config 'null_loss': train needs a group of settings there; a group's option "
     "is chosen in the defaults list: - override loss: NAME"),
    (["train.py", "--config-dir", "{mine}", "--config-name", "named_data"],
     "data=prep in config 'named_data': train needs a group of settings there"),
    (["train.py", "--config-dir", "{mine}", "--config-name", "plain_debug"],
     "debug=fast_dev_run in config 'plain_debug': debug is a group, whose option is chosen in "
     "the defaults list: - override debug: fast_dev_run"),
    (["evaluate.py", "--config-dir", "{mine}", "--config-name", "plain_inference",
      "ckpt_path=m.ckpt"], "inference=plain in config 'plain_inference': inference is a group"),
    # a sweep: every job checked before the first starts
    (["train.py", "-m", "--config-dir", "{mine}", "--config-name", "mine", "seed=0,1", "~loss"],
     "~loss: train cannot run without loss; choose one of bce, bce_tversky, broken, dice"),
    (["train.py", "-m", "--config-dir", "{mine}", "--config-name", "null_loss", "seed=0,1"],
     "loss=null in config 'null_loss'"),
    (["train.py", "-m", "--config-path", "{mine}", "--config-name", "bare", "seed=0,1"],
     "bare: this config lacks ckpt_path"),
    # a config that is not YAML: the file, the line, what is wrong
    (["train.py", "--config-dir", "{mine}", "--config-name", "broken"],
     "{mine}/broken.yaml: not valid YAML at line 5, column 1: expected ',' or '}}'"),
    (["train.py", "--config-dir", "{mine}", "loss=broken"],
     "{mine}/loss/broken.yaml: not valid YAML at line 2"),
    # YAML, but not settings: Hydra said "Invalid loaded object type: int", or read a key
    (["train.py", "--config-dir", "{mine}", "--config-name", "number"],
     "{mine}/number.yaml: holds 5, not settings (a config file holds key: value lines)"),
    (["train.py", "--config-dir", "{mine}", "-m", "loss=bce,words"],
     "{mine}/loss/words.yaml: holds hello, not settings"),
    (["train.py", "--config-dir", "{mine}", "-m", "loss=glob(*,exclude=words)"],
     "{mine}/loss/listed.yaml: holds [a, b], not settings"),
])
def test_a_config_that_lacks_what_the_command_reads_is_one_line(args, message, tmp_path,
                                                                tmp_path_factory):
    """Another tool's config, or a user's own (--config-dir, --config-path) short of a key or
    group the command reads, by ~KEY or as written, alone or swept: one line before the task,
    nothing left behind (Hydra's own .hydra/ of a config without hydra.output_subdir: null
    included)."""
    mine = tmp_path_factory.mktemp("configs")
    on_train = f"defaults:\n  - train\n  - _self_\n\ndata:\n  dir: {tmp_path}\n"
    (mine / "mine.yaml").write_text(on_train)
    (mine / "bare.yaml").write_text("seed: 1\nloss:\n  name: bce\n")
    (mine / "null_loss.yaml").write_text(on_train + "loss: null\n")
    (mine / "named_data.yaml").write_text("defaults:\n  - train\n  - _self_\n\ndata: prep\n")
    (mine / "plain_debug.yaml").write_text(on_train + "debug: fast_dev_run\n")
    (mine / "plain_inference.yaml").write_text(
        "defaults:\n  - evaluate\n  - _self_\n\ninference: plain\n")
    (mine / "broken.yaml").write_text("defaults:\n  - train\n  - _self_\ndata: {dir: prep\n")
    (mine / "loss").mkdir()
    (mine / "loss" / "broken.yaml").write_text("alpha: [0.3\n")
    (mine / "number.yaml").write_text("5\n")
    (mine / "loss" / "words.yaml").write_text("hello\n")
    (mine / "loss" / "listed.yaml").write_text("[a, b]\n")
    result = run_cli(*[a.format(mine=mine) for a in args], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(
        f"error: {message.format(mine=mine)}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_key_of_a_users_own_can_be_left_out(tmp_path):
    """~KEY is refused only for what the command reads: a key of the user's own is theirs."""
    assert config_problem("train", ["+notes=baseline", "~notes", "data.dir=x"]) is None
    assert config_problem("train", ["~seed"]).startswith("~seed: train cannot run without")


def test_only_a_folder_of_bookkeeping_is_removed(tmp_path, monkeypatch):
    """A folder holding only the command's log goes, with the parents left empty up to the
    working directory; a folder holding anything else (a claimed run's .hydra/, where Hydra's
    own output_subdir is null) is kept whole,
    and so is a parent that holds another folder."""
    from prostate_seg.cli import remove_bookkeeping_folder

    monkeypatch.chdir(tmp_path)

    def log_only(path):
        path.mkdir(parents=True)
        (path / "train.log").write_text("[12:00:00] error: ...\n")
        return path

    only = log_only(tmp_path / "outputs" / "runs" / "day" / "time")
    assert remove_bookkeeping_folder(only, "train.log")
    assert list(tmp_path.iterdir()) == []
    kept = log_only(tmp_path / "outputs" / "runs" / "day" / "other")
    (kept / ".hydra").mkdir()
    (kept / ".hydra" / "config.yaml").write_text("x: 1\n")
    neighbour = log_only(tmp_path / "outputs" / "runs" / "day" / "gone")
    assert not remove_bookkeeping_folder(kept, "train.log")
    assert sorted(p.name for p in kept.iterdir()) == [".hydra", "train.log"]
    assert remove_bookkeeping_folder(neighbour, "train.log")
    assert [p.name for p in (tmp_path / "outputs" / "runs" / "day").iterdir()] == ["other"]
    other_log = log_only(tmp_path / "x")
    (other_log / "evaluate.log").write_text("mine")
    assert not remove_bookkeeping_folder(other_log, "train.log")
    assert (other_log / "evaluate.log").exists()
    # Hydra's own .hydra/ (a config without hydra.output_subdir: null) is bookkeeping too,
    # unless something else is in it
    hydra_own = log_only(tmp_path / "outputs" / "day" / "time")
    (hydra_own / ".hydra").mkdir()
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (hydra_own / ".hydra" / name).write_text("x: 1\n")
    (hydra_own / ".hydra" / "notes.txt").write_text("mine")
    assert not remove_bookkeeping_folder(hydra_own, "train.log", ".hydra")
    (hydra_own / ".hydra" / "notes.txt").unlink()
    assert remove_bookkeeping_folder(hydra_own, "train.log", ".hydra")
    assert not (tmp_path / "outputs" / "day").exists()
