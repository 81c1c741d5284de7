"""Each job runs in a fresh process (:mod:`.job`) on the config composed here, from its folder's
``launcher.pickle``; CUDA_VISIBLE_DEVICES is set before it starts, CUDA never here."""

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, RunMode, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from prostate_seg.config import available_cpus, job_environment
from prostate_seg.errors import ConfigError, JobFailed
from prostate_seg.files import replacing, write_json
from prostate_seg.runs import LAUNCHER_FILE, load_json_object
from prostate_seg.jobs import JOB_ENV, Progress, duration

log = logging.getLogger(__name__)

ACCELERATORS = ("gpu", "cpu")
ERROR_TAIL_LINES = 40
GRACE_S = 60.0  # on Ctrl-C or SIGTERM, for each running job to save last.ckpt
JOB_FILE = "launcher.pickle"  # in the job's folder: what its process runs (see .job)


@dataclass
class GpuPoolLauncherConf:
    """``hydra/launcher=gpu_pool`` (conf/hydra/launcher/gpu_pool.yaml sets and explains it)."""

    _target_: str = "hydra_plugins.gpu_pool_launcher.gpu_pool_launcher.GpuPoolLauncher"
    devices: Optional[List[int]] = None
    jobs_per_gpu: int = 1
    accelerator: str = "gpu"
    grace_s: float = GRACE_S


ConfigStore.instance().store(
    group="hydra/launcher", name="gpu_pool_base", node=GpuPoolLauncherConf,
    provider="prostate_seg",
)


@dataclass
class _Job:
    idx: int
    overrides: List[str]
    config: DictConfig
    dir: Path
    record: Dict[str, Any] = field(default_factory=dict)

    @property
    def place(self) -> str:
        """``k/N`` as the study sweeper numbered the job (else its index)."""
        return str(self.config.hydra.job.env_set.get(JOB_ENV) or f"#{self.idx}")

    @property
    def command(self) -> List[str]:
        return [sys.executable, "-m", f"{__package__}.job", str(self.dir / JOB_FILE)]


class _Terminated(SystemExit):
    """SIGTERM as an exception, so the children are stopped before the parent exits."""


def _raise_terminated(signum: int, frame: Optional[FrameType]) -> None:
    raise _Terminated(128 + signum)


def visible_gpus() -> List[str]:
    """The GPU ids this process may hand out, found without initialising CUDA here."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        return [d.strip() for d in mask.split(",") if d.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
        return [str(i) for i, _ in enumerate(
            line for line in listing.splitlines() if line.startswith("GPU "))]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch  # counts through NVML: no CUDA context is created
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def log_tail(path: Path, lines: int = ERROR_TAIL_LINES) -> List[str]:
    """The last lines of a (possibly huge) log as a terminal shows them: of a progress bar's
    carriage-return frames only the last; without Hydra's hint to set HYDRA_FULL_ERROR."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return [line for line in shown if line.strip() and "HYDRA_FULL_ERROR" not in line][-lines:]


def exit_reason(returncode: int) -> str:
    """``killed by signal 9 (SIGKILL)``, ``exit code 143 (128 + SIGTERM)``, ``exit code 1``."""
    names = {s.value: s.name for s in signal.Signals}
    if returncode < 0:
        return f"killed by signal {-returncode} ({names.get(-returncode, '')})"
    if returncode - 128 in names:
        return f"exit code {returncode} (128 + {names[returncode - 128]})"
    return f"exit code {returncode}"


