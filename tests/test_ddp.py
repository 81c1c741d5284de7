"""DDP keeps the study's meaning: the loss of the global batch, every validation slice once."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TINY, compose_train, run_cli

from prostate_seg.losses import TverskyLoss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _half_batch_gradient(rank: int, port: int, x, target, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        weight = torch.tensor(0.7, requires_grad=True)  # one shared parameter, as in DDP
        half = slice(rank * 2, rank * 2 + 2)
        loss = TverskyLoss(alpha=0.3)(weight * x[half], target[half])
        loss.backward()
        grad = weight.grad.clone()
        dist.all_reduce(grad)  # DDP averages the gradients of the processes
        out[rank] = torch.stack([loss.detach(), grad / 2])
    finally:
        dist.destroy_process_group()


def test_tversky_under_ddp_is_the_loss_and_gradient_of_the_global_batch():
    """Each process holds half the batch; summing the counts over processes before the ratio
    gives every process the global batch's loss, and DDP's averaged gradient is exactly the
    one-device gradient (a per-process Tversky averaged over processes would not be)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 6, 6, generator=generator)
    target = (torch.rand(4, 1, 6, 6, generator=generator) > 0.6).float()
    weight = torch.tensor(0.7, requires_grad=True)
    whole = TverskyLoss(alpha=0.3)(weight * x, target)
    whole.backward()
    out = torch.zeros(2, 2).share_memory_()
    mp.spawn(_half_batch_gradient, args=(_free_port(), x, target, out), nprocs=2)
    for rank in range(2):
        assert out[rank, 0].item() == pytest.approx(whole.item(), abs=1e-6)
        assert out[rank, 1].item() == pytest.approx(weight.grad.item(), abs=1e-6)
    local = [TverskyLoss(alpha=0.3)(0.7 * x[i:i + 2], target[i:i + 2]).item() for i in (0, 2)]
    assert abs(sum(local) / 2 - whole.item()) > 1e-3  # what the naive mean would have been


