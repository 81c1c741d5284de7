"""The command-line tools as functions: the console scripts of an installed package
(``prostate-seg-train`` ...) and the checkout's ``train.py``, ``evaluate.py``, ``predict.py``.

``prostate-seg-prepare``, ``-synthetic`` and ``-report`` are the ``main`` of their modules.
"""

from __future__ import annotations

from prostate_seg.cli import hydra_entry


def train() -> None:
    from prostate_seg.training import objective

    hydra_entry(objective, config_name="train")


def evaluate() -> None:
    from prostate_seg.evaluate import run

    hydra_entry(run, config_name="evaluate")


def predict() -> None:
    from prostate_seg.predict import run

    hydra_entry(run, config_name="predict")
