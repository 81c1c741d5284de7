"""The study protocol: k-fold patient splits, per-patient results at original size from the
split stored in the checkpoint, and runs that know (and defend) their own config."""

import csv
import json
import shutil

import pytest
import torch
from helpers import TINY, compose_train, run_cli

from prostate_seg.data.split import SplitSettings, check_folds, make_folds
from prostate_seg.errors import ConfigError, DataError
from prostate_seg.inference.evaluate import evaluate_checkpoint
from prostate_seg.runs import RunLock
from prostate_seg.training.fit import identity_of, setup_data, train

PATIENTS = [f"p{i:02d}" for i in range(23)]


# --- the split ------------------------------------------------------------------------------
@pytest.mark.parametrize("folds, seed", [(5, 0), (3, 7), (2, 1)])
def test_every_patient_validates_in_exactly_one_fold_and_chooses_nothing_there(folds, seed):
    cv = make_folds(PATIENTS, SplitSettings(folds=folds, split_seed=seed))
    vals = [set(fold.val) for fold in cv.folds]
    assert sorted(p for v in vals for p in v) == PATIENTS  # each once, nobody lost
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    for k in range(folds):
        split = cv.fold(k)
        train, select, val = set(split.train), set(split.select), set(split.val)
        assert train and select and val
        assert train.isdisjoint(select) and train.isdisjoint(val) and select.isdisjoint(val)
        assert train | select | val == set(PATIENTS)
        assert len(select) == max(1, round(0.15 * (len(PATIENTS) - len(val))))
    assert make_folds(PATIENTS, SplitSettings(folds=folds, split_seed=seed)) == cv
    assert make_folds(PATIENTS, SplitSettings(folds=folds, split_seed=seed + 1)) != cv


@pytest.mark.parametrize("settings, n_test", [
    (SplitSettings(folds=4, test_fraction=0.2), 5),
    (SplitSettings(folds=4, test_patients=("p03", "p11")), 2),
])
def test_test_patients_are_outside_every_fold(settings, n_test):
    cv = make_folds(PATIENTS, settings)
    assert len(cv.test) == n_test
    for k in range(4):
        split = cv.fold(k)
        assert set(cv.test).isdisjoint(set(split.train) | set(split.select) | set(split.val))
    assert sorted(set(cv.test).union(*(fold.val for fold in cv.folds))) == PATIENTS


@pytest.mark.parametrize("settings, message", [
    (SplitSettings(folds=30), "needs at least 30 patients"),
    (SplitSettings(folds=2, select_fraction=0.99), "would keep no training patient"),
    (SplitSettings(folds=3, test_patients=("nobody",)), "nobody not in the dataset"),
    (SplitSettings(folds=3, test_patients=("p01",), test_fraction=0.1), "choose one"),
])
def test_impossible_splits_are_one_line_errors(settings, message):
    with pytest.raises((ConfigError, DataError), match=message):
        make_folds(PATIENTS, settings)


def _edit_split(data_dir, edit):
    path = data_dir / "split.json"
    stored = json.loads(path.read_text())
    edit(stored)
    path.write_text(json.dumps(stored))


def _validate_a_patient_in_two_folds(stored):
    patient = stored["splits"][0]["val"][0]
    fold1 = stored["splits"][1]
    fold1["train"] = [p for p in fold1["train"] if p != patient]
    fold1["select"] = [p for p in fold1["select"] if p != patient]
    fold1["val"].append(patient)


def _empty_fold0(stored):
    stored["splits"][0]["val"] = []


def _train_on_val(stored):
    stored["splits"][0]["train"].append(stored["splits"][0]["val"][0])


def _select_a_val_patient(stored):
    stored["splits"][0]["select"].append(stored["splits"][0]["val"][0])


def _old_format(stored):
    stored.clear()
    stored.update({"train": ["phantom000"], "val": ["phantom001"], "split_seed": 0,
                   "val_fraction": 0.2})


def _drop_a_patient(stored):  # a consistent file, but of one patient fewer than the data
    selecting = {p for split in stored["splits"] for p in split["select"]}
    gone = next(p for p in stored["splits"][0]["val"] if p not in selecting)
    stored["splits"][0]["val"].remove(gone)
    for split in stored["splits"]:
        split["train"] = [p for p in split["train"] if p != gone]


