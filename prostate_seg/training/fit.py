"""One training run: config check -> data -> model -> Trainer.fit -> results of the best model."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from prostate_seg.training.callbacks import FirstStepTimer, checkpoint_epoch
from prostate_seg.training.checks import check_ddp_launch, check_train_config
from prostate_seg.config import configure_cpu_threads, uses_gpu
from prostate_seg.training.dashboard import log_settings, log_validation_dice
from prostate_seg.data.datamodule import SliceDataModule
from prostate_seg.data.prepare import dataset_fingerprint
from prostate_seg.errors import ConfigError
from prostate_seg.inference.evaluate import PER_PATIENT_FIELDS, evaluate_patients, split_scores
from prostate_seg.files import make_folder, replacing, write_csv, write_json
from prostate_seg.inference.predictor import load_checkpoint
from prostate_seg.training.module import SegmentationModule
from prostate_seg.training.requeue import DeferredRequeue
from prostate_seg.study.runs import (
    LAST_CHECKPOINT,
    OBJECTIVE,
    PER_PATIENT_FILE,
    PREVIEW_FILE,
    RESULTS_FILE,
    Identity,
    RunLock,
    RunStatus,
    claim,
    config_identity,
    forget_held_log,
    load_json_object,
    split_digest,
)
from prostate_seg.training.tracking import log_run_files

log = logging.getLogger(__name__)
PREVIEW_SLICES = 4
# Why a run has no per_patient.csv (Lightning's fast_dev_run, debug=fast_dev_run, saves none).
NO_BEST_CHECKPOINT = "no best checkpoint was saved (trainer.fast_dev_run saves none)"


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The settings that tell runs apart (results.json, hparams.yaml, MLflow's params); alpha and
    beta are numbers, or None for a loss without them."""
    alpha, beta = cfg.loss.get("alpha"), cfg.loss.get("beta")
    if alpha is not None and beta is None:
        beta = round(1.0 - alpha, 6)  # the Tversky default, stated explicitly
    return {
        "loss": str(cfg.loss.get("name")),
        "alpha": alpha,
        "beta": beta,
        "seed": cfg.seed,
        "fold": cfg.data.fold,
        "folds": cfg.data.folds,
        "lr": cfg.optimizer.lr,
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "net": str(cfg.model.net._target_),
        "features": str(list(cfg.model.net.features)) if "features" in cfg.model.net else "-",
        "context_slices": cfg.data.context_slices,
        "scheduler": str((cfg.get("scheduler") or {}).get("_target_", "none")).rsplit(".", 1)[-1],
        "max_epochs": cfg.trainer.max_epochs,
    }


def _refuse_other_identity(identity: Identity, stored: Identity | None, what: str) -> None:
    """A run folder holds one configuration: continuing or skipping it under another would
    put old results under the new settings."""
    if stored is None:
        raise ConfigError(f"{what} records no config identity (made by an older version); "
                          "write this run to another folder, or resume=false to train anew")
    changes = identity.differences(stored)
    if changes:
        raise ConfigError(f"{what} was made with another config or code ({'; '.join(changes)}); "
                          "write this run to another folder, or resume=false to train anew")


def _checkpoint_identity(path: Path) -> Identity | None:
    # mmap: the tensors are not read, only the stored config
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return Identity.from_dict(checkpoint.get("hyper_parameters", {}).get("cfg", {}).get("identity"))


def _checkpoint_to_resume(cfg: DictConfig, run_dir: Path, identity: Identity) -> str | None:
    last = run_dir / LAST_CHECKPOINT
    if cfg.ckpt_path == "last":
        if not last.exists():
            raise ConfigError(f"ckpt_path=last: no {last} in this run folder (set hydra.run.dir "
                              "to the run to continue, or give ckpt_path=PATH)")
    elif cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: file not found")
        return str(cfg.ckpt_path)  # the user's own choice of starting point
    elif not (cfg.resume and last.exists()):
        return None
    _refuse_other_identity(identity, _checkpoint_identity(last), str(last))
    return str(last)


def _completed_results(cfg: DictConfig, run_dir: Path, identity: Identity) -> dict[str, Any] | None:
    """The results of a completed run of this config in ``run_dir`` (a job started again has
    nothing to do), or None."""
    status = RunStatus(run_dir)
    done = load_json_object(run_dir / RESULTS_FILE)[0]
    if not (cfg.resume and status.state == "completed" and done is not None) or cfg.ckpt_path:
        return None
    _refuse_other_identity(identity, status.identity, f"the completed run in {run_dir}")
    return done


