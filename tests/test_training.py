"""End to end on phantoms: a short fit improves, its folder holds what the tools read,
evaluate and predict work on its checkpoint, and a 2-value sweep makes 2 run folders."""

import csv
import json
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage
from helpers import TINY, compose_train, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from prostate_seg.runs import RESULTS_FILE, read_history
from prostate_seg.training import checks
from prostate_seg.training.callbacks import CONTOURS
from prostate_seg.training.dashboard import COLUMNS
from prostate_seg.training.fit import setup_data, train


def test_short_fit_improves_validation_dice(trained_run):
    rows = read_history(trained_run)
    assert [r["epoch"] for r in rows] == list(range(8))
    dice = [float(r["select/dice"]) for r in rows]
    assert max(dice[3:]) > dice[0] + 0.1, dice
    assert float(rows[-1]["train/loss"]) < float(rows[0]["train/loss"])


def test_run_folder_holds_checkpoints_events_results(trained_run):
    results = json.loads((trained_run / RESULTS_FILE).read_text())
    rows = read_history(trained_run)
    best = max(rows, key=lambda r: float(r["select/dice"]))
    # results.json = the best checkpoint re-validated = the best epoch's logged metrics
    assert results["best_epoch"] == int(best["epoch"])
    assert results["select/dice"] == pytest.approx(float(best["select/dice"]), abs=1e-5)
    assert results["epochs_trained"] == 8 and results["loss"] == "bce+tversky_a0.5"
    assert (trained_run / "checkpoints" / "last.ckpt").exists()
    assert len(list((trained_run / "checkpoints").glob("best-*.ckpt"))) == 1
    events = EventAccumulator(str(trained_run)).Reload()
    for tag in ("train/loss", "select/loss", "select/dice", "select/dice_global",
                "select/precision", "select/recall", "hp/best_select_dice"):
        assert tag in events.Tags()["scalars"], tag
    # Pooled pixel F1 is select/dice_global by definition: not logged twice.
    assert "select/f1" not in events.Tags()["scalars"] and "select/f1" not in results
    assert "select/predictions" in events.Tags()["images"]
    assert json.loads((trained_run / "status.json").read_text())["status"] == "completed"


def test_tensorboard_opens_on_the_curves_the_study_columns_and_readable_contours(trained_run):
    events = EventAccumulator(str(trained_run), size_guidance={"images": 0}).Reload()
    # Time Series: no "epoch" card before the curves (the CSV history keeps the epoch)
    assert "epoch" not in events.Tags()["scalars"] and "epoch" in read_history(trained_run)[0]
    # HPARAMS: the five columns TensorBoard shows, beside the study's Dice; hparams.yaml: all
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert sorted(h.name for h in experiment.hparam_infos) == sorted(COLUMNS)
    assert [m.name.tag for m in experiment.metric_infos] == ["hp/val_dice_original",
                                                             "hp/best_select_dice"]
    results = json.loads((trained_run / RESULTS_FILE).read_text())
    settings = yaml.safe_load((trained_run / "hparams.yaml").read_text())
    assert {"loss", "alpha", "beta", "fold", "seed", "lr", "batch_size", "image_size"} <= set(
        settings) and settings.items() <= results.items()
    # the contours, at least 256 pixels a slice, over a legend of their colours
    for image in events.Images("select/predictions"):
        grid = cv2.imdecode(np.frombuffer(image.encoded_image_string, np.uint8),
                            cv2.IMREAD_COLOR)[..., ::-1]
        assert grid.shape[0] >= 2 * 256 + 32  # 8 slices, 4 a row
        for colour in CONTOURS.values():
            assert (grid[-32:] == np.array(colour) * 255).all(-1).sum() > 20, colour


def test_the_best_epoch_is_the_best_checkpoints_whatever_it_monitors(prepared, tmp_path,
                                                                    worst_allowed):
    """One rule for results.json and the dashboard's best-checkpoint image: the epoch of the
    checkpoint ModelCheckpoint kept (here, configured so, the lowest selection Dice)."""
    run_dir = tmp_path / "run"
    results = train(compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=3",
                                   "callbacks.early_stopping.patience=10",
                                   "callbacks.model_checkpoint.mode=min"], run_dir))
    dice = [row["select/dice"] for row in read_history(run_dir)]
    assert results["best_epoch"] == dice.index(min(dice)) != dice.index(max(dice)), dice
    events = EventAccumulator(str(run_dir)).Reload()
    assert [g.step for g in events.Images("select/predictions_best")] == [results["best_epoch"]]


