"""Where the configs are, the ``ps.*`` resolvers they use, and composing them outside a
Hydra app (tests, benchmarks, notebooks)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from prostate_seg.errors import ConfigError
from prostate_seg.files import PREPARE_FILE
from prostate_seg.settings import normalised
from prostate_seg.jobs import job_name_resolver

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_MODULE = "prostate_seg.conf"


def _config_location() -> tuple[Path, str]:
    """(folder, Hydra config path): a checkout's ``conf/``, else the copy a wheel ships."""
    checkout = PACKAGE_DIR.parent / "conf"
    if (checkout / "train.yaml").is_file():
        return checkout, str(checkout)
    return PACKAGE_DIR / "conf", f"pkg://{CONFIG_MODULE}"


CONF_DIR, CONFIG_PATH = _config_location()


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` handing plain Python containers (``_convert_="all"``):
    libraries test ``isinstance(x, dict | list)``, which Hydra's DictConfig and ListConfig fail
    (Lightning's ``max_time={hours: 10}``, torch's OneCycleLR ``max_lr`` list, MONAI's ``norm``
    tuple)."""
    return hydra.utils.instantiate(node, **{"_convert_": "all", **kwargs})


def initialize_configs() -> Any:
    """Hydra's compose API over the project's configs (a context manager)."""
    if CONFIG_PATH.startswith("pkg://"):
        return hydra.initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3")
    return hydra.initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3")


# Device files of an NVIDIA driver (Linux; WSL2's GPU). Without one CUDA cannot be there.
_CUDA_DEVICE_FILES = ("/dev/nvidiactl", "/dev/dxg")


def uses_gpu(accelerator: str) -> bool:
    """Whether a Trainer with this ``accelerator`` runs on a CUDA GPU; ``auto`` imports torch
    (seconds) only where a driver is and a GPU is not hidden."""
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator != "auto" or os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1") or not any(
            os.path.exists(path) for path in _CUDA_DEVICE_FILES):
        return False
    import torch

    return torch.cuda.is_available()


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision on GPUs that support it, full fp32 elsewhere."""
    if uses_gpu(accelerator):
        import torch

        if not torch.cuda.is_available() or torch.cuda.is_bf16_supported():
            return "bf16-mixed"
        return "16-mixed"
    return "32-true"


# Linux's list of what the CPU can do; the flags of native bf16 arithmetic (AVX512-BF16, AMX).
_CPUINFO, _BF16_FLAGS = "/proc/cpuinfo", {"avx512_bf16", "amx_bf16"}


def cpu_precision() -> str:
    """bf16 mixed precision where the CPU computes in bf16 natively (the same Dice sooner,
    docs/RESULTS.md, eighth round), fp32 where bf16 would be emulated or the CPU cannot be read."""
    try:
        lines = Path(_CPUINFO).read_text().splitlines()
    except OSError:
        return "32-true"
    flags = {f for line in lines if line.startswith("flags") for f in line.split()}
    return "bf16-mixed" if flags & _BF16_FLAGS else "32-true"


def available_cpus() -> int:
    """CPUs this process may use: affinity, cgroup v2 quota, or a launcher's PROSTATE_SEG_CPUS."""
    if "PROSTATE_SEG_CPUS" in os.environ:
        return max(1, int(os.environ["PROSTATE_SEG_CPUS"]))
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def idle_cpus(seconds: float = 0.25) -> float:
    """Cores idle over a short look at /proc/stat (Linux; else all): other work takes the rest."""
    def ticks() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all
    try:
        idle0, total0 = ticks()
        time.sleep(seconds)
        idle1, total1 = ticks()
    except (OSError, ValueError, IndexError):
        return float(os.cpu_count() or 1)
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(1, total1 - total0)


def openmp_yields() -> None:
    """Waiting OpenMP threads yield their core, not spin (read when torch loads: call before)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def configure_cpu_threads(workers: int = 0) -> int:
    """torch's threads: the idle cores this process may use less its loader workers. Two
    threads on two cores, one of them busy, wait on each other at every step (10 x slower)."""
    threads = max(1, min(available_cpus(), int(idle_cpus() + 0.5)) - workers)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


def job_environment(gpu: str | None, cpus: int) -> dict[str, str]:
    """What a job sharing the machine with others is started with: its GPU (``""``: none; None:
    the parent's) and its share of the CPUs, from which its loader workers and threads are
    sized (PROSTATE_SEG_CPUS; OMP_NUM_THREADS unless set, read as torch starts)."""
    env = {"PROSTATE_SEG_CPUS": str(cpus),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(cpus))}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def default_num_workers(accelerator: str = "cpu") -> int:
    """Loader processes from this job's CPUs: on a GPU all but the main process and the feeder
    (at most 16); on the CPU none on 2 cores, where workers would take the model's cores."""
    cpus = available_cpus()
    if uses_gpu(accelerator):
        return 0 if cpus < 2 else min(max(cpus - 2, 1), 16)
    return 0 if cpus <= 2 else min(cpus - 2, 16)


DEFAULT_IMAGE_SIZE = 384  # the study's slices


def prepared_size(data_dir: str | Path) -> int | None:
    """The image_size prepare recorded in ``data_dir``/prepare.json (None without one)."""
    path = Path(data_dir) / PREPARE_FILE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None


def network_size(data_dir: str) -> int:
    """``data.image_size`` by default: the size the chosen dataset was prepared at."""
    try:
        return prepared_size(data_dir) or DEFAULT_IMAGE_SIZE
    except ConfigError:
        return DEFAULT_IMAGE_SIZE  # the data check at start-up names the broken file


def tversky_name(alpha: float, beta: float | None, gamma: float | None = None) -> str:
    """``tversky_a0.25``, with ``_b`` only when beta is not 1 - alpha: ``focal_..._g1.333``."""
    name = f"tversky_a{alpha}"
    if beta is not None and not normalised(alpha, beta):
        name += f"_b{beta}"
    return name if gamma is None else f"focal_{name}_g{float(gamma):.4g}"


def sweep_values(values: list | None, count: int | None = None) -> str:
    """A list as a Hydra sweep's values (``[0, 1]`` -> ``0,1``); null: ``0 .. count-1``."""
    if values is None:
        if count is None:
            raise ConfigError("a sweep needs a list of values")
        values = list(range(int(count)))
    if not len(values):
        raise ConfigError("a sweep over an empty list runs nothing; give at least one value")
    return ",".join(str(v) for v in values)


def _register_resolvers() -> None:
    resolvers = {
        "ps.uses_gpu": uses_gpu,
        "ps.precision": default_precision,
        "ps.cpu_precision": cpu_precision,
        "ps.num_workers": default_num_workers,
        "ps.in_channels": lambda context: 1 + 2 * int(context),
        "ps.tversky_name": tversky_name,
        "ps.prepared_size": network_size,
        "ps.sweep_values": sweep_values,
        "ps.job_name": job_name_resolver,
        "ps.product": lambda values: math.prod(int(v) for v in values),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register_resolvers()


def compose_config(config_name: str, overrides: list[str], output_dir: str | Path) -> DictConfig:
    """A config composed outside a Hydra app, ``output_dir`` its run folder as in a run."""
    GlobalHydra.instance().clear()
    with initialize_configs():
        cfg = hydra.compose(config_name, overrides=overrides, return_hydra_config=True)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


# _target_ prefix -> (module, extra) of the objects an optional extra of the package provides.
OPTIONAL_EXTRAS = {"monai.": ("monai", "monai"),
                   "prostate_seg.training.tracking.": ("mlflow", "mlflow")}


def _targets(node: object, key: str = "") -> list[tuple[str, str]]:
    """(key, _target_) of every object a config node describes, nested ones included."""
    if isinstance(node, dict):
        found = [(key, node["_target_"])] if isinstance(node.get("_target_"), str) else []
        for name, child in node.items():
            found += _targets(child, f"{key}.{name}" if key else str(name))
        return found
    if isinstance(node, list):
        return [t for i, child in enumerate(node) for t in _targets(child, f"{key}[{i}]")]
    return []


def check_extras_installed(cfg: DictConfig) -> None:
    """An object from a missing optional package is one line saying what to install."""
    for key, target in _targets(OmegaConf.to_container(cfg, resolve=False)):
        for prefix, (module, extra) in OPTIONAL_EXTRAS.items():
            if target.startswith(prefix) and importlib.util.find_spec(module) is None:
                raise ConfigError(f"{key}: {target} needs {module}, which is not installed "
                                  f"(pip install \"prostate-seg[{extra}]\")")