# Jobs die with the launcher, even a SIGKILLed one: the child asks the kernel for SIGTERM when
# its parent thread dies (Linux prctl PR_SET_PDEATHSIG), then execs the job. A wrapper, as
# Popen's preexec_fn is unsafe with threads running; the parent pid check sees an early death.
_DIE_WITH_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(128 + signal.SIGTERM)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def dies_with_launcher(command: List[str]) -> List[str]:
    """``command`` run so that it gets SIGTERM when this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _DIE_WITH_LAUNCHER, str(os.getpid()), *command]


class GpuPoolLauncher(Launcher):
    """Runs each sweep job in its own process on a free device slot."""

    def __init__(self, devices: Optional[Sequence[int]] = None, jobs_per_gpu: int = 1,
                 accelerator: str = "gpu", grace_s: float = GRACE_S) -> None:
        if accelerator not in ACCELERATORS:
            raise ConfigError(f"hydra.launcher.accelerator={accelerator!r}: "
                             f"expected one of {', '.join(ACCELERATORS)}")
        if jobs_per_gpu < 1:
            raise ConfigError(f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}: must be at least 1")
        if devices is not None and len(devices) == 0:
            raise ConfigError("hydra.launcher.devices=[]: name at least one device, "
                             "or null for every visible GPU")
        if not grace_s >= 0:
            raise ConfigError(f"hydra.launcher.grace_s={grace_s}: must be >= 0 seconds")
        self.devices = None if devices is None else [int(d) for d in devices]
        self.grace_s = float(grace_s)
        self.jobs_per_gpu = jobs_per_gpu
        self.accelerator = accelerator
        self.slots = self.slot_devices()  # here, so a bad setting stops the sweep early
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None
        self._lock = threading.Lock()
        self._running: Dict[int, subprocess.Popen] = {}
        self._stopping = False

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def slot_devices(self) -> List[str]:
        """Each device ``jobs_per_gpu`` times, interleaved: a small sweep spreads over them."""
        if self.accelerator == "cpu":
            ids = [str(d) for d in self.devices or [0]]
        else:
            visible = visible_gpus()
            if not visible:
                raise ConfigError(
                    "hydra.launcher.accelerator=gpu but no GPU is visible; for CPU slots use "
                    "hydra.launcher.accelerator=cpu hydra.launcher.devices=[0,1]")
            ids = visible if self.devices is None else [str(d) for d in self.devices]
            hidden = [d for d in ids if d not in visible]
            if hidden:
                raise ConfigError(f"hydra.launcher.devices: GPU {', '.join(hidden)} is not "
                                 f"visible (visible: {', '.join(visible)})")
        return [d for _ in range(self.jobs_per_gpu) for d in ids]

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        slots = self.slots[:len(job_overrides)]
        jobs = [self._prepare(initial_job_idx + i, list(overrides))
                for i, overrides in enumerate(job_overrides)]
        cpus = max(1, available_cpus() // max(1, len(slots)))
        log.info(f"Launching {len(jobs)} jobs on {len(slots)} {self.accelerator} slots "
                 f"(devices {', '.join(sorted(set(slots)))}; {cpus} CPUs each)")
        self._progress = Progress(total=len(jobs), slots=len(slots))
        free: queue.Queue[Tuple[int, str]] = queue.Queue()  # a job takes the next free slot
        for slot in enumerate(slots):
            free.put(slot)
        self._wait(jobs, free, cpus)
        failed = [job for job in jobs if job.record["status"] != "completed"]
        summary = f"{len(jobs)} jobs: {len(jobs) - len(failed)} completed, {len(failed)} failed"
        if failed:
            summary += f" (folders: {', '.join(str(job.dir) for job in failed)})"
        log.info(summary)
        return [self._job_return(job) for job in jobs]

    def _prepare(self, idx: int, overrides: List[str]) -> _Job:
        """The job's config (the sweeper's, if it composed it) and folder, as Hydra's
        ``run_job`` computes them, written for the job's process: a single run there."""
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        parent_hydra_cfg = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the folder names
        try:
            job_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / str(
                OmegaConf.select(config, "hydra.sweep.subdir"))
        finally:
            HydraConfig.instance().cfg = parent_hydra_cfg
        job_dir = Path(os.path.abspath(job_dir))
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.runtime.output_dir = str(job_dir)
            config.hydra.mode = RunMode.RUN  # the job's process: a single run in its folder
            config.hydra.run.dir = str(job_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        with replacing(job_dir / JOB_FILE) as tmp:
            tmp.write_bytes(cloudpickle.dumps({
                "config": config, "task_function": self.task_function,
                "callbacks": self.hydra_context.callbacks, "singletons": Singleton.get_state()}))
        return _Job(idx=idx, overrides=overrides, config=config, dir=job_dir)

    def _env(self, device: str, cpus: int) -> Dict[str, str]:
        env = {**os.environ, **job_environment(device if self.accelerator == "gpu" else "", cpus)}
        env["PROSTATE_SEG_SLOT"] = device
        # The job imports what this process did (the task's modules), from the same places.
        env["PYTHONPATH"] = os.pathsep.join(
            [sys.path[0] or os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH")])])
        env.setdefault("PYTHONUNBUFFERED", "1")  # the log stays in order, and complete if killed
        return env

    def _run(self, job: _Job, free: queue.Queue[Tuple[int, str]], cpus: int) -> None:
        slot, device = free.get()
        try:
            self._run_on(job, slot, device, cpus)
        finally:
            free.put((slot, device))

    def _run_on(self, job: _Job, slot: int, device: str, cpus: int) -> None:
        """Run one job to its end; launcher.json says how it ended, launcher.log (appended to:
        a rerun keeps the earlier attempts) holds its output."""
        previous = load_json_object(job.dir / LAUNCHER_FILE)[0] or {}
        record: Dict[str, Any] = {"job": job.idx, "overrides": job.overrides, "slot": slot,
                                  "device": device, "accelerator": self.accelerator,
                                  "command": job.command, "start": time.time(), "end": None,
                                  "returncode": None, "status": "running",
                                  "attempt": int(previous.get("attempt", 0)) + 1}
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["start"]))
        proc: Optional[subprocess.Popen[bytes]] = None
        log_path = job.dir / "launcher.log"
        with self._lock:
            if self._stopping:
                return
            log.info(f"job {job.place} started on {self.accelerator} {device}: {job.dir.name}")
            try:
                with open(log_path, "ab") as log_file:  # the child keeps its own handle
                    log_file.write(f"===== gpu_pool: job #{job.idx}, attempt {record['attempt']}"
                                   f", started {started} on {self.accelerator} {device} "
                                   "=====\n".encode())
                    log_file.flush()
                    proc = subprocess.Popen(dies_with_launcher(job.command),
                                            env=self._env(device, cpus),
                                            stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                record.update(end=time.time(), status="failed", error=f"cannot start: {exc}")
            else:
                self._running[proc.pid] = proc
                record["pid"] = proc.pid
        if proc is not None:
            self._record(job, record)
            returncode = proc.wait()
            with self._lock:
                del self._running[proc.pid]
                stopped = self._stopping
            record.update(end=time.time(), returncode=returncode)
            if returncode == 0:
                record["status"] = "completed"
            else:
                reason = exit_reason(returncode)
                tail = log_tail(log_path)
                record["status"] = "interrupted" if stopped else "failed"
                # A signal explains itself; else the log's last lines (the last: the job's error)
                record["error"] = (f"stopped by the launcher: {reason}" if stopped
                                   else reason if returncode < 0
                                   else "\n".join([reason, *tail]))
                record["log_tail"] = tail
        self._record(job, record)
        seconds = record["end"] - record["start"]
        with self._lock:
            so_far = self._progress.finished(seconds)
        if record["status"] == "completed":
            log.info(f"job {job.place} done in {duration(seconds)} on {self.accelerator} "
                     f"{device}: {job.dir.name}; {so_far}")
        else:
            log.error(f"job {job.place} {record['status'].upper()} after {duration(seconds)}: "
                      f"{record['error'].splitlines()[-1]} (log: {log_path}); {so_far}")

    @staticmethod
    def _record(job: _Job, record: Dict[str, Any]) -> None:
        """Keep the record (the sweep's result); a disk that cannot take it is logged only."""
        job.record = record
        try:
            write_json(job.dir / LAUNCHER_FILE, record)
        except OSError as exc:
            log.error(f"#{job.idx}: cannot write {job.dir / LAUNCHER_FILE}: {exc}")

    def _wait(self, jobs: List[_Job], free: queue.Queue[Tuple[int, str]], cpus: int) -> None:
        """Run the jobs on the free slots; on Ctrl-C or SIGTERM stop every child, then re-raise.
        Futures, not ``Thread.join``: an interrupted join(timeout) returns at once (3.11)."""
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
        pool = ThreadPoolExecutor(max(1, free.qsize()), thread_name_prefix="gpu_pool")
        futures: List[Future] = []
        try:
            futures = [pool.submit(self._run, job, free, cpus) for job in jobs]
            wait_for(futures)
        except BaseException:
            self._terminate(futures)
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if in_main:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        for future in futures:
            future.result()  # a bug in a slot is not swallowed

    def _terminate(self, futures: List[Future]) -> None:
        """SIGTERM every running job, give them ``grace_s`` to save their checkpoint, SIGKILL
        what is left (at once on a second Ctrl-C)."""
        with self._lock:
            self._stopping = True
            procs = list(self._running.values())
        log.warning(f"Interrupted: stopping {len(procs)} running jobs "
                    f"(up to {self.grace_s:.0f} s for each to save its checkpoint)")
        self._signal(procs, signal.SIGTERM)
        try:
            wait_for(futures, timeout=self.grace_s)
        except (KeyboardInterrupt, _Terminated):
            log.warning("Second interrupt: killing the jobs now")
        finally:
            self._signal([p for p in procs if p.poll() is None], signal.SIGKILL)
            wait_for(futures, timeout=5.0)  # let the slots record how their jobs ended

    @staticmethod
    def _signal(procs: List[subprocess.Popen], signum: int) -> None:
        for proc in procs:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)

    @staticmethod
    def _job_return(job: _Job) -> JobReturn:
        """Hydra's result of the job; a failure's exception is its one line."""
        ret = JobReturn(overrides=job.overrides, working_dir=str(job.dir),
                        task_name=job.config.hydra.job.name, status=JobStatus.COMPLETED)
        record = job.record
        if record["status"] != "completed":
            code = record.get("returncode")
            reason = exit_reason(code) if code is not None else record["error"]
            message = f"job {job.place} {record['status']} ({reason}); log: {job.dir}/launcher.log"
            if code is not None and code > 0 and record["log_tail"]:
                message += f": {record['log_tail'][-1]}"  # the job's own error line
            ret.status = JobStatus.FAILED
            ret.return_value = JobFailed(message)
        return ret
