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
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from prostate_seg.config import build, configure_cpu_threads, uses_gpu
from prostate_seg.data.datamodule import SliceDataModule
from prostate_seg.data.prepare import dataset_fingerprint, dataset_holding
from prostate_seg.data.split import PatientSplit
from prostate_seg.errors import ConfigError, DataError
from prostate_seg.files import (PREPARE_FILE, make_folder, not_found, replacing, write_csv,
                                write_json)
from prostate_seg.inference.evaluate import (PER_PATIENT_FIELDS, check_references,
                                             evaluate_patients, split_scores)
from prostate_seg.inference.predictor import load_checkpoint, read_checkpoint
from prostate_seg.models import network_weights, weights_mismatch
from prostate_seg.settings import tversky_beta
from prostate_seg.runs import (LAST_CHECKPOINT, OBJECTIVE, PER_PATIENT_FILE, PREVIEW_FILE,
                               RESULTS_FILE, STATUS_FILE, Identity, RunLock, RunStatus,
                               check_run_folder, claim, config_identity, forget_held_log,
                               load_json_object, run_late_gain, split_digest)
from prostate_seg.training.callbacks import FirstStepTimer, checkpoint_epoch, without_bar
from prostate_seg.training.checks import (check_ddp_launch, check_train_config,
                                          check_validation_interval, instantiate_checked)
from prostate_seg.training.dashboard import log_settings, log_validation_dice
from prostate_seg.training.module import SegmentationModule
from prostate_seg.training.requeue import DeferredRequeue
from prostate_seg.training.tracking import log_run_files

log = logging.getLogger(__name__)
PREVIEW_SLICES = 4
# Why a run has no per_patient.csv (Lightning's fast_dev_run, debug=fast_dev_run, saves none).
NO_BEST_CHECKPOINT = ("no best checkpoint was saved (trainer.fast_dev_run, or a model_checkpoint "
                      "removed or with save_top_k=0, keeps none)")