@pytest.mark.parametrize("edit, message", [
    (_validate_a_patient_in_two_folds, "is validated in folds 0 and 1"),
    (_empty_fold0, "fold 0 has no val patients"),
    (_train_on_val, "in both train and val"),
    (_select_a_val_patient, "in both select and val"),
    (_old_format, "older format"),
    (_drop_a_patient, "patients no longer match the dataset"),
])
def test_a_bad_split_file_is_refused_at_start_up_in_one_line(prepared_copy, tmp_path, edit,
                                                             message, capsys):
    from prostate_seg import cli

    cfg = compose_train([*TINY, f"data.dir={prepared_copy}"], tmp_path / "first")
    setup_data(cfg)  # writes split.json
    _edit_split(prepared_copy, edit)
    with pytest.raises(SystemExit) as stopped:  # the command line's own handling of the error
        cli._run(train, compose_train([*TINY, f"data.dir={prepared_copy}"], tmp_path / "run"))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "split.json" in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_hand_checked_rules_hold_for_the_generated_split():
    check_folds(make_folds(PATIENTS, SplitSettings(folds=5, test_fraction=0.1)), "generated")


# --- per-patient results of a run -----------------------------------------------------------
@pytest.fixture(scope="module")
def run_with_test_patients(prepared, tmp_path_factory):
    """2 epochs on fold 1 of 3 with two held-out test patients (its own copy of the data)."""
    root = tmp_path_factory.mktemp("protocol")
    data = root / "data"
    shutil.copytree(prepared, data)
    (data / "split.json").unlink(missing_ok=True)
    run_dir = root / "run"
    overrides = [*TINY, f"data.dir={data}", "data.folds=3", "data.fold=1",
                 "data.test_patients=[phantom003,phantom006]", "trainer.max_epochs=2"]
    train(compose_train(overrides, run_dir))
    return run_dir, data, overrides


def test_test_patients_are_scored_but_choose_nothing(run_with_test_patients):
    run_dir, data, _ = run_with_test_patients
    with open(run_dir / "per_patient.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    split = json.loads((data / "split.json").read_text())
    assert [r["patient"] for r in rows if r["split"] == "val"] == sorted(split["splits"][1]["val"])
    assert not {r["patient"] for r in rows} & set(split["splits"][1]["select"])
    assert [r["patient"] for r in rows if r["split"] == "test"] == ["phantom003", "phantom006"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test/patients"] == 2 and results["val/patients"] == len(split["splits"][1]["val"])
    assert results["fold"] == 1 and results["folds"] == 3
    test_dice = [float(r["dice"]) for r in rows if r["split"] == "test"]
    assert results["test/dice_original"] == pytest.approx(sum(test_dice) / 2)
    # the test patients never entered validation (which chooses the epoch and checkpoint)
    checkpoint = torch.load(next((run_dir / "checkpoints").glob("best-*.ckpt")),
                            map_location="cpu", weights_only=False)
    stored = checkpoint["hyper_parameters"]["cfg"]["split"]
    assert stored["test"] == ["phantom003", "phantom006"] and stored["fold"] == 1
    assert set(stored["test"]).isdisjoint(stored["val"] + stored["train"] + stored["select"])


def test_evaluate_uses_the_checkpoint_split_and_refuses_other_data(run_with_test_patients,
                                                                   tmp_path):
    run_dir, data, _ = run_with_test_patients
    ckpt = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    with open(run_dir / "per_patient.csv", newline="") as f:
        written = {r["patient"]: float(r["dice"]) for r in csv.DictReader(f)}
    rows = evaluate_checkpoint(ckpt, subset="test")
    assert {r["patient"]: r["dice"] for r in rows} == pytest.approx(
        {p: d for p, d in written.items() if p in ("phantom003", "phantom006")})
    # the same data, split otherwise: refused (it would score training patients)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    _edit_split(other, lambda s: s["splits"].append(s["splits"].pop(0)))  # folds rotated
    with pytest.raises(DataError, match="differs from the split the checkpoint was trained with"):
        evaluate_checkpoint(ckpt, data_dir=other)
    # prepared with fit=pad where the checkpoint saw fit=resize: refused
    settings = json.loads((data / "prepare.json").read_text())
    (other / "split.json").unlink()
    (other / "prepare.json").write_text(json.dumps({**settings, "fit": "pad"}))
    with pytest.raises(DataError, match="fit=pad"):
        evaluate_checkpoint(ckpt, data_dir=other)
    # without prepare.json, how it was prepared is unknown: refused, not scored
    (other / "prepare.json").unlink()
    with pytest.raises(ConfigError, match=f"data.dir={other}: not a prepared dataset \\(no "
                                          "prepare.json"):
        evaluate_checkpoint(ckpt, data_dir=other)


def test_val_dice_counts_only_the_volumes_seen(prepared_copy, tmp_path):
    """With limit_val_batches=1 only the first volume's slices are validated: select/dice is
    that volume's Dice, not an average with unseen volumes counted as 1."""
    from prostate_seg.training.fit import build_run

    cfg = compose_train([*TINY, f"data.dir={prepared_copy}", "data.folds=2",
                         "data.select_fraction=0.5", "+trainer.limit_val_batches=1",
                         "data.batch_size=4"], tmp_path / "run")
    datamodule, module, trainer = build_run(cfg)
    assert len(datamodule.select_set.patients) == 2
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["volume"].unique().tolist() == [0]  # one volume seen
    with torch.no_grad():
        pred = module.eval()(batch["image"]) > 0
    truth = batch["mask"] > 0.5
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    expected = 1.0 if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))
    assert metrics["select/dice"] == pytest.approx(expected, abs=1e-6)


