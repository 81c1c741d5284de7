"""Bad input and faults (one test or more per point): clear one-line errors before work
starts, nothing half-written, runs that resume."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import datetime
import enum
import typing
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import ListConfig, OmegaConf
from helpers import REPO, TINY, compose_train, run_cli
from pytorch_lightning.utilities.exceptions import SIGTERMException

from prostate_seg.training.checks import check_train_config
from prostate_seg.data.datamodule import SliceDataModule
from prostate_seg.errors import ConfigError, DataError, NonFiniteLossError, UserError
from prostate_seg.data.prepare import PrepareSettings, prepare
from prostate_seg.training import fit as training
from prostate_seg.runs import read_history
from prostate_seg.training.fit import build_run, setup_data, train


# --- 1. config checked at start-up -----------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("loss.alpha=1.5", "loss.alpha=1.5: must be a number in [0, 1]"),
    ("loss.beta=-0.2", "loss.beta=-0.2: must be a number in [0, 1]"),
    # a loss's numbers, also inside a combined loss's terms, by their own keys
    ("loss.smooth=abc", "loss.smooth=abc: must be >= 0"),
    ("loss=focal_tversky loss.gamma=[1,2]", "loss.gamma=[1, 2]: must be > 0"),
    ("loss=bce_tversky loss.terms.tversky.smooth=-1",
     "loss.terms.tversky.smooth=-1: must be >= 0"),
    ("loss=bce_tversky loss.weights.tversky=-2", "loss.weights.tversky=-2: must be >= 0"),
    ("loss=bce_tversky loss.weights.bce=abc", "loss.weights.bce=abc: must be >= 0"),
    ("loss=bce_tversky loss.weights.bce=0 loss.weights.tversky=0",
     "loss.weights={bce: 0, tversky: 0}: at least one must be > 0"),
    ("optimizer.lr=0", "optimizer.lr=0: must be > 0"),
    ("scheduler=cosine scheduler.eta_min=-1", "scheduler.eta_min=-1: must be >= 0"),
    ("scheduler=poly scheduler.power=-1", "scheduler.power=-1: must be >= 0"),
    ("scheduler=plateau scheduler.min_lr=-1e-6", "scheduler.min_lr=-1e-06: must be >= 0"),
    ("optimizer.lr=nan", "optimizer.lr=nan: must be > 0"),
    ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ("data.batch_size=8.0", "data.batch_size=8.0: must be an integer >= 1"),
    ("seed=1.5", "seed=1.5: must be an integer in 0..4294967295"),
    ("seed=-1", "seed=-1: must be an integer in 0..4294967295"),
    ("seed=null", "seed=null: must be an integer in 0..4294967295"),
    ("data.split_seed=abc", "data.split_seed=abc: must be an integer in 0..4294967295"),
    ("callbacks.early_stopping.patience=2.5",
     "callbacks.early_stopping.patience=2.5: must be an integer >= 0"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs=2.5: must be an integer >= 1 (or -1)"),
    ("trainer.max_epochs=null", "trainer.max_epochs=null: must be an integer >= 1 (or -1)"),
    ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
    ("data.num_workers=true", "data.num_workers=true: must be an integer >= 0"),
    ("data.context_slices='1'", "data.context_slices='1': must be an integer in 0..63"),
    ("data.folds=1", "data.folds=1: must be an integer >= 2"),
    ("data.folds=2.5", "data.folds=2.5: must be an integer >= 2"),
    ("data.folds=5 data.fold=5", "data.fold=5: must be an integer in 0..4 (data.folds=5)"),
    ("data.folds=5 data.fold=-1", "data.fold=-1: must be an integer in 0..4 (data.folds=5)"),
    ("data.fold=1.0", "data.fold=1.0: must be an integer in 0..4 (data.folds=5)"),
    ("data.test_fraction=1.0", "data.test_fraction=1.0: must be a number in [0, 1)"),
    ("resume=no", "resume=no: must be true or false"),
    ("callbacks.finite_loss.check_every_n_steps=0",
     "callbacks.finite_loss.check_every_n_steps=0: must be an integer >= 1"),
    ("~callbacks.early_stopping", None),  # a removed callback is not checked
    ("callbacks=final", None),
    # settings that outlive the entry an option removed: nothing to build them into
    ("callbacks=final +callbacks.early_stopping.patience=5", "callbacks.early_stopping="
     "{patience: 5}: has no _target_ to build it from (the callbacks option in use leaves "
     "early_stopping out"),
    ("+logger.csv2.save_dir=x", "logger.csv2={save_dir: x}: has no _target_"),
    ("+scheduler.eta_min=0", "scheduler={eta_min: 0}: has no _target_ to build it from"),
    # Lightning's and Hydra's own checks, named by the key, before the run folder is claimed
    ("trainer.accelerator=gpuu", "trainer: You selected an invalid accelerator name"),
    ("trainer.precision=17", "trainer.precision=17: Trainer takes 64, 32, 16, transformer-engine"),
    ("callbacks.early_stopping.mode=maxx", "callbacks.early_stopping: `mode` can be min, max"),
    ("callbacks.model_checkpoint.monitor=val/dicee",
     "callbacks.model_checkpoint.monitor=val/dicee: not a metric the run logs; choose one of "
     "train/loss, select/loss, select/dice, select/precision, select/recall"),
    # a mode against the metric's direction keeps the worst epoch (Lightning's default: min)
    ("callbacks.model_checkpoint.monitor=select/loss", "callbacks.model_checkpoint.mode=max: "
     "must be min for monitor=select/loss, which falls as the run improves"),
    ("callbacks.early_stopping.mode=min", "callbacks.early_stopping.mode=min: must be max for "
     "monitor=select/dice"),
    ("~callbacks.early_stopping.mode", "callbacks.early_stopping.mode=min: must be max"),
    ("callbacks.model_checkpoint.monitor=select/loss callbacks.model_checkpoint.mode=min", None),
    ("model.net._target_=foo.Bar", "model.net: Error loading 'foo.Bar': ModuleNotFoundError"),
    ("callbacks.early_stopping.monitor=null", "callbacks.early_stopping.monitor=null: not a "
     "metric the run logs"),
    ("+trainer.min_epochs=abc", "trainer.min_epochs=abc: must be an integer >= 0"),
    ("report.all_pairs=maybe", "report.all_pairs=maybe: must be true or false"),
    ("callbacks.early_stopping=off", "callbacks.early_stopping=off: set it to null to leave"),
    # arguments against the signature and annotations of what they build, before it is built
    ("+optimizer.foo=1", "optimizer.foo: Adam takes no such argument; it takes params, lr, betas"),
    ("+optimizer.amsgrad=no", "optimizer.amsgrad=no: Adam takes true or false"),  # counted true
    ("+optimizer.betas=[0.9]", "optimizer.betas=[0.9]: Adam takes a list of 2 items (each a "
     "number or a Tensor)"),
    ("trainer.num_sanity_val_steps=abc", "trainer.num_sanity_val_steps=abc: must be an integer"),
    ("+trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0: must be an "
     "integer >= 1"),
    ("+trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be"),
    ("+trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: must be >= 0"),
    ("+trainer.max_steps=0", "trainer.max_steps=0: must be an integer >= 1 (or -1)"),
    ("trainer.deterministic=abc", "trainer.deterministic=abc: Trainer takes true, false, warn or "
     "null"),
    ("+trainer.detect_anomaly=1", "trainer.detect_anomaly=1: Trainer takes true or false"),
    ("+trainer.profiler=5", "trainer.profiler=5: Trainer takes a Profiler, a string or null"),
    ("+trainer.bogus=1", "trainer.bogus: Trainer takes no such argument; it takes accelerator"),
    ("+logger.csv.bogus=1", "logger.csv.bogus: CSVLogger takes no such argument; it takes "
     "save_dir, name, version, prefix, flush_logs_every_n_steps"),
    ("+logger.csv.flush_logs_every_n_steps=often", "logger.csv.flush_logs_every_n_steps=often: "
     "CSVLogger takes an integer"),
    ("+callbacks.model_checkpoint.save_last=maybe", "callbacks.model_checkpoint.save_last=maybe: "
     "ModelCheckpoint takes true, false, link or null"),
    ("trainer.deterministic=warn +trainer.val_check_interval=0.5 optimizer.weight_decay=0", None),
    # the network's output and input, one pass of zeros before the first training step
    ("model.net.out_channels=2", "model.net.out_channels=2: must be 1 (one logit per pixel"),
    ("model.net.in_channels=3", "model.net.in_channels=3: the data gives 1 channel(s) per slice "
     "(1 + 2 x data.context_slices=0)"),
    ("data.context_slices=1", None),
    # a network of one input size is tried at data.image_size; whatever it raises is one line
    ("model.net._target_=helpers.FixedSizeNet +model.net.img_size=48 data.image_size=48", None),
    ("model.net._target_=helpers.FixedSizeNet +model.net.img_size=40 data.image_size=48",
     "model.net: fails on a (1, 1, 48, 48) input (data.image_size, 1 channel(s)): input must be "
     "40 px, got 48"),
    ("+callbacks.note={_target_:helpers.NoteCallback,note:hello}", None),  # annotated Any
    # containers reach the library as Python's own (Lightning's Timer tests for a dict)
    ("+trainer.max_time={minutes:10}", None),
    ("+callbacks.model_checkpoint.train_time_interval=abc",
     "callbacks.model_checkpoint.train_time_interval=abc: ModelCheckpoint takes a timedelta or "
     "null"),
    ("callbacks.model_summary.max_depth=-2",
     "callbacks.model_summary.max_depth=-2: must be an integer >= 0 (or -1)"),
    ("scheduler=cosine scheduler.T_max=0", "scheduler.T_max=0: must be an integer >= 1 (the "
     "schedule's length in epochs)"),
    ("+trainer.max_epoch=3", "trainer.max_epoch: Trainer takes no such argument; did you mean "
     "max_epochs?"),
    ("optimizer._target_=torch.optim.RMSprop", "optimizer.fused: RMSprop takes no such argument; "
     "it takes params, lr, alpha"),
    ("optimizer._target_=torch.optim.RMSprop ~optimizer.fused", None),
    ("logger.csv.name=2024", "logger.csv.name=2024: CSVLogger takes a string or null (a name "
     "Hydra reads as another type goes in quotes: logger.csv.name=\"'2024'\")"),
    ("trainer.devices=1.5", "trainer.devices=1.5: Trainer takes a list of integers, a string or "
     "an integer"),
    ("scheduler=cosine ~scheduler.T_max",
     "scheduler: CosineAnnealingLR.__init__() missing 1 required positional argument: 'T_max'"),
    ("scheduler=cosine +scheduler.last_epoch=abc",
     "scheduler.last_epoch=abc: CosineAnnealingLR takes an integer"),
    ("logger.csv._target_=nope.Logger", "logger.csv._target_=nope.Logger: Error loading"),
    ("data.folds=5 data.fold=4 data.test_fraction=0", None),
    # what Lightning finds out only inside fit, once the run's folder is made
    ("+trainer.limit_val_batches=0", "trainer.limit_val_batches=0: must be > 0"),
    ("+trainer.limit_train_batches=0.0", "trainer.limit_train_batches=0.0: must be > 0"),
    ("+trainer.limit_val_batches=2 +trainer.limit_train_batches=0.5", None),
    ("data.context_slices=64", "data.context_slices=64: must be an integer in 0..63"),
    # the best checkpoint overwritten each epoch by the resume point
    ("callbacks.model_checkpoint.filename=last", "callbacks.model_checkpoint.filename=last: "
     "callbacks.last_checkpoint writes that file too"),
    ("callbacks.model_checkpoint.filename=last callbacks.model_checkpoint.dirpath="
     "${paths.output_dir}/checkpoints/", "callbacks.model_checkpoint.filename=last: "),
    ("callbacks.model_checkpoint.filename=best", None),
    ("data.image_size=8", "data.image_size=8: must be an integer >= 2^depth = 16"),
    ("data.dir=/no/such/folder", "data.dir=/no/such/folder: folder not found"),
    ("loss.smooth=-1", "loss.smooth=-1: must be >= 0"),
    ("loss=bce_tversky ~loss.weights.tversky", "loss: loss.weights keys ['bce'] must match"),
    ("scheduler=cosine trainer.max_epochs=-1", "trainer.max_epochs=-1: the learning-rate "
     "schedule decays over a finite number of epochs; set one (or scheduler=plateau"),
    ("scheduler=plateau scheduler.mode=min", "scheduler.mode=min: must be max: the schedule "
     "reads select/dice"),
    ("loss=bce_tversky", None),
    ("scheduler=plateau trainer.max_epochs=-1", None),  # no epoch budget to decay over
    # TensorBoardLogger hands what it does not take to SummaryWriter, built in the run's folder
    ("+logger.tensorboard.flush_secs=30", None),
    ("+logger.tensorboard.flush_sec=30", "logger.tensorboard.flush_sec: TensorBoardDashboard "
     "takes no such argument; did you mean flush_secs?"),
    ("+logger.tensorboard.bogus=1", "logger.tensorboard.bogus: TensorBoardDashboard takes no such "
     "argument; it takes save_dir, name, version, log_graph, default_hp_metric, prefix, "
     "sub_dir, log_dir, comment, purge_step, max_queue, flush_secs, filename_suffix"),
])
def test_bad_values_are_named_with_what_is_allowed(override, message, prepared, tmp_path):
    overrides = ["model.net.features=[8,16,32,64]", f"data.dir={prepared}", *override.split()]
    cfg = compose_train(overrides, tmp_path)
    if message is None:
        check_train_config(cfg)
        return
    with pytest.raises(ConfigError) as info:
        check_train_config(cfg)
    assert str(info.value).startswith(message)


class Mode(enum.Enum):
    DECONV = "deconv"


@pytest.mark.parametrize("value, hint, fits", [
    (3, int, True), (3.0, int, False), (True, int, False), (3, float, True), ("3", float, False),
    (None, typing.Optional[int], True), ("no", bool, False), (False, bool | None, True),
    ("warn", typing.Literal["warn"] | bool, True), ("16", typing.Literal[16], False),
    (ListConfig([0.9, 0.99]), tuple[float, float], True), (ListConfig([0.9]), tuple[float, float],
                                                           False),
    (ListConfig([1, "a"]), list[int], False), ("ab", typing.Sequence[str], False),
    ("runs", Path, True), (5, Path, False), ("name", torch.dtype, False), (5, pl.Callback, False),
    (OmegaConf.create({"_target_": "x.Y"}), int, True), (OmegaConf.create({"a": 1}), dict, True),
    (object(), typing.Callable[[int], int], True),  # what it does not understand: allowed
    ("x", typing.Any, True), (None, typing.Optional[typing.Any], True),
    ("abc", datetime.timedelta, False), ({"a": 1}, datetime.timedelta, False),
    ("deconv", Mode, True), ("DECONV", Mode, True), ("nope", Mode, False),  # value or name
])
def test_a_value_fits_its_annotation_as_a_config_could_give_it(value, hint, fits):
    from prostate_seg.training.signatures import fits as fits_hint

    assert fits_hint(value, hint) is fits


def test_a_transforms_setting_is_checked_inside_its_list(prepared, tmp_path):
    cfg = compose_train([*TINY, f"data.dir={prepared}", "+data.train_transform.transforms.1.bogus=1"],
                        tmp_path)
    with pytest.raises(ConfigError, match=r"^data.train_transform.transforms.1.bogus: Rotate takes "
                                          r"no such argument; it takes limit, interpolation"):
        setup_data(cfg)


def test_combined_loss_terms_are_checked_too(prepared, tmp_path):
    cfg = compose_train([f"data.dir={prepared}", "loss=bce_tversky",
                         "loss.terms.tversky.alpha=2"], tmp_path)
    with pytest.raises(ConfigError, match=r"loss.terms.tversky.alpha=2"):
        check_train_config(cfg)


def test_alpha_plus_beta_not_one_is_a_warning(prepared, tmp_path, caplog):
    cfg = compose_train([f"data.dir={prepared}", "loss.alpha=0.3", "loss.beta=0.3"], tmp_path)
    check_train_config(cfg)
    assert "not 1" in caplog.text


# --- 2. prepare on bad input -----------------------------------------------------------------
def _case(root, name, image=None, mask=None, affine=None, mask_affine=None):
    rng = np.random.default_rng(0)
    image = rng.random((16, 16, 5)).astype(np.float32) * 100 if image is None else image
    mask = (np.arange(16 * 16 * 5).reshape(16, 16, 5) % 7 == 0).astype(np.uint8) if mask is None else mask
    affine = np.eye(4) if affine is None else affine
    for folder, array, aff in (("images", image, affine),
                               ("masks", mask, affine if mask_affine is None else mask_affine)):
        if array is False:
            continue
        (root / folder).mkdir(parents=True, exist_ok=True)
        nii = nib.Nifti1Image(array, aff)
        nii.set_sform(aff, code=1)
        nib.save(nii, str(root / folder / f"{name}.nii.gz"))


def _broken_cases(root):
    _case(root, "good")
    _case(root, "nomask", mask=False)
    _case(root, "noimage", image=False)
    _case(root, "shape", mask=np.zeros((16, 15, 5), np.uint8))
    _case(root, "affine", mask_affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    _case(root, "labels", mask=np.full((16, 16, 5), 3, np.uint8))
    nan = np.ones((16, 16, 5), np.float32)
    nan[0, 0, 0] = np.nan
    _case(root, "nan", image=nan)
    _case(root, "constant", image=np.full((16, 16, 5), 7.0, np.float32))
    _case(root, "truncated")
    data = (root / "images" / "truncated.nii.gz").read_bytes()
    (root / "images" / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    _case(root, "empty")
    (root / "masks" / "empty.nii.gz").write_bytes(b"")
    _case(root, "corrupt")
    (root / "images" / "corrupt.nii.gz").write_bytes(b"this is not a scan" * 20)


EXPECTED = {
    "nomask": "image without mask", "noimage": "mask without image",
    "shape": "does not match image grid", "affine": "mask affine does not match",
    "labels": "unexpected mask labels [3]", "nan": "NaN or infinite",
    "constant": "constant image", "truncated": "not a readable NIfTI",
    "empty": "not a readable NIfTI", "corrupt": "not a readable NIfTI",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_bad_case_is_named_with_its_problem(case, tmp_path):
    _broken_cases(tmp_path / "all")
    root = tmp_path / "one"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
        for name in ("good", case):  # a good case beside it: the bad one is found and named
            source = tmp_path / "all" / folder / f"{name}.nii.gz"
            if source.exists():
                shutil.copy(source, root / folder)
    settings = PrepareSettings(image_size=16, mask_labels=(1,) if case == "labels" else None)
    with pytest.raises(DataError) as info:
        prepare(root, tmp_path / "out", settings)
    message = str(info.value)
    assert EXPECTED[case] in message and case in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial output


def test_skip_mode_lists_every_skipped_case_with_its_reason(tmp_path):
    _broken_cases(tmp_path / "in")
    result = run_cli("-m", "prostate_seg", "prepare", f"input_dir={tmp_path / 'in'}",
                     f"output_dir={tmp_path / 'out'}", "image_size=16", "on_error=skip",
                     "mask_labels=[1]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    skipped = {item["case"].split("/")[-1].split(".")[0]: item["reason"] for item in report["skipped"]}
    assert set(skipped) == set(EXPECTED)
    for case, reason in skipped.items():
        assert EXPECTED[case] in reason
    assert report["patients"] == 1
    assert all(f"skipped {c}" in result.stdout + result.stderr for c in ("nan", "constant"))


@pytest.mark.parametrize("layout", ["missing", "empty", "no_masks"])
def test_missing_or_empty_input_folder(layout, tmp_path):
    root = tmp_path / "in"
    if layout != "missing":
        (root / "images").mkdir(parents=True)
    if layout == "no_masks":
        _case(root, "x", mask=False)
        shutil.rmtree(root / "masks", ignore_errors=True)
    with pytest.raises(DataError, match=str(root)):
        prepare(root, tmp_path / "out", PrepareSettings(image_size=16))


# --- 3. the DataModule at setup --------------------------------------------------------------
def _setup(data_dir):
    SliceDataModule(str(data_dir), image_size=48, batch_size=4).setup("fit")


@pytest.mark.parametrize("damage, message", [
    ("no_folder", "folder not found"),
    ("no_manifest", "manifest not found"),
    ("empty_manifest", "no slices listed"),
    ("missing_mask", "mask missing for image phantom003_004.png"),
    ("unreadable_png", "phantom003_004.png: not a PNG file"),
    ("truncated_png", "phantom003_004.png: truncated PNG"),
    ("wrong_size", "phantom003_004.png: 40x40 pixels, but the dataset was prepared at 48x48"),
    ("sixteen_bit", "phantom003_004.png: 16 bits per sample"),
    ("png_is_a_folder", "phantom003_004.png: cannot be read"),
    ("short_row", "manifest.csv: line 3: malformed row"),
    ("empty_path", "manifest.csv: line 2: malformed row (empty image or mask path)"),
    ("not_utf8", "manifest.csv: not UTF-8 text"),
])
def test_datamodule_setup_names_the_bad_file(damage, message, prepared_copy):
    victim = prepared_copy / "images" / "phantom003_004.png"
    if damage == "no_folder":
        shutil.rmtree(prepared_copy)
    elif damage == "no_manifest":
        (prepared_copy / "manifest.csv").unlink()
    elif damage == "empty_manifest":
        header = (prepared_copy / "manifest.csv").read_text().splitlines()[0]
        (prepared_copy / "manifest.csv").write_text(header + "\n")
    elif damage == "missing_mask":
        (prepared_copy / "masks" / "phantom003_004.png").unlink()
    elif damage == "unreadable_png":
        victim.write_bytes(b"\x00" * 100)
    elif damage == "truncated_png":
        victim.write_bytes(victim.read_bytes()[:-30])
    elif damage == "wrong_size":
        cv2.imwrite(str(victim), np.zeros((40, 40), np.uint8))
        cv2.imwrite(str(prepared_copy / "masks" / victim.name), np.zeros((40, 40), np.uint8))
    elif damage == "sixteen_bit":
        cv2.imwrite(str(victim), cv2.imread(str(victim), cv2.IMREAD_GRAYSCALE).astype(np.uint16))
    elif damage == "png_is_a_folder":
        victim.unlink()
        victim.mkdir()
    elif damage in ("short_row", "empty_path", "not_utf8"):
        manifest = prepared_copy / "manifest.csv"
        header, first, *rest = manifest.read_bytes().split(b"\n")
        first = {"short_row": first, "not_utf8": first.replace(b"phantom", b"phant\xe9m"),
                 "empty_path": b",".join(c if k != 2 else b"" for k, c in
                                         enumerate(first.split(b",")))}[damage]
        extra = [b"phantom000,0,images/x.png"] if damage == "short_row" else []
        manifest.write_bytes(b"\n".join([header, first, *extra, *rest]))
    with pytest.raises(DataError) as info:
        _setup(prepared_copy)  # in this (main) process, before any loader worker exists
    assert message in str(info.value)


def test_a_dataset_without_prepare_json_is_refused_not_trained_at_another_size(prepared_copy,
                                                                              tmp_path):
    (prepared_copy / "prepare.json").unlink()
    result = run_cli("train.py", *TINY, f"data.dir={prepared_copy}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"error: data.dir={prepared_copy}: not a prepared dataset (no "
                             "prepare.json; make one with python -m prostate_seg prepare)\n")


@pytest.mark.parametrize("damage, message", [("cut", "unreadable (BadZipFile"),
                                             ("remove", "missing; prepare the dataset again")])
def test_a_scored_patients_mask_at_original_size_is_checked_before_training(
        damage, message, prepared_copy, tmp_path):
    """volumes/PATIENT.npz, what the run is scored against once trained: named before it is."""
    for volume in (prepared_copy / "volumes").iterdir():
        if damage == "cut":
            volume.write_bytes(volume.read_bytes()[:50])
        else:
            volume.unlink()
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=re.escape(message)) as info:
        train(compose_train([*TINY, f"data.dir={prepared_copy}"], run_dir))
    assert str(info.value).startswith(str(prepared_copy / "volumes"))
    assert not (run_dir / "checkpoints").exists()


def test_a_validation_interval_longer_than_an_epoch_is_refused_before_training(prepared_copy,
                                                                              tmp_path):
    """Lightning finds out inside fit, once the run's folder is made."""
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.dir={prepared_copy}", "+trainer.val_check_interval=1000"],
                        run_dir)
    with pytest.raises(ConfigError, match=r"^trainer.val_check_interval=1000: must be at most "
                                          r"the \d+ training batches of an epoch"):
        train(cfg)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "status.json").exists()