@pytest.fixture
def worst_allowed(monkeypatch):
    """The start-up check of monitors set aside, so a checkpoint may keep the lowest Dice: a
    choice that differs from the last and the best epoch shows which epoch the run reports."""
    monkeypatch.setattr(checks, "check_monitors", lambda cfg: None)


def test_averaged_weights_are_what_selection_scored_and_the_checkpoint_keeps(prepared, tmp_path,
                                                                           worst_allowed):
    """callbacks=averaged: the selection patients score the moving average of the weights, and
    the chosen checkpoint (configured so: the lowest Dice, not the last epoch's) holds it:
    re-validated, it gives its epoch's logged Dice; the raw weights ride along, different."""
    run_dir = tmp_path / "run"
    results = train(compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=3",
                                   "callbacks=averaged", "callbacks.early_stopping.patience=10",
                                   "callbacks.model_checkpoint.mode=min"], run_dir))
    dice = [row["select/dice"] for row in read_history(run_dir)]
    assert results["best_epoch"] == dice.index(min(dice)) != len(dice) - 1, dice
    assert results["select/dice"] == pytest.approx(min(dice), abs=1e-5)
    best = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    raw, averaged = best["current_model_state"], best["state_dict"]
    assert raw.keys() == averaged.keys()
    assert max((raw[k].float() - averaged[k].float()).abs().max() for k in raw) > 1e-3


def test_final_keeps_and_scores_the_last_epoch_and_measures_its_late_gain(prepared, tmp_path):
    """callbacks=final (the recipe's): the whole budget is trained, the kept checkpoint holds
    last.ckpt's weights, results.json re-validates it, and late_gain is read off the
    selection curve."""
    run_dir = tmp_path / "run"
    results = train(compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=5",
                                   "callbacks=final"], run_dir))
    dice = [row["select/dice"] for row in read_history(run_dir)]
    assert results["epochs_trained"] == 5 and not results["stopped_early"]
    assert results["best_epoch"] == 4 and Path(results["best_checkpoint"]).name == \
        "final-epoch004.ckpt"
    assert results["select/dice"] == pytest.approx(dice[-1], abs=1e-5)
    fitted = np.polyfit(np.arange(3), dice[-3:], 1)[0] * 3  # the last 3 epochs' pace
    assert results["late_gain"] == pytest.approx(fitted, abs=1e-4)
    kept = torch.load(results["best_checkpoint"], map_location="cpu")["state_dict"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)["state_dict"]
    assert kept.keys() == last.keys() and all(torch.equal(kept[k], last[k]) for k in kept)
    assert len(list((run_dir / "checkpoints").glob("*.ckpt"))) == 2  # final and last only

