"""Common random numbers: for one (fold, seed) every loss starts from the same weights and sees
the same batches, in the same order, with the same augmentation draws, so that a pair of runs
differs by its loss alone and the paired comparison measures the loss, not training luck."""

import pytest
import pytorch_lightning as pl
import torch
from helpers import TINY, compose_train

from prostate_seg.training.fit import build_run


class FirstBatches(pl.Callback):
    """Keeps the first training batch of every epoch."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batches.append({k: v.clone() for k, v in batch.items()})


def _start(prepared, tmp_path, *overrides):
    """Initial weights and the first batch of two epochs (one step each), with loader workers."""
    cfg = compose_train([*TINY, f"data.dir={prepared}", "data.num_workers=2",
                         "trainer.max_epochs=2", "+trainer.limit_train_batches=1",
                         "+trainer.limit_val_batches=1", *overrides], tmp_path / "_".join(overrides))
    datamodule, module, trainer = build_run(cfg)
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    first = FirstBatches()
    trainer.callbacks.append(first)
    trainer.fit(module, datamodule=datamodule)
    assert len(first.batches) == 2
    return weights, first.batches


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_losses_of_one_seed_start_alike_and_see_the_same_batches(prepared, tmp_path):
    bce_weights, bce_batches = _start(prepared, tmp_path, "loss=bce")
    assert not torch.equal(bce_batches[0]["image"], bce_batches[1]["image"])
    for loss in (["loss=tversky", "loss.alpha=0.25"],
                 # a loss that draws random numbers shifts neither the data nor the weights
                 ["loss=bce", "loss._target_=helpers.DrawingBCE"]):
        weights, batches = _start(prepared, tmp_path, *loss)
        assert _same(weights, bce_weights), loss
        # epoch 1's batch follows a step each loss took its own way: the data do not
        assert all(_same(a, b) for a, b in zip(batches, bce_batches, strict=True)), loss
    # the comparison can tell: another seed starts elsewhere and draws other batches
    other_weights, other_batches = _start(prepared, tmp_path, "loss=tversky", "loss.alpha=0.25", "seed=1")
    assert not _same(bce_weights, other_weights)
    assert not torch.equal(bce_batches[0]["image"], other_batches[0]["image"])