def _unscored(cfg: DictConfig, run_dir: Path, done: dict[str, Any]) -> bool:
    """A completed run without the per-patient results asked for (trained with
    evaluate_best=false), which could have them (a best checkpoint was saved)."""
    return bool(cfg.evaluate_best) and "not_evaluated" not in done and not (
        run_dir / PER_PATIENT_FILE).exists()


def refuse_other_config(cfg: DictConfig, run_dir: Path) -> None:
    """Raise the error the job would raise at its start if ``run_dir`` holds a completed run
    or a last.ckpt of another config (for checks before a sweep starts)."""
    identity = identity_of(cfg)
    if _completed_results(cfg, run_dir, identity) is None:
        _checkpoint_to_resume(cfg, run_dir, identity)


def check_job(cfg: DictConfig, job_dir: Path) -> None:
    """What a job would refuse at its start, found before any job starts: bad values, a
    missing or unprepared data folder, a job folder holding a run of another config."""
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    check_train_config(task)
    check_ddp_launch(task.trainer, cfg.hydra)
    refuse_other_config(task, job_dir)


def save_preview(module: SegmentationModule, datamodule: SliceDataModule, path: Path) -> None:
    """The model's probabilities on fixed validation slices (the largest gland slice of the
    first few validation patients): every run of a sweep shares them, so the report can draw
    every model's contour on the same slice."""
    dataset = datamodule.val_set
    best: dict[int, tuple[int, int]] = {}
    for i in range(len(dataset)):
        area = dataset.gland_pixels(i)
        volume = dataset.volume_index[i]
        if area > best.get(volume, (-1, -1))[0]:
            best[volume] = (area, i)
    indices = [best[v][1] for v in sorted(best)][:PREVIEW_SLICES]
    samples = [dataset[i] for i in indices]
    image = torch.stack([s["image"] for s in samples])
    module.eval()
    with torch.no_grad():
        prob = torch.sigmoid(module(image.to(module.device)).float()).cpu()
    np.savez_compressed(
        path, image=image[:, image.shape[1] // 2].numpy().astype(np.float16),
        mask=torch.stack([s["mask"][0] for s in samples]).numpy().astype(np.uint8),
        prob=prob[:, 0].numpy().astype(np.float16),
        names=np.array([dataset.records[i].image.name for i in indices]))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all: serialised into a temporary file beside the
    target, flushed, then renamed over it. (Lightning's own save writes a temporary in the
    system's temp folder and moves it, which is a copy when that folder is on another disk:
    a full disk then leaves a truncated last.ckpt that blocks every resume.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        make_folder(path.parent)
        with replacing(path) as tmp:
            torch.save(checkpoint, tmp)


def _trainer(cfg: DictConfig) -> pl.Trainer:
    # An entry set to null (callbacks.early_stopping=null, as debug=overfit does) is left out.
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    options: dict[str, Any] = {}
    if not sys.stderr.isatty():
        # A progress bar in a file (a sweep job's log, output piped to a file) is a heap of
        # carriage-return frames; the EpochLog line says what matters once per epoch.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        options["enable_progress_bar"] = False
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Under SLURM the launcher (submitit) requeues; Lightning must not do it a second time.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                       **options)


def setup_data(cfg: DictConfig) -> SliceDataModule:
    """The run's data, checked whole (manifest, every file, the split) before any model work."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: SliceDataModule = instantiate(cfg.data, seed=cfg.seed)
    datamodule.setup("fit")
    return datamodule


def identity_of(cfg: DictConfig, datamodule: SliceDataModule | None = None) -> Identity:
    """The run's identity (``datamodule``: the run's, set up; else only its split is read)."""
    if datamodule is None:
        datamodule = instantiate(cfg.data)
        folds = datamodule.load_folds()
    else:
        folds = datamodule.folds
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return config_identity(task, dataset_fingerprint(datamodule.dir), split_digest(folds.to_dict()))


def build_run(cfg: DictConfig, datamodule: SliceDataModule | None = None,
              identity: Identity | None = None
              ) -> tuple[SliceDataModule, SegmentationModule, pl.Trainer]:
    """Data (checked), model and Trainer of a run, exactly as ``train`` uses them."""
    datamodule = datamodule or setup_data(cfg)
    identity = identity or identity_of(cfg, datamodule)
    record = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                    resolve=True)
    # What the model was trained on travels with the checkpoint: predict preprocesses new
    # scans so, and evaluate scores the patients this fold never trained on.
    record.update(preprocessing=load_json_object(datamodule.dir / "prepare.json")[0],
                  split=datamodule.split.to_dict(), identity=identity.to_dict())
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the initial weights follow the seed
    module = SegmentationModule(record)
    trainer = _trainer(cfg)
    log_settings(trainer.loggers, hparams_of(cfg))
    return datamodule, module, trainer


# When this process began its current job, if it ran another before (Hydra's basic launcher
# runs a sweep's jobs in one process): a later job's start-up is timed from there.
_later_job_started: float | None = None
_jobs_in_process = 0


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue) one training job in Hydra's output folder; returns its results.
    Until every refusal is behind it the job writes nothing into the folder (study/runs.py
    claim), so a refused command leaves another run's folder as it was."""
    global _later_job_started, _jobs_in_process
    _jobs_in_process += 1
    _later_job_started = time.monotonic() if _jobs_in_process > 1 else None
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    lock = RunLock(run_dir, stamp=False)
    locked = claimed = False
    try:
        check_train_config(cfg)
        check_ddp_launch(cfg.trainer, HydraConfig.get())
        if not uses_gpu(cfg.trainer.accelerator):
            log.info("CPU threads: %d", configure_cpu_threads(cfg.data.num_workers))
        if rank_zero_only.rank == 0:
            lock.acquire()
            locked = True
        datamodule = setup_data(cfg)
        identity = identity_of(cfg, datamodule)
        done = _completed_results(cfg, run_dir, identity)
        if done is not None and not _unscored(cfg, run_dir, done):
            log.info("%s already completed; nothing to do (resume=false to train again)",
                     run_dir)
            return done
        ckpt_path = _checkpoint_to_resume(cfg, run_dir, identity) if done is None else None
        if rank_zero_only.rank == 0:
            claim(run_dir, cfg, lock)
        claimed = True
        return _train_claimed(cfg, run_dir, datamodule, identity, done, ckpt_path)
    finally:
        if not claimed:
            forget_held_log()
        if locked:
            lock.release() if claimed else lock.release_unused()