def _sync_batchnorm_on_cpu(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.nn.SyncBatchNorm(2).train()(torch.randn(4, 2, 3, 3))
    except ValueError as exc:
        out[rank] = float("expected input tensor to be on GPU" in str(exc))
    finally:
        dist.destroy_process_group()


def test_cpu_processes_cannot_share_batchnorm_statistics():
    """Why trainer=ddp_cpu keeps BatchNorm per process: torch's SyncBatchNorm refuses CPU
    tensors. (Should this fail, torch can: set sync_batchnorm: true in ddp_cpu.yaml and let
    the config check allow it.)"""
    out = torch.zeros(2).share_memory_()
    mp.spawn(_sync_batchnorm_on_cpu, args=(_free_port(), out), nprocs=2)
    assert out.tolist() == [1.0, 1.0]


def test_synced_batchnorm_on_cpu_processes_is_refused_in_one_line(prepared_copy, tmp_path):
    result = run_cli("train.py", *TINY, f"data.dir={prepared_copy}", "trainer=ddp_cpu",
                     "+trainer.sync_batchnorm=true", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: trainer.sync_batchnorm=true: torch "
                                                   "shares BatchNorm statistics between GPU "
                                                   "processes only"), result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def _validation_on_rank(rank: int, port: int, data: dict, out) -> None:
    """One of two processes: the select loader the data module gives this rank, and the
    validation metric over it, synced as Lightning does at the epoch's end."""
    from types import SimpleNamespace

    from hydra.utils import instantiate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out[rank, 4] = _validate(instantiate(data), SimpleNamespace(world_size=2,
                                                                     global_rank=rank), out[rank])
    finally:
        dist.destroy_process_group()


def _validate(datamodule, trainer, out) -> int:
    """select/dice, precision, recall and dice_global of a fixed rule (image > 0.5) into
    ``out``; returns the number of slices this process saw."""
    from prostate_seg.inference.metrics import VolumeConfusion

    datamodule.trainer = trainer
    datamodule.setup("fit")
    metric = VolumeConfusion(len(datamodule.select_set.patients))
    seen = 0
    for batch in datamodule.val_dataloader():
        metric.update((batch["image"][:, :1] - 0.5) * 10, batch["mask"], batch["volume"])
        seen += len(batch["volume"])
    scores = metric.compute()
    out[:4] = torch.stack([scores[k] for k in ("dice", "precision", "recall", "dice_global")])
    return seen


def test_ddp_validation_sees_every_slice_once_and_syncs_to_the_one_process_scores(
        prepared_copy, tmp_path):
    """Two gloo processes, each with the select slices the data module deals it (an odd number
    in all, which the default sampler would pad with a repeat) and the metric synced over them:
    the scores of one process over all slices, every slice counted once."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    single = torch.zeros(5)
    for fold in range(5):  # a fold whose selection slices do not split evenly
        cfg = compose_train([*TINY, f"data.dir={prepared_copy}", "data.batch_size=4",
                             "data.select_fraction=0.3", f"data.fold={fold}"], tmp_path)
        data = OmegaConf.to_container(cfg.data, resolve=True)
        total = _validate(instantiate(data), None, single)
        if total % 2:
            break
    assert total % 2, "needs a fold with an odd number of selection slices"
    out = torch.zeros(2, 5).share_memory_()
    mp.spawn(_validation_on_rank, args=(_free_port(), data, out), nprocs=2)
    assert out[:, 4].sum().item() == total  # each slice once, none padded in
    for rank in range(2):
        assert torch.allclose(out[rank, :4], single[:4], atol=1e-6), (out, single)


@pytest.mark.extra
def test_ddp_cpu_validation_counts_every_slice_once(prepared_copy, tmp_path):
    """Two processes over gloo: select/dice equals one process validating the same weights,
    even where the selection slices do not split evenly (the default sampler pads them)."""
    from prostate_seg.training.fit import build_run, setup_data

    common = [*TINY, f"data.dir={prepared_copy}", "data.select_fraction=0.3"]
    odd = [k for k in range(5) if len(setup_data(compose_train(
        [*common, f"data.fold={k}"], tmp_path / "probe")).select_set) % 2]
    assert odd, "need a fold whose selection slices do not split evenly over 2 processes"
    fold = f"data.fold={odd[0]}"
    run_dir = tmp_path / "ddp"
    result = run_cli("train.py", *common, fold, "trainer=ddp_cpu", "trainer.max_epochs=2",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = (run_dir / "train.log").read_text()  # Lightning's lines go to the log only
    assert "distributed_backend=gloo" in output and "All distributed processes registered" in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_trained"] == 2 and (run_dir / "per_patient.csv").exists()
    cfg = compose_train([*common, fold], tmp_path / "single")
    datamodule, module, trainer = build_run(cfg)
    single = trainer.validate(module, datamodule=datamodule, ckpt_path=results["best_checkpoint"],
                              verbose=False)[0]
    for key in ("select/dice", "select/dice_global", "select/precision", "select/recall"):
        assert results[key] == pytest.approx(single[key], abs=1e-6), key


def test_ddp_in_a_sweep_run_inside_this_process_is_refused(prepared_copy, tmp_path):
    result = run_cli("train.py", "-m", *TINY, f"data.dir={prepared_copy}", "trainer=ddp_cpu",
                     "loss.alpha=0.25,0.5", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 2 and "hydra/launcher=gpu_pool" in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_the_global_batch_must_split_evenly_over_the_processes(prepared_copy, tmp_path):
    result = run_cli("train.py", *TINY, f"data.dir={prepared_copy}", "trainer=ddp_cpu",
                     "data.batch_size=7", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "data.batch_size=7: is the global batch: it must divide evenly over trainer.devices=2" \
        in result.stderr
