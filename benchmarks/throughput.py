"""Training throughput: an original-style plain PyTorch loop vs this framework's Trainer.fit.

    python benchmarks/throughput.py                 # GPU: 384x384, batch 16, the study's U-Net
    python benchmarks/throughput.py --smoke         # CPU smoke check at 48x48 (a test runs it)
    python benchmarks/throughput.py --profile 20    # + torch.profiler over 20 default steps

In one process on one device, on the same synthetic PNG data on disk:
  (a) plain loop like the original code: PIL -> RGB (3 channels) -> albumentations ->
      DataLoader(num_workers=0); fp16 autocast + GradScaler, NCHW, loss.item() every step.
      Measured for the model alone (one batch kept on the device) and end to end;
  (b) the framework's default config through Trainer.fit (bf16, channels_last, compile,
      fused Adam, loader workers from the CPU count), timed after warm-up, plus variants
      that switch single defaults off, the data loader's own rate and the peak GPU memory.
Prints a table and, with --json, writes every figure to a file (with --profile, the
profiler's op table goes next to it as throughput_profile.txt).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from albumentations.pytorch import ToTensorV2
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prostate_seg.config import compose_config  # noqa: E402
from prostate_seg.data.dataset import read_manifest  # noqa: E402
from prostate_seg.models import UNet  # noqa: E402
from prostate_seg.data.prepare import PrepareSettings, prepare  # noqa: E402
from prostate_seg.data.synthetic import generate  # noqa: E402
from prostate_seg.training.fit import build_run  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_dataset(root: Path, patients: int, size: int, workers: int) -> Path:
    """Synthetic phantoms prepared to ``size`` PNG slices (the framework's on-disk format)."""
    generate(root / "nifti", num_patients=patients, seed=0, size=128, workers=workers)
    prepare(root / "nifti", root / "png", PrepareSettings(image_size=size), workers=workers)
    return root / "png"


# --- (a) the original-style plain loop -------------------------------------------------------
class PlainDataset(Dataset):
    """As the original code: PIL reads RGB, the mask is 0/1 float, ToTensorV2 at the end."""

    def __init__(self, data_dir: Path, size: int):
        records = read_manifest(data_dir)
        self.pairs = [(r.image, r.mask) for r in records]
        self.transform = A.Compose([
            A.Resize(size, size), A.Rotate(limit=35, p=1.0), A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.1),
            A.Normalize(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], max_pixel_value=255.0),
            ToTensorV2()])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index]
        image = np.array(Image.open(image_path).convert("RGB"))
        mask = np.array(Image.open(mask_path).convert("L"), dtype=np.float32)
        mask[mask == 255.0] = 1.0
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"]