def test_a_validation_interval_counts_the_batches_an_epoch_trains():
    """After limit_train_batches; with check_val_every_n_epoch=null it counts across epochs."""
    from prostate_seg.training.checks import check_validation_interval

    check_validation_interval(OmegaConf.create({"val_check_interval": 1000,
                                                "check_val_every_n_epoch": None}), 10)
    check_validation_interval(OmegaConf.create({"val_check_interval": 0.5}), 10)
    for limit, allowed in ((5, 5), (0.5, 5)):
        with pytest.raises(ConfigError, match=f"must be at most the {allowed} training batches"):
            check_validation_interval(OmegaConf.create({"val_check_interval": 6,
                                                        "limit_train_batches": limit}), 10)


@pytest.mark.parametrize("name", ["per_patient.csv", "results.json", "status.json"])
def test_a_folder_with_files_no_run_wrote_is_refused_and_kept(name, prepared_copy, tmp_path):
    """hydra.run.dir=. in a project folder: its own per_patient.csv would be replaced."""
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / name).write_text("the user's")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(run_dir / name))}: not a run's"):
        train(compose_train([*TINY, f"data.dir={prepared_copy}"], run_dir))
    assert sorted(p.name for p in run_dir.iterdir()) == [name]
    assert (run_dir / name).read_text() == "the user's"