def _train_claimed(cfg: DictConfig, run_dir: Path, datamodule: SliceDataModule,
                   identity: Identity, done: dict[str, Any] | None,
                   ckpt_path: str | None) -> dict[str, Any]:
    if done is not None:
        if done.get("best_checkpoint") and Path(done["best_checkpoint"]).is_file():
            log.info("%s completed without %s: scoring its best checkpoint", run_dir,
                     PER_PATIENT_FILE)
            return _score_completed(cfg, run_dir, datamodule, identity, done)
        log.info("%s completed without %s or a best checkpoint to score: training again",
                 run_dir, PER_PATIENT_FILE)
    if ckpt_path is None:
        # Given none, Lightning's fit continues from a last.ckpt it finds in the folder (as it
        # does for an on-exception checkpoint): a run trained anew removes the one it replaces.
        (run_dir / LAST_CHECKPOINT).unlink(missing_ok=True)
    status = RunStatus(run_dir)
    if rank_zero_only.rank == 0:
        status.running(resumed_from=ckpt_path, identity=identity)
    requeue = DeferredRequeue.take_over()  # under submitit: SLURM's time-limit signal
    try:
        try:
            results = _fit(cfg, run_dir, ckpt_path, datamodule, identity, requeue)
        except SIGTERMException:  # stopped at a batch boundary, last.ckpt saved
            if requeue is not None:
                requeue.hand_over()  # after the time-limit signal: requeued, or failed for good
            raise
    except BaseException as exc:
        if rank_zero_only.rank == 0:
            _record_failure(status, exc)
        if isinstance(exc, SIGTERMException):  # Lightning's is a SystemExit with status 0
            raise SystemExit(128 + signal.SIGTERM) from exc
        raise
    finally:
        if requeue is not None:
            requeue.release()
    if rank_zero_only.rank == 0:
        status.completed()
    return results


def _record_failure(status: RunStatus, exc: BaseException) -> None:
    """Mark the run failed (or interrupted) with its error. When status.json cannot be written
    either (the same full disk), that error ends the process, naming the file, so that no
    "running" status is left looking alive without anyone saying so."""
    try:
        status.failed(exc)
    except OSError as write_error:
        log.error("run failed (%s: %s) and its status could not be recorded",
                  type(exc).__name__, exc)
        raise write_error from exc