def plain_loop(data_dir: Path, size: int, batch: int, warmup: int, steps: int,
               device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = UNet(in_channels=3, out_channels=1).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    def step(data: torch.Tensor, targets: torch.Tensor) -> float:
        data = data.to(device)
        targets = targets.float().unsqueeze(1).to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = loss_fn(model(data), targets)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()  # the original shows it in tqdm every step

    loader = DataLoader(PlainDataset(data_dir, size), batch_size=batch, shuffle=True,
                        num_workers=0, pin_memory=cuda, drop_last=True)
    fixed = next(iter(loader))
    model_alone = time_steps(lambda: step(*fixed), warmup, steps, device) * batch

    def batches():
        while True:
            yield from loader

    stream = batches()
    end_to_end = time_steps(lambda: step(*next(stream)), warmup, steps, device) * batch
    return {"plain_model_alone": model_alone, "plain_end_to_end": end_to_end}


def time_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> float:
    """Steps per second after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps / (time.perf_counter() - start)


# --- (b) the framework -----------------------------------------------------------------------
class StepTimer(pl.Callback):
    """Wall time between the end of step ``warmup`` and the end of step ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.start = self.end = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()
        elif trainer.global_step == self.warmup + self.steps:
            synchronize(pl_module.device)
            self.end = time.perf_counter()


class StepProfiler(pl.Callback):
    """torch.profiler over the ``steps`` steps after global step ``start`` (after the timed
    window, so the timing is not disturbed): where device time goes, how busy the device is,
    how often the host waits for it."""

    def __init__(self, start: int, steps: int):
        self.start, self.steps = start, steps
        self.profiler: torch.profiler.profile | None = None
        self.began = 0.0
        self.summary: dict[str, Any] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            synchronize(pl_module.device)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.began = time.perf_counter()
        elif trainer.global_step == self.start + self.steps and self.profiler is not None:
            synchronize(pl_module.device)
            wall = time.perf_counter() - self.began
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            device_s = sum(e.self_device_time_total for e in events) / 1e6
            syncs = sum(e.count for e in events if "Synchronize" in e.key)
            self.summary = {
                "steps": self.steps, "wall_ms_per_step": 1e3 * wall / self.steps,
                "device_busy_ms_per_step": 1e3 * device_s / self.steps,
                "host_waits_per_step": syncs / self.steps,
                "table": events.table(sort_by="self_device_time_total" if device_s else
                                      "self_cpu_time_total", row_limit=30),
            }


def framework_overrides(data_dir: Path, size: int, batch: int, max_steps: int,
                        accelerator: str) -> list[str]:
    """The default config; only what the measurement needs (steps, no validation) changes."""
    return [f"data.dir={data_dir}", f"data.image_size={size}", f"data.batch_size={batch}",
            f"trainer.accelerator={accelerator}", f"++trainer.max_steps={max_steps}",
            "trainer.max_epochs=-1", "++trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0", "++trainer.enable_progress_bar=false",
            "~callbacks.early_stopping", "~callbacks.model_checkpoint", "~callbacks.last_checkpoint",
            "~callbacks.image_grid",
            "~callbacks.progress_bar", "evaluate_best=false"]


def framework_fit(base: list[str], extra: list[str], warmup: int, steps: int,
                  batch: int, workdir: Path, profile_steps: int = 0) -> dict[str, Any]:
    gc.collect()  # the previous variant's loader workers and GPU memory go first
    if profile_steps:
        extra = [*extra, f"++trainer.max_steps={warmup + steps + profile_steps}"]
    cfg = compose_config("train", base + extra, workdir / f"run{len(os.listdir(workdir))}")
    datamodule, module, trainer = build_run(cfg)
    timer = StepTimer(warmup, steps)
    profiler = StepProfiler(warmup + steps, profile_steps)
    trainer.callbacks += [timer, profiler] if profile_steps else [timer]
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    result = {"images_per_s": steps * batch / (timer.end - timer.start),
              "warmup_s": timer.start - started,
              "num_workers": cfg.data.num_workers}
    if cuda:
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if profiler.summary:
        result["profile"] = profiler.summary
    return result


def loader_rate(base: list[str], batches: int, workdir: Path) -> float:
    """Images/s the framework's default training loader delivers on its own."""
    cfg = compose_config("train", base, workdir / "loader")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # workers started
    start, seen = time.perf_counter(), 0
    while seen < batches:
        for _ in iterator:
            seen += 1
            if seen >= batches:
                break
        else:
            iterator = iter(loader)
    rate = batches * datamodule.batch_size / (time.perf_counter() - start)
    del iterator, loader
    return rate


VARIANTS = [
    ("framework default: bf16, channels_last, compile, fused Adam, workers", []),
    ("  without torch.compile", ["model.compile=false"]),
    ("  without compile and channels_last", ["model.compile=false", "model.channels_last=false"]),
    ("  fp32, no compile, NCHW, unfused Adam", ["model.compile=false", "model.channels_last=false",
                                                "trainer.precision=32-true", "optimizer.fused=false"]),
    ("  default + data.cache=true", ["data.cache=true"]),
    ("  without compile, loader num_workers=0", ["model.compile=false", "data.num_workers=0"]),
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (checks it works)")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--variants", type=int, default=len(VARIANTS),
                        help="how many of the variants to run (the first is the default)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many steps of the default configuration")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.patients, args.warmup, args.steps = 48, 4, 5, 2, 3
        args.variants = min(args.variants, 2)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0))

    started = time.perf_counter()
    data_dir = make_dataset(workdir / "data", args.patients, args.size, min(cpus, 16))
    slices = len(read_manifest(data_dir))
    print(f"dataset: {slices} slices of {args.size}x{args.size} in {time.perf_counter() - started:.0f} s",
          flush=True)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": cpus, "torch": torch.__version__, "lightning": pl.__version__,
        "size": args.size, "batch": args.batch, "warmup_steps": args.warmup, "steps": args.steps,
        "slices_on_disk": slices,
    }

    def save() -> None:  # after every measurement: a run cut short still leaves its figures
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    results.update(plain_loop(data_dir, args.size, args.batch, args.warmup, min(args.steps, 60), device))
    print(f"plain loop: model alone {results['plain_model_alone']:.1f} img/s, "
          f"end to end {results['plain_end_to_end']:.1f} img/s", flush=True)
    save()
    base = framework_overrides(data_dir, args.size, args.batch, args.warmup + args.steps, accelerator)
    results["loader_images_per_s"] = loader_rate(base, max(20, args.steps // 2), workdir)
    print(f"loader (default settings): {results['loader_images_per_s']:.0f} img/s", flush=True)
    results["variants"] = []
    for index, (name, extra) in enumerate(VARIANTS[: args.variants]):
        try:
            fit = framework_fit(base, extra, args.warmup, args.steps, args.batch, workdir,
                                args.profile if index == 0 else 0)
        except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the others
            results["variants"].append({"name": name.strip(), "overrides": extra,
                                        "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            save()
            continue
        profile = fit.pop("profile", None)
        results["variants"].append({"name": name.strip(), "overrides": extra, **fit})
        print(f"{name}: {fit['images_per_s']:.1f} img/s "
              f"(warm-up {fit['warmup_s']:.0f} s, peak {fit.get('peak_memory_gb', 0):.2f} GB)",
              flush=True)
        if profile:
            table = profile.pop("table")
            results["profile"] = profile
            print(f"  profile: {profile['wall_ms_per_step']:.1f} ms per step, device busy "
                  f"{profile['device_busy_ms_per_step']:.1f} ms, "
                  f"{profile['host_waits_per_step']:.2f} host waits per step", flush=True)
            if args.json:
                args.json.with_name("throughput_profile.txt").write_text(table)
        save()
    default = results["variants"][0]
    if "images_per_s" not in default:
        raise SystemExit(f"the default configuration could not be measured: {default['error']}")
    results["framework_images_per_s"] = default["images_per_s"]
    results["speedup_vs_plain"] = default["images_per_s"] / results["plain_end_to_end"]
    results["loader_over_consumption"] = results["loader_images_per_s"] / default["images_per_s"]
    results["peak_memory_gb"] = default.get("peak_memory_gb")
    results["seconds"] = time.perf_counter() - started
    print(f"\ndevice {results['device']} | {args.size}x{args.size}, batch {args.batch}")
    print(f"plain loop end to end  {results['plain_end_to_end']:8.1f} img/s")
    print(f"framework default      {results['framework_images_per_s']:8.1f} img/s"
          f"   ({results['speedup_vs_plain']:.2f}x the plain loop)")
    print(f"loader alone           {results['loader_images_per_s']:8.1f} img/s"
          f"   ({results['loader_over_consumption']:.2f}x what training consumes)")
    if results["peak_memory_gb"] is not None:
        print(f"peak GPU memory        {results['peak_memory_gb']:8.2f} GB")
    save()
    return results


if __name__ == "__main__":
    main()
