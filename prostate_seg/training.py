"""One training run: config check -> data -> model -> Trainer.fit -> results of the best model."""

from __future__ import annotations

import csv
import logging
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from prostate_seg.config import check_train_config
from prostate_seg.data import SliceDataModule
from prostate_seg.errors import ConfigError
from prostate_seg.files import write_json
from prostate_seg.module import HP_METRIC, SegmentationModule
from prostate_seg.runs import (
    LAST_CHECKPOINT,
    METRICS_FILE,
    PREVIEW_FILE,
    RESULTS_FILE,
    RunStatus,
    read_json,
)

log = logging.getLogger(__name__)
PREVIEW_SLICES = 4


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The few settings that tell runs apart in TensorBoard's HPARAMS tab."""
    alpha, beta = cfg.loss.get("alpha"), cfg.loss.get("beta")
    if alpha is not None and beta is None:
        beta = round(1.0 - alpha, 6)  # the Tversky default, stated explicitly
    return {
        "loss": str(cfg.loss.get("name")),
        "alpha": "-" if alpha is None else alpha,
        "beta": "-" if beta is None else beta,
        "seed": cfg.seed,
        "lr": cfg.optimizer.lr,
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "features": str(list(cfg.model.net.features)),
        "context_slices": cfg.data.context_slices,
        "scheduler": str((cfg.get("scheduler") or {}).get("_target_", "none")).rsplit(".", 1)[-1],
        "max_epochs": cfg.trainer.max_epochs,
    }


def _checkpoint_to_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    last = run_dir / LAST_CHECKPOINT
    if cfg.ckpt_path == "last":
        if not last.exists():
            raise ConfigError(f"ckpt_path=last: no {last} in this run folder (set hydra.run.dir "
                              "to the run to continue, or give ckpt_path=PATH)")
        return str(last)
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: file not found")
        return str(cfg.ckpt_path)
    if cfg.resume and last.exists():
        return str(last)
    return None


def _best_epoch(metrics_csv: Path) -> int | None:
    if not metrics_csv.exists():
        return None
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/dice")]
    if not rows:
        return None
    best = max(rows, key=lambda r: float(r["val/dice"]))  # first of ties, as ModelCheckpoint
    return int(best["epoch"])


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


def _trainer(cfg: DictConfig) -> pl.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    # Under SLURM the launcher (submitit) requeues; Lightning must not do it a second time.
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)


def build_run(cfg: DictConfig) -> tuple[SliceDataModule, SegmentationModule, pl.Trainer]:
    """Data (checked), model and Trainer of a run, exactly as ``train`` uses them."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule: SliceDataModule = instantiate(cfg.data)
    datamodule.setup("fit")  # checks the whole dataset before any model or GPU work
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # How the dataset was made travels with the checkpoint: predict preprocesses new scans so.
    resolved["preprocessing"] = read_json(Path(cfg.data.dir) / "prepare.json")
    module = SegmentationModule(resolved)
    trainer = _trainer(cfg)
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(hparams_of(cfg), metrics={HP_METRIC: 0.0})
    return datamodule, module, trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue) one training job in Hydra's output folder; returns its results."""
    check_train_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    status = RunStatus(run_dir)
    done = read_json(run_dir / RESULTS_FILE)
    if cfg.resume and status.state == "completed" and done is not None and not cfg.ckpt_path:
        log.info("%s already completed; nothing to do (resume=false to train again)", run_dir)
        return done
    ckpt_path = _checkpoint_to_resume(cfg, run_dir)
    if rank_zero_only.rank == 0:
        status.running(resumed_from=ckpt_path)
    try:
        results = _fit(cfg, run_dir, ckpt_path)
    except BaseException as exc:
        if rank_zero_only.rank == 0:
            status.failed(exc)
        if isinstance(exc, SIGTERMException):  # Lightning's is a SystemExit with status 0
            raise SystemExit(128 + signal.SIGTERM) from exc
        raise
    if rank_zero_only.rank == 0:
        status.completed()
    return results


def _fit(cfg: DictConfig, run_dir: Path, ckpt_path: str | None) -> dict[str, Any]:
    started = time.time()
    datamodule, module, trainer = build_run(cfg)
    if ckpt_path:
        log.info("continuing from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.time() - started

    results: dict[str, Any] = {**hparams_of(cfg), "epochs_trained": trainer.current_epoch,
                               "fit_seconds": round(fit_seconds, 1)}
    if cfg.evaluate_best and trainer.checkpoint_callback is not None:
        best = trainer.checkpoint_callback.best_model_path
        metrics = trainer.validate(module, datamodule=datamodule, ckpt_path=best or None,
                                   verbose=False)[0]
        results.update({k: float(v) for k, v in metrics.items() if k.startswith("val/")})
        results.update(best_checkpoint=best, best_epoch=_best_epoch(run_dir / METRICS_FILE))
        if trainer.is_global_zero:
            save_preview(module, datamodule, run_dir / PREVIEW_FILE)
    if trainer.is_global_zero:
        write_json(run_dir / RESULTS_FILE, results)
        log.info("best val/dice %.4f (epoch %s) after %d epochs; results in %s",
                 results.get("val/dice", float("nan")), results.get("best_epoch"),
                 results["epochs_trained"], run_dir)
    return results