def test_a_run_inside_a_prepared_datasets_slices_is_refused(prepared_copy):
    """Its checkpoints would sit among the slices, and prepare overwrite=true delete them."""
    run_dir = prepared_copy / "volumes" / "myrun"
    with pytest.raises(ConfigError, match=rf"^hydra.run.dir={run_dir}: inside the prepared "
                                          rf"dataset {prepared_copy}"):
        train(compose_train([*TINY, f"data.dir={prepared_copy}"], run_dir))
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_a_manifest_saved_with_a_byte_order_mark_reads_the_same(prepared_copy):
    """A spreadsheet writes a BOM before the header; it is no part of the first column's name."""
    from prostate_seg.data.dataset import read_manifest

    before = read_manifest(prepared_copy)
    manifest = prepared_copy / "manifest.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    assert read_manifest(prepared_copy) == before


# --- 4. training faults ----------------------------------------------------------------------
def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=5",
                         "loss=bce", "loss._target_=helpers.NaNAfterLoss", "+loss.steps=20",
                         "callbacks.finite_loss.check_every_n_steps=5"], run_dir)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, global step 2[01]"):
        train(cfg)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    steps_per_epoch = len(setup_data(cfg).train_set) // 8  # batch 8, last partial one dropped
    assert last["epoch"] == 0 and last["global_step"] == steps_per_epoch  # end of epoch 0
    weights = torch.cat([v.flatten().float() for v in last["state_dict"].values()])
    assert torch.isfinite(weights).all()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "NaN" in status["error"]


