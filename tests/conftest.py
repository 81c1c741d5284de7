"""Shared fixtures: synthetic phantoms, their prepared PNG dataset, and a briefly trained run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from prostate_seg.cli import CONF_DIR
from prostate_seg.prepare import PrepareSettings, prepare
from prostate_seg.synthetic import generate

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("PROSTATE_SEG_DATA",
                                REPO.parent / "shared" / "data" / "prostate_t2"))
# Small and fast: a 2-level U-Net on 48x48 slices of 8 phantoms.
TINY = ["model=unet_small", "model.net.features=[8,16]", "trainer=cpu", "data.image_size=48",
        "data.batch_size=8", "data.num_workers=0", "optimizer.lr=3e-3",
        "callbacks.image_grid.every_n_epochs=1", "callbacks.progress_bar.refresh_rate=0"]


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    generate(root, num_patients=8, seed=0, size=64)
    return root


@pytest.fixture(scope="session")
def prepared(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "png"
    prepare(phantoms, out, PrepareSettings(image_size=48))
    return out


@pytest.fixture
def prepared_copy(prepared, tmp_path) -> Path:
    """A private copy, for tests that change the dataset (split.json, broken files)."""
    copy = tmp_path / "png"
    shutil.copytree(prepared, copy)
    (copy / "split.json").unlink(missing_ok=True)
    return copy


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """The composed train config, as Hydra would give it to a run writing to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project command line (``train.py ...``, ``-m prostate_seg.prepare ...``)."""
    full_env = {**os.environ, "PROSTATE_SEG_LOG_ROOT": str(cwd / "outputs"), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def trained_run(prepared, tmp_path_factory) -> Path:
    """One run of 8 epochs on the phantoms; the folder holds checkpoints, metrics and events."""
    from prostate_seg.training import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=8",
                         "callbacks.early_stopping.patience=8", "loss=bce_tversky"], run_dir)
    train(cfg)
    return run_dir
