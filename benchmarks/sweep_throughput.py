"""Sweep throughput on one GPU: the same short sweep with 1, 2, 4 ... jobs sharing the GPU.

    python benchmarks/sweep_throughput.py --prepared data/prepared           # real scans
    python benchmarks/sweep_throughput.py                                    # phantoms, 256 px
    python benchmarks/sweep_throughput.py --jobs-per-gpu 1,2,4,8 --epochs 5
    python benchmarks/sweep_throughput.py --smoke     # CPU smoke check at 32 px (a test runs it)

Each setting runs ``train.py -m`` over the study's 8 losses on one fold through
``hydra/launcher=gpu_pool`` with ``hydra.launcher.jobs_per_gpu=J`` (CPU slots with --smoke),
and prints per setting: wall time of the whole sweep, the sweep's training images per second
(every job's optimiser steps x batch size, over the wall time), each job's start-up seconds
(process start to the end of its first training step: imports, data checks, CUDA start,
compilation) and the GPU's mean utilisation while the sweep ran (nvidia-smi, every 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LOSSES = "bce,tversky"  # the study's 8: bce once, Tversky once per alpha (the sweeper)
ALPHAS = "0.25,0.35,0.45,0.5,0.65,0.75,0.85"


class GpuSampler:
    """Mean GPU utilisation from ``nvidia-smi`` sampled every 0.5 s (None without a GPU)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "500"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        threading.Thread(target=self._read, daemon=True).start()  # ends with nvidia-smi
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))  # first GPU
            except ValueError:
                pass

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def make_dataset(root: Path, patients: int, size: int) -> Path:
    from prostate_seg.data.prepare import PrepareSettings, prepare
    from prostate_seg.data.synthetic import generate

    workers = min(os.cpu_count() or 1, 16)
    generate(root / "nifti", num_patients=patients, seed=0, size=max(128, size), workers=workers)
    prepare(root / "nifti", root / "png", PrepareSettings(image_size=size), workers=workers)
    return root / "png"


def job_figures(job_dir: Path, batch_size: int) -> dict[str, float]:
    """Images trained and start-up seconds of one finished job, from the files it wrote."""
    from prostate_seg.runs import read_history

    results = json.loads((job_dir / "results.json").read_text())
    steps = max(int(row["step"]) for row in read_history(job_dir))
    return {"images": steps * batch_size,
            "startup_s": float(results.get("seconds_to_first_step", float("nan")))}


def run_sweep(data: Path, sweep_dir: Path, jobs_per_gpu: int, args: argparse.Namespace) -> dict:
    overrides = [f"data.dir={data}", "hydra/launcher=gpu_pool",
                 f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}", f"loss={args.losses}",
                 f"loss.alpha={args.alphas}",
                 f"data.image_size={args.size}", f"data.batch_size={args.batch}",
                 f"trainer.max_epochs={args.epochs}", "callbacks.early_stopping.patience=1000",
                 f"hydra.sweep.dir={sweep_dir}", *args.override]
    if args.smoke:
        overrides += ["hydra.launcher.accelerator=cpu", "hydra.launcher.devices=[0]",
                      "trainer=cpu", "model=unet_small", "model.net.features=[8,16]",
                      "callbacks.progress_bar.refresh_rate=0"]
    started = time.perf_counter()
    with GpuSampler() as gpu:
        done = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", *overrides],
                              cwd=args.workdir, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"sweep with jobs_per_gpu={jobs_per_gpu} failed:\n{done.stderr[-3000:]}")
    jobs = [job_figures(d, args.batch) for d in sorted(sweep_dir.iterdir())
            if (d / "results.json").exists()]
    startup = [j["startup_s"] for j in jobs]
    return {"jobs_per_gpu": jobs_per_gpu, "jobs": len(jobs), "wall_s": wall,
            "images_per_s": sum(j["images"] for j in jobs) / wall,
            "startup_s_mean": sum(startup) / len(startup), "startup_s_max": max(startup),
            "gpu_util_mean": gpu.mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, help="a prepared dataset (default: phantoms)")
    parser.add_argument("--patients", type=int, default=36, help="phantoms to make")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--losses", default=LOSSES)
    parser.add_argument("--alphas", default=ALPHAS, help="loss.alpha of the losses that have one")
    parser.add_argument("--jobs-per-gpu", default="1,2,4")
    parser.add_argument("--override", action="append", default=[],
                        help="an extra override for every job (repeatable)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (checks it works)")
    args = parser.parse_args()
    if args.smoke:
        args.patients, args.size, args.batch, args.epochs = 6, 32, 4, 1
        args.losses, args.alphas, args.jobs_per_gpu = "bce,tversky", "0.5", "1,2"
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sweep_throughput_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.prepared or make_dataset(args.workdir / "data", args.patients, args.size)
    rows = [run_sweep(data.resolve(), args.workdir / f"sweep_j{j}", j, args)
            for j in (int(x) for x in args.jobs_per_gpu.split(","))]

    print(f"\nsweep throughput: {rows[0]['jobs']} jobs of {args.epochs} epochs, "
          f"{args.size} px, batch {args.batch}, data {data}")
    print(f"{'jobs/GPU':>9} {'wall s':>8} {'images/s':>9} {'start-up s (mean/max)':>22} "
          f"{'GPU util %':>10}")
    for row in rows:
        util = "n/a" if row["gpu_util_mean"] is None else f"{row['gpu_util_mean']:.0f}"
        print(f"{row['jobs_per_gpu']:>9} {row['wall_s']:>8.1f} {row['images_per_s']:>9.1f} "
              f"{row['startup_s_mean']:>13.1f} / {row['startup_s_max']:<6.1f} {util:>10}")
    if args.json:
        import torch

        args.json.write_text(json.dumps({
            "rows": rows, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "machine": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "settings": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