class _SigtermAtStep(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SIGTERMException()


def test_interrupt_after_a_nan_loss_saves_no_checkpoint(prepared, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.dir={prepared}", "loss=bce",
                         "loss._target_=helpers.NaNAfterLoss", "+loss.steps=2",
                         "callbacks.finite_loss.check_every_n_steps=1000"], run_dir)
    datamodule, module, trainer = build_run(cfg)
    trainer.callbacks.append(_SigtermAtStep(5))  # NaN since step 3, not checked yet, epoch 0
    with pytest.raises(SIGTERMException):
        trainer.fit(module, datamodule=datamodule)
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()


def _epochs(run_dir):
    return [int(r["epoch"]) for r in read_history(run_dir)]


class _SigtermInValidation(pl.Callback):
    """SIGTERM (SLURM preemption, a time limit) while epoch ``epoch`` validates."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            raise SIGTERMException()


def test_interrupt_during_validation_continues_from_the_previous_epoch(prepared, tmp_path):
    """The epoch's batches are done: a checkpoint taken now would resume past the validation
    that Lightning then skips (early stopping: no metric, the run fails). None is taken; the
    run continues from the previous epoch's last.ckpt and trains every epoch."""
    run_dir = tmp_path / "run"
    common = [*TINY, f"data.dir={prepared}", "trainer.max_epochs=3",
              "callbacks.early_stopping.patience=10"]
    datamodule, module, trainer = build_run(compose_train(common, run_dir))
    (run_dir / ".hydra").mkdir(parents=True)  # the run's claim, which train writes first
    trainer.callbacks.append(_SigtermInValidation(1))
    with pytest.raises(SIGTERMException):
        trainer.fit(module, datamodule=datamodule)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == len(datamodule.train_dataloader())  # the end of epoch 0
    train(compose_train(common, run_dir))
    assert _epochs(run_dir) == [0, 1, 2]


