"""The installable package: a wheel built from this checkout ships the configs and the
launcher plugin, and its console scripts run the whole pipeline from an empty folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from helpers import REPO
from omegaconf import OmegaConf

SOURCES = ["pyproject.toml", "README.md", "conf", "prostate_seg", "hydra_plugins"]


def test_every_package_and_config_folder_is_in_the_wheel_list():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    code = {".".join(p.parent.relative_to(REPO).parts)
            for root in ("prostate_seg", "hydra_plugins") for p in (REPO / root).rglob("*.py")}
    configs = {".".join(("prostate_seg", *p.parent.relative_to(REPO).parts))
               for p in (REPO / "conf").rglob("*.yaml")}
    assert code | configs <= listed
    assert "prostate_seg.conf.loss" in configs  # conf/loss/, shipped as prostate_seg/conf/loss/


def _build_wheel(tmp: Path) -> Path:
    """A wheel of a copy of the checkout (an in-place build would leave build/ behind)."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True)
    return next((tmp / "dist").glob("prostate_seg-*.whl"))


def _venv_with_wheel(tmp: Path, wheel: Path) -> Path:
    """A fresh virtual environment holding the project only as the wheel; its dependencies are
    this environment's (a .pth line adds our site-packages; .pth files found there, such as
    the editable install's import hook, are not run, so the checkout stays invisible)."""
    env = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True, text=True)
    return env


@pytest.mark.extra
def test_wheel_runs_the_pipeline_from_an_empty_folder(tmp_path):
    env = _venv_with_wheel(tmp_path, _build_wheel(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    environ = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PROSTATE_SEG_LOG_ROOT")}

    def run(*command: str) -> str:
        done = subprocess.run([str(env / "bin" / command[0]), *command[1:]], cwd=work,
                              env=environ, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    where = run("python", "-c", "import prostate_seg, hydra_plugins.gpu_pool_launcher as g; "
                "print(prostate_seg.__file__); print(g.__file__)").split()
    assert all(Path(p).is_relative_to(env) for p in where), where

    run("prostate-seg-synthetic", "output_dir=phantoms", "num_patients=4", "size=48")
    run("prostate-seg-prepare", "input_dir=phantoms", "output_dir=prepared", "image_size=32")
    # One job through the gpu_pool launcher (a plugin shipped in the wheel), which runs the
    # job in a fresh process (hydra_plugins.gpu_pool_launcher.job); the sweep report is written
    # at the end.
    run("prostate-seg-train", "-m", "hydra/launcher=gpu_pool", "hydra.launcher.accelerator=cpu",
        "hydra.sweep.dir=sweep", "hydra.sweep.subdir=job", "data.dir=prepared", "model=unet_small",
        "model.net.features=[8,16]", "trainer=cpu", "trainer.max_epochs=1",
        "data.image_size=32", "data.batch_size=8", "data.num_workers=0", "data.folds=2",
        "seed=0")
    (job,) = [p.parent for p in (work / "sweep").glob("*/results.json")]
    assert (job / "launcher.json").is_file()
    assert (work / "sweep" / "report" / "results.md").is_file()
    sources = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.config_sources
    assert {"path": "prostate_seg.conf", "schema": "pkg", "provider": "main"} in sources
    (ckpt,) = (job / "checkpoints").glob("best-*.ckpt")
    scan = sorted((work / "phantoms" / "images").glob("*.nii.gz"))[0]
    run("prostate-seg-predict", f"ckpt_path={ckpt}", f"input={scan}", "output=mask.nii.gz")
    assert (work / "mask.nii.gz").stat().st_size > 0
    shutil.rmtree(work / "sweep" / "report")
    run("prostate-seg-report", "sweep")
    assert (work / "sweep" / "report" / "results.md").is_file()
    assert sorted(p.name for p in work.iterdir()) == [
        "mask.nii.gz", "outputs", "phantoms", "prepared", "sweep"]
