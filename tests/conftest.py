"""Shared fixtures: synthetic phantoms, their prepared PNG dataset, and a briefly trained run."""

from __future__ import annotations

from prostate_seg.config import openmp_yields

openmp_yields()  # before torch loads (tests run many short CPU fits beside each other's work)

import shutil  # noqa: E402
from pathlib import Path

import pytest
from helpers import TINY, compose_train

from prostate_seg.data.prepare import PrepareSettings, prepare
from prostate_seg.data.synthetic import generate


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


@pytest.fixture(scope="session")
def trained_run(prepared, tmp_path_factory) -> Path:
    """One run of 8 epochs on the phantoms; the folder holds checkpoints, metrics and events."""
    from prostate_seg.training.fit import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=8",
                         "callbacks.early_stopping.patience=8", "loss=bce_tversky"], run_dir)
    train(cfg)
    return run_dir