def test_resume_continues_with_optimizer_scheduler_and_early_stopping_state(prepared, tmp_path,
                                                                         monkeypatch):
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.dir={prepared}", "scheduler=cosine", "trainer.max_epochs=4",
                         "callbacks.early_stopping.patience=10"], run_dir)
    steps_per_epoch = len(setup_data(cfg).train_set) // 8
    build_trainer = training._trainer

    def interrupted_trainer(cfg):  # SIGTERM in the middle of epoch 2
        trainer = build_trainer(cfg)
        trainer.callbacks.append(_SigtermAtStep(2 * steps_per_epoch + 3))
        return trainer

    monkeypatch.setattr(training, "_trainer", interrupted_trainer)
    with pytest.raises(SystemExit):
        train(cfg)
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2 * steps_per_epoch + 3
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(training, "_trainer", build_trainer)
    train(cfg)  # the same job started again continues from last.ckpt
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert _epochs(run_dir) == [0, 1, 2, 3]
    assert second["global_step"] == 4 * steps_per_epoch
    adam_steps = second["optimizer_states"][0]["state"][0]["step"]
    assert int(adam_steps) == second["global_step"]  # Adam's moments carried on
    assert second["lr_schedulers"][0]["last_epoch"] == 4
    stopper = next(v for k, v in second["callbacks"].items() if k.startswith("EarlyStopping"))
    assert stopper["best_score"] is not None
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["resumed_from"].endswith("last.ckpt")