# Settings that tell runs apart, beside the loss, its alpha and beta, the network and schedule.
HPARAMS = {"seed": "seed", "fold": "data.fold", "folds": "data.folds", "lr": "optimizer.lr",
           "batch_size": "data.batch_size", "image_size": "data.image_size",
           "context_slices": "data.context_slices", "max_epochs": "trainer.max_epochs"}


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The settings that tell runs apart (results.json, hparams.yaml, MLflow's params)."""
    alpha, beta = cfg.loss.get("alpha"), cfg.loss.get("beta")
    if alpha is None and "_target_" in cfg.loss:  # a loss that fixes them (dice) says so
        fixed = get_object(str(cfg.loss._target_))
        alpha, beta = getattr(fixed, "alpha", None), getattr(fixed, "beta", None)
    if alpha is not None and beta is None:
        beta = round(tversky_beta(alpha, beta), 6)  # stated explicitly, as typed (0.35)
    net, scheduler = cfg.model.net, (cfg.get("scheduler") or {}).get("_target_", "none")
    features = str(list(net.features)) if "features" in net else "-"
    return {"loss": str(cfg.loss.get("name")), "alpha": alpha, "beta": beta,
            **{name: OmegaConf.select(cfg, key) for name, key in HPARAMS.items()},
            "net": str(net._target_), "features": features,
            "scheduler": str(scheduler).rsplit(".", 1)[-1]}


def _task(cfg: DictConfig) -> DictConfig:
    """The config as a run's task sees it (without Hydra's own settings)."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def _refuse_other_identity(identity: Identity, stored: Identity | None, what: str) -> None:
    """A folder holds one config: continuing it under another would mislabel old results."""
    if stored is None:
        raise ConfigError(f"{what} records no config identity (made by an older version); "
                          "write this run to another folder, or resume=false to train anew")
    changes = identity.differences(stored)
    if changes:
        raise ConfigError(f"{what} was made with another config or code ({'; '.join(changes)}); "
                          "write this run to another folder, or resume=false to train anew")


def _check_start_checkpoint(cfg: DictConfig, path: Path, split: PatientSplit) -> None:
    """A file that is no training checkpoint, or one of another network, refused before the run
    folder is claimed (Lightning finds out only inside fit); so is one that trained on, or chose
    its epoch by, a patient this run holds out (another fold's run on these patients), whose
    scores it would inflate."""
    checkpoint = read_checkpoint(path)
    seen = (checkpoint.get("hyper_parameters", {}).get("cfg", {}).get("split") or {})
    cohort = {*split.train, *split.select, *split.val, *split.test}
    theirs = {p for role in ("train", "select", "val", "test") for p in seen.get(role, ())}
    # a model of another dataset whose patients are also named Case00 ... leaks nothing
    leaked = sorted({*seen.get("train", ()), *seen.get("select", ())} & {*split.val, *split.test}
                    if theirs == cohort else ())
    if leaked:
        raise ConfigError(f"ckpt_path={path}: trained on {len(leaked)} patient(s) that fold "
                          f"{split.fold} holds out ({', '.join(leaked[:3])}"
                          f"{', ...' if len(leaked) > 3 else ''}); their scores would be "
                          "inflated: start from a checkpoint of this fold, or from none")
    if "optimizer_states" not in checkpoint:
        raise DataError(f"ckpt_path={path}: holds the network's weights only (as best-*.ckpt "
                        "does); training continues from a whole training state, a run's "
                        "last.ckpt")
    problem = weights_mismatch(build(cfg.model.net),
                               network_weights(checkpoint["state_dict"]))
    if problem:
        raise ConfigError(f"ckpt_path={path}: its network does not match model.net="
                          f"{OmegaConf.to_container(cfg.model.net, resolve=True)}: {problem}")
    epochs, reached = cfg.trainer.get("max_epochs"), checkpoint.get("epoch", 0)
    if epochs not in (None, -1) and reached > epochs:  # Lightning's own condition
        raise ConfigError(f"ckpt_path={path}: trained to epoch {reached}, past "
                          f"trainer.max_epochs={epochs}; raise it to train on from there")


def _checkpoint_to_resume(cfg: DictConfig, run_dir: Path, identity: Identity,
                          split: PatientSplit) -> str | None:
    last = run_dir / LAST_CHECKPOINT
    if cfg.ckpt_path == "last":
        if not last.exists():
            raise ConfigError(f"ckpt_path=last: no {last} in this run folder (set hydra.run.dir "
                              "to the run to continue, or give ckpt_path=PATH)")
    elif cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: {not_found(Path(cfg.ckpt_path))}")
        _check_start_checkpoint(cfg, Path(cfg.ckpt_path), split)
        return str(cfg.ckpt_path)  # the user's own choice of starting point
    elif not (cfg.resume and last.exists()):
        return None
    # mmap: the tensors are not read, only the stored config
    stored = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    stored = stored.get("hyper_parameters", {}).get("cfg", {}).get("identity")
    _refuse_other_identity(identity, Identity.from_dict(stored), str(last))
    return str(last)


def _completed_results(cfg: DictConfig, run_dir: Path, identity: Identity) -> dict[str, Any] | None:
    """The results of a completed run of this config in ``run_dir``, or None."""
    status = RunStatus(run_dir)
    done = load_json_object(run_dir / RESULTS_FILE)[0]
    if not (cfg.resume and status.state == "completed" and done is not None) or cfg.ckpt_path:
        return None
    _refuse_other_identity(identity, status.identity, f"the completed run in {run_dir}")
    return done


def check_run_place(run_dir: Path) -> None:
    """A run writes into a folder of its own: not over a user's files, nor into a prepared
    dataset's slices, which its scores are made of and prepare overwrite=true deletes."""
    check_run_folder(run_dir)
    dataset = dataset_holding(run_dir / STATUS_FILE)
    if dataset is not None:
        raise ConfigError(f"hydra.run.dir={run_dir}: inside the prepared dataset {dataset}; "
                          "choose a folder outside it")


def refuse_other_config(cfg: DictConfig, run_dir: Path) -> None:
    """Raise what the job would raise at its start for a folder holding another config's run."""
    check_run_place(run_dir)
    datamodule: SliceDataModule = instantiate_checked("data", cfg.data)
    split = datamodule.load_folds(store=False).fold(datamodule.fold)  # the job stores it
    identity = identity_of(cfg, datamodule)
    if _completed_results(cfg, run_dir, identity) is None:
        _checkpoint_to_resume(cfg, run_dir, identity, split)


def check_job(cfg: DictConfig, job_dir: Path) -> None:
    """What a job would refuse at its start, found before any job of a sweep starts."""
    task = _task(cfg)
    check_train_config(task)
    check_ddp_launch(task.trainer, cfg.hydra)
    refuse_other_config(task, job_dir)


def save_preview(module: SegmentationModule, datamodule: SliceDataModule, path: Path) -> None:
    """Probabilities on the largest gland slice of the first validation patients: the same
    slices in every run of a sweep, so the report draws every model's contour on them."""
    dataset = datamodule.val_set
    slices = range(len(dataset))
    indices = [max((i for i in slices if dataset.volume_index[i] == volume),
                   key=dataset.gland_pixels)
               for volume in sorted(set(dataset.volume_index))[:PREVIEW_SLICES]]
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
    """Checkpoints written whole or not at all, through a temporary beside the target (Lightning
    moves one from the system's temp folder: a copy across disks, truncated on a full one)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        make_folder(Path(path).parent)
        with replacing(Path(path)) as tmp:
            torch.save(checkpoint, tmp)


def _trainer(cfg: DictConfig) -> pl.Trainer:
    # An entry set to null (callbacks.early_stopping=null, as debug=overfit does) is left out.
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [build(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    options: dict[str, Any] = {}
    # in a log file a bar is a heap of frames; EpochLog says it
    if not sys.stderr.isatty() or cfg.trainer.get("enable_progress_bar") is False:
        callbacks = without_bar(callbacks)
        options["enable_progress_bar"] = False
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit requeues; Lightning must not do it a second time
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return build(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                       **options)


def setup_data(cfg: DictConfig) -> SliceDataModule:
    """The run's data, checked whole (manifest, every file, the split) before any model work."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: SliceDataModule = instantiate_checked("data", cfg.data, seed=cfg.seed)
    datamodule.setup("fit")
    return datamodule


def identity_of(cfg: DictConfig, datamodule: SliceDataModule | None = None) -> Identity:
    """The run's identity (``datamodule``: the run's, its folds loaded; else only its split is
    read)."""
    if datamodule is None:
        datamodule = instantiate_checked("data", cfg.data)
        folds = datamodule.load_folds()
    else:
        folds = datamodule.folds
    return config_identity(_task(cfg), dataset_fingerprint(datamodule.dir),
                           split_digest(folds.to_dict()))


def build_run(cfg: DictConfig, datamodule: SliceDataModule | None = None,
              identity: Identity | None = None
              ) -> tuple[SliceDataModule, SegmentationModule, pl.Trainer]:
    """Data (checked), model and Trainer of a run, exactly as ``train`` uses them."""
    datamodule = datamodule or setup_data(cfg)
    identity = identity or identity_of(cfg, datamodule)
    record = OmegaConf.to_container(_task(cfg), resolve=True)
    # What the model was trained on travels with the checkpoint, for predict and evaluate.
    record.update(preprocessing=load_json_object(datamodule.dir / PREPARE_FILE)[0],
                  split=datamodule.split.to_dict(), identity=identity.to_dict())
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the initial weights follow the seed
    module = SegmentationModule(record)
    trainer = _trainer(cfg)
    log_settings(trainer.loggers, hparams_of(cfg))
    return datamodule, module, trainer


# When this process began each job (Hydra's basic launcher runs a sweep's jobs in one process):
# the first job's start-up is timed from the process's start, a later one's from its own.
_jobs_started: list[float] = []


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue) one job in Hydra's output folder; returns its results. Nothing is
    written into the folder until every refusal is behind it (runs.claim)."""
    _jobs_started.append(time.monotonic())
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    lock = RunLock(run_dir, stamp=False)
    locked = claimed = False
    try:
        check_train_config(cfg)
        check_ddp_launch(cfg.trainer, HydraConfig.get())
        if not uses_gpu(cfg.trainer.accelerator):
            log.info("CPU threads: %d, precision %s", configure_cpu_threads(cfg.data.num_workers),
                     cfg.trainer.get("precision"))  # what the timings and a resume depend on
        if rank_zero_only.rank == 0:
            lock.acquire()
            locked = True
        check_run_place(run_dir)
        datamodule = setup_data(cfg)
        check_validation_interval(cfg.trainer, len(datamodule.train_dataloader()))
        if cfg.evaluate_best:  # the masks it will be scored against, before it trains
            check_references(datamodule.dir, [*datamodule.split.val, *datamodule.split.test])
        identity = identity_of(cfg, datamodule)
        done = _completed_results(cfg, run_dir, identity)
        # A completed run is done unless it lacks the per-patient scores asked for
        # (evaluate_best=false then) and could have them.
        if done is not None and not (cfg.evaluate_best and "not_evaluated" not in done
                                     and not (run_dir / PER_PATIENT_FILE).exists()):
            log.info("%s already completed; nothing to do (resume=false to train again)",
                     run_dir)
            return done
        ckpt_path = (_checkpoint_to_resume(cfg, run_dir, identity, datamodule.split)
                     if done is None else None)
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
            return _finish(cfg, run_dir, *build_run(cfg, datamodule, identity), done)
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
            try:
                status.failed(exc)
            except OSError as write_error:  # the same full disk: no "running" status left
                log.error("run failed (%s: %s) and its status could not be recorded",
                          type(exc).__name__, exc)
                raise write_error from exc
        if isinstance(exc, SIGTERMException):  # Lightning's is a SystemExit with status 0
            raise SystemExit(128 + signal.SIGTERM) from exc
        raise
    finally:
        if requeue is not None:
            requeue.release()
    if rank_zero_only.rank == 0:
        status.completed()
    return results


def _fit(cfg: DictConfig, run_dir: Path, ckpt_path: str | None, datamodule: SliceDataModule,
         identity: Identity, requeue: DeferredRequeue | None = None) -> dict[str, Any]:
    started = time.time()
    datamodule, module, trainer = build_run(cfg, datamodule, identity)
    timer = FirstStepTimer(_jobs_started[-1] if len(_jobs_started) > 1 else None)
    trainer.callbacks.extend([timer] if requeue is None else [timer, requeue])
    if ckpt_path:
        log.info("continuing from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    results: dict[str, Any] = {
        **hparams_of(cfg), "identity": identity.hash, "group": identity.group,
        "code": identity.code, "epochs_trained": trainer.current_epoch,
        "stopped_early": any(cb.stopped_epoch > 0 for cb in trainer.early_stopping_callbacks),
        "fit_seconds": round(time.time() - started, 1), "seconds_to_first_step": timer.seconds}
    if trainer.is_global_zero:  # the study's convergence check reads it (study/statistics)
        results["late_gain"] = run_late_gain(run_dir)
    keeper = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    if keeper is not None:
        best = keeper.best_model_path
        results.update(best_checkpoint=best, best_epoch=checkpoint_epoch(best) if best else None)
    return _finish(cfg, run_dir, datamodule, module, trainer, results,
                   evaluate=keeper is not None and cfg.evaluate_best)


def _finish(cfg: DictConfig, run_dir: Path, datamodule: SliceDataModule,
            module: SegmentationModule, trainer: pl.Trainer, results: dict[str, Any],
            evaluate: bool = True) -> dict[str, Any]:
    """results.json (with the best checkpoint's scores when ``evaluate``), sent to MLflow."""
    if evaluate:
        results = {**results, **_evaluate_best(cfg, run_dir, datamodule, module, trainer,
                                               results)}
    if trainer.is_global_zero:
        write_json(run_dir / RESULTS_FILE, results)
        log_run_files(trainer.loggers)  # after every file of the run is written
        epochs = results["epochs_trained"]
        log.info("%s after %d epoch%s; %s; results in %s", _summary_best(results), epochs,
                 "" if epochs == 1 else "s", _summary_scores(results), run_dir)
    return results


def _summary_best(results: dict[str, Any]) -> str:
    if results.get("best_epoch") is None:
        return "no checkpoint kept"
    return (f"best select/dice {results.get('select/dice', float('nan')):.4f} "
            f"(epoch {results['best_epoch']})")


def _summary_scores(results: dict[str, Any]) -> str:
    """The study's number, or that the run has none (the line before says why)."""
    if OBJECTIVE not in results:
        return "no per-patient scores"
    return f"validation patients at original size {results[OBJECTIVE]:.4f}"


def _evaluate_best(cfg: DictConfig, run_dir: Path, datamodule: SliceDataModule,
                   module: SegmentationModule, trainer: pl.Trainer,
                   results: dict[str, Any]) -> dict[str, Any]:
    """The best checkpoint's selection metrics, preview, and per-patient scores at original
    size on the fold's validation and the test patients (per_patient.csv), of the network's own
    output (evaluate's inference=plain): the study compares losses, not post-processing."""
    best = results["best_checkpoint"]
    # The CSV history holds the epochs trained; this re-validation is results.json's.
    trainer.loggers = [lg for lg in trainer.loggers if not isinstance(lg, CSVLogger)]
    metrics = trainer.validate(module, datamodule=datamodule, ckpt_path=best or None,
                               verbose=False)[0]
    scores = {k: float(v) for k, v in metrics.items() if k.startswith("select/")}
    if not trainer.is_global_zero:
        return scores
    save_preview(module, datamodule, run_dir / PREVIEW_FILE)
    if not best:
        log.info("%s: no per-patient evaluation", NO_BEST_CHECKPOINT)
        return {**scores, "not_evaluated": NO_BEST_CHECKPOINT}
    split = datamodule.split
    patients = {"val": split.val, **({"test": split.test} if split.test else {})}
    device = torch.device("cuda" if uses_gpu(cfg.trainer.accelerator) else "cpu")
    rows = evaluate_patients(load_checkpoint(best, device), datamodule.dir, patients,
                             largest_component=False, tta=False)
    write_csv(run_dir / PER_PATIENT_FILE, rows, PER_PATIENT_FIELDS)
    for name in patients:
        scores.update(split_scores(rows, name))
    scores["patients"] = {name: list(ids) for name, ids in patients.items()}  # report checks
    if OBJECTIVE in scores:
        log_validation_dice(trainer.loggers, scores[OBJECTIVE], results["best_epoch"])
    return scores