def _evaluate_per_patient(cfg: DictConfig, best: str, datamodule: SliceDataModule,
                          run_dir: Path) -> dict[str, Any]:
    """Score the best checkpoint per patient at original size on the fold's validation
    patients and the test patients; writes per_patient.csv, returns each split's scores."""
    device = "cuda" if uses_gpu(cfg.trainer.accelerator) else "cpu"
    module = load_checkpoint(best, torch.device(device))
    split = datamodule.split
    patients = {"val": split.val, **({"test": split.test} if split.test else {})}
    rows = evaluate_patients(module, datamodule.dir, patients)
    write_csv(run_dir / PER_PATIENT_FILE, rows, PER_PATIENT_FIELDS)
    return {key: value for name in patients for key, value in split_scores(rows, name).items()}


def _fit(cfg: DictConfig, run_dir: Path, ckpt_path: str | None, datamodule: SliceDataModule,
         identity: Identity, requeue: DeferredRequeue | None = None) -> dict[str, Any]:
    started = time.time()
    datamodule, module, trainer = build_run(cfg, datamodule, identity)
    timer = FirstStepTimer(_later_job_started)
    trainer.callbacks.append(timer)
    if requeue is not None:
        trainer.callbacks.append(requeue)
    if ckpt_path:
        log.info("continuing from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.time() - started

    stopped = [cb.stopped_epoch for cb in trainer.early_stopping_callbacks]
    results: dict[str, Any] = {
        **hparams_of(cfg), "identity": identity.hash, "group": identity.group,
        "code": identity.code, "epochs_trained": trainer.current_epoch,
        "stopped_early": any(e > 0 for e in stopped), "fit_seconds": round(fit_seconds, 1),
        "seconds_to_first_step": timer.seconds}
    best_keeper = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)),
                       None)
    if best_keeper is not None:
        best = best_keeper.best_model_path
        results.update(best_checkpoint=best, best_epoch=checkpoint_epoch(best) if best else None)
        if cfg.evaluate_best:
            results.update(_evaluate_best(cfg, run_dir, datamodule, module, trainer, results))
    return _finish(trainer, run_dir, results)


def _score_completed(cfg: DictConfig, run_dir: Path, datamodule: SliceDataModule,
                     identity: Identity, done: dict[str, Any]) -> dict[str, Any]:
    """The evaluation a completed run skipped (evaluate_best=false), of its best checkpoint,
    as at the end of its fit and without training again."""
    datamodule, module, trainer = build_run(cfg, datamodule, identity)
    return _finish(trainer, run_dir,
                   {**done, **_evaluate_best(cfg, run_dir, datamodule, module, trainer, done)})


def _evaluate_best(cfg: DictConfig, run_dir: Path, datamodule: SliceDataModule,
                   module: SegmentationModule, trainer: pl.Trainer,
                   results: dict[str, Any]) -> dict[str, Any]:
    """The best checkpoint's selection metrics, preview and per-patient scores."""
    best = results["best_checkpoint"]
    # The CSV history holds the epochs trained; this re-validation is results.json's.
    trainer.loggers = [lg for lg in trainer.loggers if not isinstance(lg, CSVLogger)]
    metrics = trainer.validate(module, datamodule=datamodule, ckpt_path=best or None,
                               verbose=False)[0]
    scores = {k: float(v) for k, v in metrics.items() if k.startswith("select/")}
    if trainer.is_global_zero:
        save_preview(module, datamodule, run_dir / PREVIEW_FILE)
        if best:
            scores.update(_evaluate_per_patient(cfg, best, datamodule, run_dir))
            if OBJECTIVE in scores:
                log_validation_dice(trainer.loggers, scores[OBJECTIVE], results["best_epoch"])
        else:
            scores["not_evaluated"] = NO_BEST_CHECKPOINT
            log.info("%s: no per-patient evaluation", NO_BEST_CHECKPOINT)
    return scores


def _finish(trainer: pl.Trainer, run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    if trainer.is_global_zero:
        write_json(run_dir / RESULTS_FILE, results)
        log_run_files(trainer.loggers)  # after every file of the run is written
        log.info("best select/dice %.4f (epoch %s) after %d epochs; validation patients at "
                 "original size %.4f; results in %s", results.get("select/dice", float("nan")),
                 results.get("best_epoch"), results["epochs_trained"],
                 results.get(OBJECTIVE, float("nan")), run_dir)
    return results