# --- config identity ------------------------------------------------------------------------
def test_identity_ignores_paths_speed_and_logging_but_not_settings(prepared, tmp_path):
    def identity(*overrides, data=prepared):
        cfg = compose_train([*TINY, f"data.dir={data}", *overrides], tmp_path / "run")
        return identity_of(cfg, setup_data(cfg))

    base = identity()
    moved = tmp_path / "moved"
    shutil.copytree(prepared, moved)
    same = [identity("data.num_workers=1", "data.cache=true", "+trainer.strategy=ddp",
                     "+trainer.sync_batchnorm=true",  # one process: no statistics to share
                     "callbacks.progress_bar.refresh_rate=5", "paths.output_root=elsewhere",
                     "resume=false", "callbacks.model_checkpoint.save_top_k=2",
                     "callbacks.model_checkpoint.auto_insert_metric_name=true",
                     "callbacks.model_checkpoint.save_weights_only=false"),
            identity(data=moved)]
    assert all(i.hash == base.hash for i in same)
    for override in ("optimizer.lr=0.01", "model.net.features=[4,8]", "loss=bce",
                     "trainer.max_epochs=7", "seed=3", "data.fold=2", "trainer.devices=2",
                     "trainer=ddp_cpu"):
        other = identity(override)
        assert other.hash != base.hash, override
        assert (other.group == base.group) == (override in ("seed=3", "data.fold=2")), override
    # a re-prepared dataset (other content) is another identity, whatever its path
    changed = tmp_path / "changed"
    shutil.copytree(prepared, changed)
    with open(changed / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["gland_pixels"] = str(int(rows[0]["gland_pixels"]) + 1)
    with open(changed / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert identity(data=changed).hash != base.hash


def test_a_completed_run_is_never_reused_under_another_config(trained_run, prepared, tmp_path):
    status = json.loads((trained_run / "status.json").read_text())
    results = json.loads((trained_run / "results.json").read_text())
    assert status["identity"]["hash"] == results["identity"]
    before = (trained_run / "results.json").read_text()
    files = sorted(p.relative_to(trained_run) for p in trained_run.rglob("*"))
    result = run_cli("train.py", *TINY, f"data.dir={prepared}", "trainer.max_epochs=8",
                     "callbacks.early_stopping.patience=8", "loss=bce_tversky",
                     "model.net.features=[4,8]", f"hydra.run.dir={trained_run}", cwd=tmp_path)
    assert result.returncode == 2
    assert "model.net.features: [8, 16] -> [4, 8]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (trained_run / "results.json").read_text() == before
    after = sorted(p.relative_to(trained_run) for p in trained_run.rglob("*"))
    assert set(files) <= set(after)  # the refused command removed nothing
    assert {str(p) for p in set(after) - set(files)} <= {
        ".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log"}


def test_last_checkpoint_of_another_config_is_not_resumed(prepared, tmp_path):
    run_dir = tmp_path / "run"
    common = [*TINY, f"data.dir={prepared}", "trainer.max_epochs=1"]
    train(compose_train(common, run_dir))
    (run_dir / "status.json").unlink()  # as if interrupted: only last.ckpt is there
    with pytest.raises(ConfigError, match=r"optimizer.lr: 0.003 -> 0.01"):
        train(compose_train([*common, "optimizer.lr=0.01"], run_dir))


def test_a_run_folder_in_use_by_a_live_process_is_refused(prepared, tmp_path):
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir)
    lock.acquire()  # another live process (here: this one) is working in the folder
    try:
        result = run_cli("train.py", *TINY, f"data.dir={prepared}", "trainer.max_epochs=1",
                         f"hydra.run.dir={run_dir}", cwd=tmp_path)
    finally:
        lock.release()
    assert result.returncode == 2 and "run folder in use by pid" in result.stderr
    assert not (run_dir / "checkpoints").exists()