def test_run_scores_its_best_checkpoint_per_patient_at_original_size(trained_run, prepared,
                                                                      tmp_path):
    with open(trained_run / "per_patient.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    fold0 = json.loads((prepared / "split.json").read_text())["splits"][0]
    assert [r["patient"] for r in rows] == sorted(fold0["val"]) and len(rows) == 2
    assert {r["split"] for r in rows} == {"val"}
    assert list(rows[0]) == ["patient", "split", "dice", "precision", "recall", "hd95",
                             "hd95_failed", "hd95_unit", "voxels_pred", "voxels_true",
                             "voxels_total", "slices"]
    for row in rows:  # at the scan's original size (64 x 64 phantoms, not 48 x 48)
        assert int(row["voxels_total"]) == 64 * 64 * int(row["slices"])
    results = json.loads((trained_run / RESULTS_FILE).read_text())
    dice = [float(r["dice"]) for r in rows]
    assert results["val/dice_original"] == pytest.approx(np.mean(dice))
    assert results["val/hd95_original"] == pytest.approx(np.median([float(r["hd95"]) for r in rows]))
    assert results["val/patients"] == 2

    # evaluate.py on the best checkpoint, scoring the network's own output, gives the same rows
    ckpt = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    result = run_cli("evaluate.py", f"ckpt_path={ckpt}", "inference=plain", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(f"{ckpt}.eval.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["patient"] for r in table] == [r["patient"] for r in rows] + ["summary"]
    for mine, theirs in zip(rows, table):
        assert float(theirs["dice"]) == pytest.approx(float(mine["dice"]), abs=1e-9)
    again = run_cli("evaluate.py", f"ckpt_path={ckpt}", "inference=plain", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr

    # Another subset (README: `evaluate.py ckpt_path=CKPT subset=test` after the one above)
    # writes its own file and leaves the validation table alone.
    val_table = Path(f"{ckpt}.eval.csv").read_text()
    other = run_cli("evaluate.py", f"ckpt_path={ckpt}", "subset=select", "tta=false",
                    cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    with open(f"{ckpt}.eval-select-lcc.csv", newline="") as f:
        assert {r["split"] for r in csv.DictReader(f)} == {"select"}  # its summary too
    assert Path(f"{ckpt}.eval.csv").read_text() == val_table


def test_predict_writes_a_mask_on_the_scan_grid(trained_run, phantoms, tmp_path):
    """By default (conf/inference/default.yaml) with flip TTA and the largest component, and
    as evaluate scores it by default."""
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    scan = phantoms / "images" / "phantom002.nii.gz"
    out = tmp_path / "pred" / "phantom002.nii.gz"
    result = run_cli("predict.py", f"ckpt_path={ckpt}", f"input={scan}", f"output={out}",
                     "save_probabilities=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    source, mask = nib.load(scan), nib.load(out)
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert mask.get_data_dtype() == np.uint8
    predicted = np.asarray(mask.dataobj).astype(bool)
    truth = np.asarray(nib.load(phantoms / "masks" / "phantom002.nii.gz").dataobj).astype(bool)
    assert 0 < predicted.sum() < 0.2 * predicted.size
    assert 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()) > 0.3
    prob = nib.load(tmp_path / "pred" / "phantom002_prob.nii.gz")
    assert prob.shape == source.shape and prob.get_data_dtype() == np.float32
    assert (predicted <= (np.asarray(prob.dataobj) > 0.5)).all()  # a component kept, no more
    assert ndimage.label(predicted)[1] == 1
    from prostate_seg.inference.predict import predict_paths
    predict_paths(ckpt, scan, tmp_path / "plain" / "phantom002.nii.gz", save_probabilities=True,
                  tta=False, device="cpu")
    plain_prob = np.asarray(nib.load(tmp_path / "plain" / "phantom002_prob.nii.gz").dataobj)
    assert not np.allclose(plain_prob, np.asarray(prob.dataobj))  # the mirror was averaged in

    scored = tmp_path / "scores.csv"
    result = run_cli("evaluate.py", f"ckpt_path={ckpt}", "subset=all", f"output={scored}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(scored, newline="") as f:
        table = list(csv.DictReader(f))
    [row] = [r for r in table if r["patient"] == "phantom002"]
    # one summary per split: the patients the model trained on are never averaged in with
    # the held-out ones
    splits = list(dict.fromkeys(r["split"] for r in table if r["patient"] != "summary"))
    assert len(splits) >= 3 and [r["split"] for r in table if r["patient"] == "summary"] == splits
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert float(row["dice"]) == pytest.approx(dice, abs=1e-9)
    assert int(row["voxels_pred"]) == predicted.sum()


def test_a_scan_from_another_scanner_is_segmented_as_it_is_evaluated(trained_run, phantoms,
                                                                     tmp_path):
    """A validation patient's scan as another centre or coil might record it: unchanged,
    predict's Dice is evaluate's; under another gain and offset (the window is linear per scan)
    it is the same; under another contrast curve as well it stays within 0.15 of it (instance
    norm and gamma augmentation; with batch norm it collapsed to 0: docs/RESULTS.md; the margin
    is a tiny 8-epoch model's, and moves with its training draws). Both ways of scoring: the
    network's own output (per_patient.csv) and the tools' default, mirrored + largest component."""
    from prostate_seg.inference.evaluate import evaluate_checkpoint
    from prostate_seg.inference.predict import predict_paths

    with open(trained_run / "per_patient.csv", newline="") as f:
        row = next(csv.DictReader(f))
    best = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    scored = evaluate_checkpoint(best, largest_component=True, tta=True, device="cpu")
    [default] = [r for r in scored if r["patient"] == row["patient"]]
    evaluated = {False: float(row["dice"]), True: default["dice"]}
    source = nib.load(phantoms / "images" / f"{row['patient']}.nii.gz")
    data = np.asarray(source.dataobj, dtype=np.float64)
    unit = (data - data.min()) / (data.max() - data.min())
    truth = np.asarray(nib.load(phantoms / "masks" / f"{row['patient']}.nii.gz").dataobj) > 0
    for k, (gamma, gain, offset, within) in enumerate([(1.0, 1.0, 0.0, 1e-6),
                                                       (1.0, 9.0, 400.0, 0.005),
                                                       (1.7, 9.0, 400.0, 0.15),
                                                       (0.6, 0.2, 0.0, 0.15)]):
        scan = phantoms / "images" / f"{row['patient']}.nii.gz"
        if k:
            scan = tmp_path / f"scan{k}.nii.gz"
            nib.save(nib.Nifti1Image((gain * data.max() * unit ** gamma + offset).astype(
                np.float32), source.affine), scan)
        for post in (False, True):
            [out] = predict_paths(best, scan, tmp_path / f"mask{k}-{post}.nii.gz",
                                  largest_component=post, tta=post, device="cpu")
            predicted = np.asarray(nib.load(out).dataobj).astype(bool)
            dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
            assert dice == pytest.approx(evaluated[post], abs=within), (gamma, gain, post, dice)
    assert min(evaluated.values()) > 0.3  # a model that segments something


@pytest.mark.extra  # 17 s; sweeps run in make test through test_sweeps, test_tracking, test_logs
def test_two_job_sweep_makes_two_named_runs_compared_in_tensorboard(prepared_copy, tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    sweep = tmp_path / "sweep"
    result = run_cli("train.py", "-m", f"data.dir={prepared_copy}", "experiment=demo",
                     "loss=bce,tversky", "loss.alpha=0.75", f"hydra.sweep.dir={sweep}",
                     *[o for o in TINY if not o.startswith(("model=", "trainer="))],
                     "trainer.max_epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "report")
    assert folders == ["bce-fold0-seed0", "tversky_a0.75-fold0-seed0"]
    for folder in folders:
        run = sweep / folder
        assert (run / "checkpoints" / "last.ckpt").exists()
        assert (run / ".hydra" / "config.yaml").exists()
    assert (sweep / "report" / "results.md").exists()
    # the basic launcher runs both jobs in one process: the second's start-up is its own
    # (no imports), not the process's age
    startup = [json.loads((sweep / f / RESULTS_FILE).read_text())["seconds_to_first_step"]
               for f in folders]
    assert 0 < startup[1] < startup[0]

    # TensorBoard on the sweep folder: one run per job, named like its folder
    events = EventMultiplexer().AddRunsFromDirectory(str(sweep)).Reload()
    assert sorted(events.Runs()) == folders
    hparams = events.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    for run in folders:
        # whichever run's columns TensorBoard takes: the same five, the study's Dice first
        experiment = metadata.parse_experiment_plugin_data(hparams[run][metadata.EXPERIMENT_TAG])
        assert sorted(h.name for h in experiment.hparam_infos) == sorted(COLUMNS)
        assert [m.name.tag for m in experiment.metric_infos] == ["hp/val_dice_original",
                                                                 "hp/best_select_dice"]
        results = json.loads((sweep / run / RESULTS_FILE).read_text())
        values = metadata.parse_session_start_info_plugin_data(
            hparams[run][metadata.SESSION_START_INFO_TAG]).hparams
        assert values["loss"].string_value == results["loss"]
        assert values["lr"].number_value == pytest.approx(0.003)
        if run.startswith("bce"):
            assert results["alpha"] is None and values["alpha"].string_value == "None"
        else:
            assert results["alpha"] == values["alpha"].number_value == 0.75
        study_dice = events.Scalars(run, "hp/val_dice_original")
        assert study_dice[-1].value == pytest.approx(results["val/dice_original"])
        # contours after the first and the last epoch, and of the best checkpoint
        grids = events.Images(run, "select/predictions")
        assert [g.step for g in grids] == [0, 1]
        best = events.Images(run, "select/predictions_best")
        assert [g.step for g in best] == [results["best_epoch"]]

    # the README's evaluate command works with a checkpoint path from the sweep, pasted as is
    best = next((sweep / folders[0] / "checkpoints").glob("best-*.ckpt"))
    evaluated = run_cli("evaluate.py", f"ckpt_path={best}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]


def test_predict_a_folder_of_scans(trained_run, phantoms, tmp_path):
    from prostate_seg.inference.predict import predict_paths

    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("phantom000", "phantom005"):
        (scans / f"{name}.nii.gz").symlink_to(phantoms / "images" / f"{name}.nii.gz")
    (scans / "notes.txt").write_text("not a scan")
    written = predict_paths(trained_run / "checkpoints" / "last.ckpt", scans, tmp_path / "masks",
                            largest_component=True)
    assert sorted(p.name for p in written) == ["phantom000.nii.gz", "phantom005.nii.gz"]
    for path in written:
        mask = np.asarray(nib.load(path).dataobj)
        from scipy import ndimage

        assert ndimage.label(mask)[1] <= 1  # largest connected component only


def test_predict_says_which_scans_the_checkpoint_has_seen(trained_run, phantoms, tmp_path, caplog):
    from prostate_seg.inference.predict import predict_paths
    from prostate_seg.inference.predictor import load_checkpoint

    split = load_checkpoint(trained_run / "checkpoints" / "last.ckpt", torch.device("cpu")).cfg.split
    scans = tmp_path / "scans"
    scans.mkdir()
    chosen = [split.train[0], split.select[0], split.val[0]]
    for name in chosen:
        (scans / f"{name}_0000.nii.gz").symlink_to(phantoms / "images" / f"{name}.nii.gz")
    with caplog.at_level("WARNING"):
        predict_paths(trained_run / "checkpoints" / "last.ckpt", scans, tmp_path / "masks")
    [line] = [r.getMessage() for r in caplog.records if "has seen" in r.getMessage()]
    assert line.startswith("2 of 3 scans are patients this checkpoint has seen: ")
    assert f"1 trained on ({split.train[0]})" in line and f"1 chose its epoch ({split.select[0]})" in line
    assert split.val[0] not in line


def test_the_plateau_schedule_halves_the_learning_rate_when_select_dice_stalls(prepared,
                                                                               tmp_path):
    """scheduler=plateau reads select/dice once an epoch: at a learning rate too small to change
    the predictions the Dice stays put, so with patience 0 each epoch from the second on halves
    the rate for the next, with no epoch budget to decay over (max_epochs=-1; four epochs by
    max_steps)."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.dir={prepared}", "scheduler=plateau", "scheduler.patience=0",
                 "scheduler.min_lr=0", "+scheduler.eps=0",  # eps: no cut below 1e-8
                 "optimizer.lr=1e-9", "trainer.max_epochs=-1", "callbacks=final"]
    steps = len(setup_data(compose_train(overrides, run_dir)).train_set) // 8  # TINY's batch
    train(compose_train([*overrides, f"+trainer.max_steps={4 * steps}"], run_dir))
    dice = [row["select/dice"] for row in read_history(run_dir)]
    assert len(dice) == 4 and len(set(dice)) == 1, dice
    with open(run_dir / "metrics" / "version_0" / "metrics.csv", newline="") as f:
        used = [float(row["lr-Adam"]) for row in csv.DictReader(f) if row["lr-Adam"]]
    assert used == pytest.approx([1e-9, 1e-9, 0.5e-9, 0.25e-9], rel=1e-6, abs=0)
    schedule = torch.load(run_dir / "checkpoints" / "last.ckpt",
                          weights_only=False)["lr_schedulers"][0]
    assert schedule["best"] == pytest.approx(dice[0])  # it read select/dice, the maximum
    # validated every other epoch, the schedule waits for the next validation (Lightning
    # refused an epoch without the metric, after the run's folder was made)
    sparse = tmp_path / "sparse"
    train(compose_train([*overrides, f"+trainer.max_steps={2 * steps}",
                         "+trainer.check_val_every_n_epoch=2"], sparse))
    assert [row["epoch"] for row in read_history(sparse) if "select/dice" in row] == [1]
