"""The LightningModule: U-Net + loss + optimizer. Lightning's validation runs on the selection
patients (``select/*``); ``val`` is the fold's held-out patients, scored once at the end."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from prostate_seg.config import build
from prostate_seg.errors import ConfigError
from prostate_seg.inference.metrics import VolumeConfusion
from prostate_seg.models import weights_mismatch

HP_METRIC = "hp/best_select_dice"
# What a run logs, by epoch: what a callback's monitor can name.
PLATEAU_MONITOR = "select/dice"  # what ReduceLROnPlateau reads, as the checkpoint does
LOGGED = ("train/loss", "select/loss", *(f"select/{name}" for name in VolumeConfusion.NAMES),
          HP_METRIC)


def better(metric: str) -> str:
    """The mode that keeps a metric's best epoch: a loss falls as the run improves, a score
    rises."""
    return "min" if metric.endswith("loss") else "max"


def build_loss(loss_cfg: DictConfig | dict) -> tuple[str, nn.Module]:
    """(name, module) from a ``conf/loss`` entry; ``name`` labels folders and report rows."""
    loss_cfg = OmegaConf.create(loss_cfg) if isinstance(loss_cfg, dict) else loss_cfg
    name = str(loss_cfg.get("name", loss_cfg._target_.rsplit(".", 1)[-1]))
    params = OmegaConf.masked_copy(loss_cfg, [k for k in loss_cfg if k != "name"])
    return name, build(params)


class SegmentationModule(pl.LightningModule):
    """Built from the run's resolved config, stored in the checkpoint to rebuild the model."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.cfg = cfg = OmegaConf.create(cfg)
        self.net: nn.Module = build(cfg.model.net)
        self.loss_name, self.loss_fn = build_loss(cfg.loss)
        self.channels_last = bool(cfg.model.get("channels_last", False))
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if cfg.model.get("compile", False):
            self.net.compile()
        # Per-volume counts; the pooled Dice among them equals pooled pixel F1 (no separate F1).
        self.val_volumes: VolumeConfusion | None = None
        # Best select/dice so far, for TensorBoard's HPARAMS tab; a buffer so it survives resume.
        self.register_buffer("best_select_dice", torch.zeros(()))

    def forward(self, image: Tensor) -> Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and datamodule.select_set is not None:
            self.val_volumes = VolumeConfusion(len(datamodule.select_set.patients))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of another network is one line, not a size-mismatch traceback."""
        problem = weights_mismatch(self, checkpoint["state_dict"])
        if problem:
            source = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise ConfigError(f"ckpt_path={source}: its network does not match model.net="
                              f"{OmegaConf.to_container(self.cfg.model.net)}: {problem}")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = self.loss_fn(logits, batch["mask"])
        self.log("train/loss", loss, on_step=False, on_epoch=True,
                 batch_size=batch["image"].shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        loss = self.loss_fn(logits, batch["mask"])
        self.log("select/loss", loss, on_epoch=True, batch_size=batch["image"].shape[0],
                 sync_dist=True)
        self.val_volumes.update(logits, batch["mask"], batch["volume"])

    def on_validation_epoch_end(self) -> None:
        scores = self.val_volumes.compute()
        for name, value in scores.items():
            self.log(f"select/{name}", value.float(), prog_bar=name == "dice")
        if not self.trainer.sanity_checking:
            self.best_select_dice = torch.maximum(self.best_select_dice, scores["dice"].float())
            self.log(HP_METRIC, self.best_select_dice)
        self.val_volumes.reset()

    def configure_optimizers(self) -> Any:
        optimizer = build(self.cfg.optimizer)(params=self.parameters())
        scheduler = self.cfg.get("scheduler")
        if not scheduler:
            return optimizer
        schedule = build(scheduler)(optimizer=optimizer)
        if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):  # scheduler=plateau
            return {"optimizer": optimizer,  # not strict: an epoch without validation waits
                    "lr_scheduler": {"scheduler": schedule, "monitor": PLATEAU_MONITOR,
                                     "strict": False}}
        return [optimizer], [schedule]  # stepped every epoch