def test_completed_job_is_not_trained_again(trained_run, prepared):
    before = read_history(trained_run)
    last = trained_run / "checkpoints" / "last.ckpt"
    stamp = last.stat().st_mtime_ns
    cfg = compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=8",
                         "callbacks.early_stopping.patience=8", "loss=bce_tversky"], trained_run)
    results = train(cfg)  # started again (a resubmitted sweep): nothing to do
    assert results == json.loads((trained_run / "results.json").read_text())
    assert read_history(trained_run) == before
    assert last.stat().st_mtime_ns == stamp


def _train_command(prepared, run_dir, epochs):
    return [sys.executable, str(REPO / "train.py"), *TINY, f"data.dir={prepared}",
            f"trainer.max_epochs={epochs}", "data.batch_size=2",
            "callbacks.early_stopping.patience=100", f"hydra.run.dir={run_dir}"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_a_checkpoint_before_exit(signum, prepared, tmp_path):
    """Stopped in a training step (at batch 2 of epoch 1), the run saves last.ckpt there,
    mid-epoch, says so in its log and is recorded as interrupted."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [*_train_command(prepared, run_dir, 3), "+callbacks.stop._target_=helpers.SignalAt",
         f"+callbacks.stop.signum={int(signum)}", "+callbacks.stop.epoch=1",
         "+callbacks.stop.batch=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert result.returncode != 0
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    (epoch0,) = read_history(run_dir)
    # epoch 0's steps (logged at its last, counted from 0), then batches 0 and 1 of epoch 1;
    # on SIGTERM Lightning finishes the batch in progress (2) before it stops
    step = int(epoch0["step"]) + 1 + 2 + (signum == signal.SIGTERM)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt",
                      weights_only=False)["global_step"] == step
    assert re.search(rf"interrupted \(.*\): saved .*last.ckpt at epoch 1, step {step}\b",
                     (run_dir / "train.log").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.extra)])  # 30 s: extra
def test_sigkill_mid_epoch_then_restart_ends_like_an_uninterrupted_run(workers, prepared_copy,
                                                                        tmp_path):
    """Killed in epoch 1, the restart goes on from epoch 0's checkpoint and ends with the
    uninterrupted run's weights to the bit: the resumed epochs draw the same batches and
    augmentations (in loader processes too), and the moving average resumes with them."""
    settings = [f"data.num_workers={workers}", "data.persistent_workers=false",
                "callbacks=averaged"]
    # one torch thread in every run: sums over a different thread count round differently
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "PROSTATE_SEG_CPUS": "1"}
    whole = subprocess.run([*_train_command(prepared_copy, tmp_path / "whole", 3), *settings],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run_dir = tmp_path / "run"
    command = [*_train_command(prepared_copy, run_dir, 3), *settings,
               "+callbacks.stop._target_=helpers.SignalAt",
               f"+callbacks.stop.signum={int(signal.SIGKILL)}", "+callbacks.stop.epoch=1",
               "+callbacks.stop.batch=2"]  # once: the restart runs on
    killed = subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()
    restarted = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_trained"] == 3 and _epochs(run_dir) == [0, 1, 2]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["resumed_from"].endswith("last.ckpt")
    resumed, uninterrupted = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
                              for run in (run_dir, tmp_path / "whole"))
    for weights in ("state_dict", "current_model_state"):  # averaged and raw
        for name, tensor in uninterrupted[weights].items():
            assert torch.equal(resumed[weights][name], tensor), (weights, name)


# --- 5. outputs are never overwritten --------------------------------------------------------
def test_predict_refuses_to_overwrite(trained_run, phantoms, tmp_path):
    from prostate_seg.inference.predict import predict_paths

    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"precious")
    with pytest.raises(DataError, match="already exists"):
        predict_paths(trained_run / "checkpoints" / "last.ckpt",
                      phantoms / "images" / "phantom000.nii.gz", out)
    assert out.read_bytes() == b"precious"


def test_predict_rejects_non_3d_and_unreadable_input(trained_run, tmp_path):
    from prostate_seg.inference.predict import predict_paths

    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(flat))
    with pytest.raises(DataError, match="expected a 3D volume"):
        predict_paths(trained_run / "checkpoints" / "last.ckpt", flat, tmp_path / "o.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable NIfTI"):
        predict_paths(trained_run / "checkpoints" / "last.ckpt", junk, tmp_path / "o.nii.gz")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from prostate_seg.files import replacing, write_json

    path = tmp_path / "results.json"
    write_json(path, {"dice": 0.8})
    with pytest.raises(OSError), replacing(path) as tmp:
        tmp.write_text('{"dice": 0.')
        raise OSError("disk full")
    assert json.loads(path.read_text()) == {"dice": 0.8}
    assert list(tmp_path.iterdir()) == [path]


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    from prostate_seg.config import compose_config

    dirs = {compose_config("train", ["data.dir=."], tmp_path).hydra.run.dir for _ in range(2)}
    assert len(dirs) == 2  # microseconds in the folder name


# --- 6. fuzzing ------------------------------------------------------------------------------
def _mutations(data: bytes, rng: np.random.Generator, count: int):
    for _ in range(count):
        kind = rng.integers(4)
        buf = bytearray(data)
        if kind == 0:  # flip random bytes
            for i in rng.integers(0, len(buf), size=rng.integers(1, 20)):
                buf[i] = int(rng.integers(256))
        elif kind == 1:  # truncate
            buf = buf[: int(rng.integers(0, len(buf)))]
        elif kind == 2:  # random garbage
            buf = bytearray(rng.integers(0, 256, size=int(rng.integers(0, 2000)), dtype=np.uint8))
        else:  # header damage: the first 352 bytes of an uncompressed NIfTI / PNG header
            for i in rng.integers(0, min(len(buf), 352), size=rng.integers(1, 8)):
                buf[i] = int(rng.integers(256))
        yield bytes(buf)


class _Alarm(Exception):
    pass


def _no_hang(seconds):
    def handler(signum, frame):
        raise _Alarm("hang")
    signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)


def test_fuzzed_nifti_files_give_clean_errors(tmp_path):
    rng = np.random.default_rng(1234)
    _case(tmp_path / "seed", "case")
    sources = {"masks": (tmp_path / "seed/masks/case.nii.gz").read_bytes()}
    raw = tmp_path / "raw.nii"  # also an uncompressed file, whose header bytes are exposed
    nib.save(nib.load(tmp_path / "seed/images/case.nii.gz"), str(raw))
    sources["images"] = raw.read_bytes()
    outcomes = {"ok": 0, "error": 0}
    for i, (folder, data) in enumerate((f, d) for f, d in sources.items()
                                       for d in _mutations(d, rng, 60)):
        root = tmp_path / f"in{i}"
        shutil.copytree(tmp_path / "seed", root)
        suffix = ".nii" if folder == "images" else ".nii.gz"
        (root / folder / "case.nii.gz").unlink()
        (root / folder / f"case{suffix}").write_bytes(data)
        _no_hang(20)
        try:
            prepare(root, tmp_path / f"out{i}", PrepareSettings(image_size=16))
            outcomes["ok"] += 1
        except UserError:
            outcomes["error"] += 1
        finally:
            signal.alarm(0)
    assert outcomes["error"] > 60  # most mutations break the file ...
    assert sum(outcomes.values()) == 120  # ... and every one ended cleanly


def test_fuzzed_png_slices_give_clean_errors(prepared_copy):
    from prostate_seg.data.dataset import SliceDataset, check_files, read_manifest

    rng = np.random.default_rng(99)
    records = read_manifest(prepared_copy)
    victim = records[5].image
    original = victim.read_bytes()
    errors = 0
    for data in _mutations(original, rng, 150):
        victim.write_bytes(data)
        _no_hang(10)
        try:
            check_files(records, 48)
            SliceDataset(records[:8], None)[5]
        except UserError:
            errors += 1
        finally:
            signal.alarm(0)
    victim.write_bytes(original)
    assert errors > 75


def test_evaluate_never_writes_over_its_checkpoint_or_into_a_dataset(tmp_path):
    from prostate_seg.inference.evaluate import check_output

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "prepare.json").write_text("{}")
    (tmp_path / "data" / "manifest.csv").write_text("patient\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.csv").write_text("name,url\n")  # not a dataset's
    ckpt = tmp_path / "run" / "last.ckpt"
    (tmp_path / "link.ckpt").symlink_to(ckpt)
    for output, message in [(tmp_path / "data" / "manifest.csv", "would change the prepared"),
                            (tmp_path / "data" / "images" / "x.csv", "would change the prepared"),
                            (tmp_path / "link.ckpt", "would replace the checkpoint"),
                            (tmp_path / "data", "is a folder"),
                            # another run's checkpoint, a scan: overwrite=true replaced them
                            (tmp_path / "run" / "other.ckpt", "name must end in .csv"),
                            (tmp_path / "scan.nii.gz", "name must end in .csv")]:
        with pytest.raises(UserError, match=message):
            check_output(output, ckpt)
    check_output(tmp_path / "run" / "last.ckpt.eval.csv", ckpt)  # beside it, as by default
    check_output(tmp_path / "data" / "scores.csv", ckpt)  # a new file beside the slices
