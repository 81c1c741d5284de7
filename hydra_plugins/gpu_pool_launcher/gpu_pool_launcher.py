"""Launcher that runs a sweep's jobs concurrently over a pool of device slots.

Each job runs in a fresh process (:mod:`.job`) as a single run in the job's sweep folder, on
the config composed here (by the sweeper, which checked it, or by this launcher): the launcher
writes the config, the task and Hydra's state to the folder's ``launcher.pickle`` and the child
runs them without composing again. ``CUDA_VISIBLE_DEVICES`` is set before the child starts:
CUDA is never initialised in this (parent) process, and a job cannot touch another job's GPU.
Slots take the next queued job the moment their previous job exits, so short and long jobs
pack tightly.
"""

import copy
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Dict, List, Optional, Sequence

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, RunMode, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from prostate_seg.config import available_cpus
from prostate_seg.errors import JobFailed
from prostate_seg.files import replacing, write_json
from prostate_seg.study.runs import load_json_object
from prostate_seg.study.sweeps import JOB_ENV, Progress, duration

log = logging.getLogger(__name__)

ACCELERATORS = ("gpu", "cpu")
ERROR_TAIL_LINES = 40
TERMINATE_GRACE_S = 60.0
JOB_FILE = "launcher.pickle"  # in the job's folder: what its process runs (see .job)


@dataclass
class GpuPoolLauncherConf:
    """``hydra/launcher=gpu_pool`` (conf/hydra/launcher/gpu_pool.yaml extends this)."""

    _target_: str = "hydra_plugins.gpu_pool_launcher.gpu_pool_launcher.GpuPoolLauncher"
    # GPU ids as nvidia-smi numbers them (within CUDA_VISIBLE_DEVICES when that is set);
    # None = every visible GPU. With accelerator=cpu: slot labels, None = one slot.
    devices: Optional[List[int]] = None
    jobs_per_gpu: int = 1  # concurrent jobs per device
    accelerator: str = "gpu"  # gpu | cpu (cpu: children see no GPU)
    # On Ctrl-C/SIGTERM: seconds each running job gets to save last.ckpt before SIGKILL.
    grace_s: float = TERMINATE_GRACE_S


ConfigStore.instance().store(
    group="hydra/launcher", name="gpu_pool_base", node=GpuPoolLauncherConf,
    provider="prostate_seg",
)


@dataclass
class _Job:
    """One sweep job: what to run and, once it ran, how it went."""

    idx: int
    overrides: List[str]
    config: DictConfig
    dir: Path
    command: List[str] = field(default_factory=list)
    record: Dict[str, Any] = field(default_factory=dict)

    @property
    def place(self) -> str:
        """``k/N`` as the study sweeper numbered the job (else its index)."""
        return str(self.config.hydra.job.env_set.get(JOB_ENV) or f"#{self.idx}")


class _Terminated(SystemExit):
    """SIGTERM turned into an exception, so the children are stopped before the parent exits."""


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
    """The last ``lines`` lines of a (possibly huge) log file, as a terminal shows them: of the
    frames a progress bar redraws with carriage returns, only the last of each line."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return [line for line in shown if line.strip()][-lines:]


def exit_reason(returncode: int) -> str:
    """``killed by signal 9 (SIGKILL)``, ``exit code 143 (128 + SIGTERM)``, ``exit code 1``."""
    if returncode < 0:
        return f"killed by signal {-returncode} ({_signal_name(-returncode)})"
    if returncode > 128 and _signal_name(returncode - 128):
        return f"exit code {returncode} (128 + {_signal_name(returncode - 128)})"
    return f"exit code {returncode}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return ""


# Jobs die with the launcher, even when it is SIGKILLed: the child asks the kernel for SIGTERM
# when its parent dies (Linux prctl PR_SET_PDEATHSIG), so it saves last.ckpt and exits, then
# execs the job. This small exec wrapper rather than Popen's preexec_fn, which Python documents
# as unsafe while other threads run (the slots are threads). The signal follows the thread
# that started the child; each slot thread waits for its child, so it outlives it. A launcher
# that died before the prctl is seen by the parent pid check.
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
                 accelerator: str = "gpu", grace_s: float = TERMINATE_GRACE_S) -> None:
        if accelerator not in ACCELERATORS:
            raise ValueError(f"hydra.launcher.accelerator={accelerator!r}: "
                             f"expected one of {', '.join(ACCELERATORS)}")
        if jobs_per_gpu < 1:
            raise ValueError(f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}: must be at least 1")
        if devices is not None and len(devices) == 0:
            raise ValueError("hydra.launcher.devices=[]: name at least one device, "
                             "or null for every visible GPU")
        if not grace_s >= 0:
            raise ValueError(f"hydra.launcher.grace_s={grace_s}: must be >= 0 seconds")
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
        self._active_slots = 0
        self._all_done = threading.Event()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def slot_devices(self) -> List[str]:
        """One entry per slot: the device id, each device ``jobs_per_gpu`` times, interleaved
        so that a sweep smaller than the pool still spreads over the devices."""
        if self.accelerator == "cpu":
            ids = [str(d) for d in self.devices or [0]]
        else:
            visible = visible_gpus()
            if not visible:
                raise ValueError(
                    "hydra.launcher.accelerator=gpu but no GPU is visible; for CPU slots use "
                    "hydra.launcher.accelerator=cpu hydra.launcher.devices=[0,1]")
            ids = visible if self.devices is None else [str(d) for d in self.devices]
            hidden = [d for d in ids if d not in visible]
            if hidden:
                raise ValueError(f"hydra.launcher.devices: GPU {', '.join(hidden)} is not "
                                 f"visible (visible: {', '.join(visible)})")
        return [d for _ in range(self.jobs_per_gpu) for d in ids]

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        slots = self.slots[:len(job_overrides)]
        jobs = [self._prepare(initial_job_idx + i, list(overrides))
                for i, overrides in enumerate(job_overrides)]
        cpus = max(1, available_cpus() // max(1, len(slots)))
        log.info(f"Launching {len(jobs)} jobs on {len(slots)} {self.accelerator} slots "
                 f"(devices {', '.join(sorted(set(slots)))}; {cpus} CPUs each)")
        self._progress = Progress(total=len(jobs), slots=len(slots))

        pending: queue.Queue[_Job] = queue.Queue()
        for job in jobs:
            pending.put(job)
        workers = [threading.Thread(target=self._work, args=(slot, device, pending, cpus),
                                    name=f"gpu_pool-slot{slot}", daemon=True)
                   for slot, device in enumerate(slots)]
        self._wait(workers)

        returns = [self._job_return(job) for job in jobs]
        failed = [job for job in jobs if job.record["status"] != "completed"]
        summary = f"{len(jobs)} jobs: {len(jobs) - len(failed)} completed, {len(failed)} failed"
        if failed:
            summary += f" (folders: {', '.join(str(job.dir) for job in failed)})"
        log.info(summary)
        return returns

    def _prepare(self, idx: int, overrides: List[str]) -> _Job:
        """The job's config (the sweeper's, when it composed the job already) and its output
        folder, exactly as the BasicLauncher computes them, written to the folder for the
        job's process: a single run there."""
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
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(job_dir)
        run = copy.deepcopy(config)  # the job's process: a single run in the job's folder
        with read_write(run.hydra):
            run.hydra.mode = RunMode.RUN
            run.hydra.run.dir = str(job_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        with replacing(job_dir / JOB_FILE) as tmp:
            tmp.write_bytes(cloudpickle.dumps({
                "config": run, "task_function": self.task_function,
                "callbacks": self.hydra_context.callbacks, "singletons": Singleton.get_state()}))
        command = [sys.executable, "-m", f"{__package__}.job", str(job_dir / JOB_FILE)]
        return _Job(idx=idx, overrides=overrides, config=config, dir=job_dir, command=command)

    def _env(self, device: str, cpus: int) -> Dict[str, str]:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = device if self.accelerator == "gpu" else ""
        env["PROSTATE_SEG_SLOT"] = device
        env["PROSTATE_SEG_CPUS"] = str(cpus)
        # The job imports what this process did (the task's modules), from the same places.
        env["PYTHONPATH"] = os.pathsep.join(
            [sys.path[0] or os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH")])])
        env.setdefault("OMP_NUM_THREADS", str(cpus))
        env.setdefault("PYTHONUNBUFFERED", "1")  # the log stays in order, and complete if killed
        return env

    def _work(self, slot: int, device: str, pending: queue.Queue[_Job], cpus: int) -> None:
        """One slot: run queued jobs one after another until the queue is empty."""
        try:
            while not self._stopping:
                try:
                    job = pending.get_nowait()
                except queue.Empty:
                    return
                self._run(job, slot, device, cpus)
        finally:
            with self._lock:
                self._active_slots -= 1
                if self._active_slots == 0:
                    self._all_done.set()

    def _start_log(self, job: _Job, record: Dict[str, Any]) -> None:
        """Append to the job's launcher.log (a rerun keeps the earlier attempts' output) after a
        line naming the attempt and its start time."""
        previous = load_json_object(job.dir / "launcher.json")[0] or {}
        record["attempt"] = int(previous.get("attempt", 0)) + 1
        log_path = job.dir / "launcher.log"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["start"]))
        with open(log_path, "ab") as log_file:
            log_file.write(f"===== gpu_pool: job #{job.idx}, attempt {record['attempt']}, "
                           f"started {started} on {self.accelerator} {record['device']} "
                           "=====\n".encode())

    def _run(self, job: _Job, slot: int, device: str, cpus: int) -> None:
        """Run one job to its end and record how it ended in launcher.json."""
        record: Dict[str, Any] = {"job": job.idx, "overrides": job.overrides, "slot": slot,
                                  "device": device, "accelerator": self.accelerator,
                                  "command": job.command, "start": time.time(), "end": None,
                                  "returncode": None, "status": "running"}
        proc: Optional[subprocess.Popen[bytes]] = None
        log_path = job.dir / "launcher.log"
        with self._lock:
            if self._stopping:
                return
            log.info(f"job {job.place} started on {self.accelerator} {device}: {job.dir.name}")
            try:
                self._start_log(job, record)
                with open(log_path, "ab") as log_file:  # the child keeps its own handle
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
                # A signal explains itself; otherwise the log's last lines hold the error
                # (the last line of "error" is the job's own error line, as readers expect).
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
        """Keep the record (the sweep's result) and write it to launcher.json; a disk that
        cannot take it is logged, and the sweep goes on."""
        job.record = record
        try:
            write_json(job.dir / "launcher.json", record)
        except OSError as exc:
            log.error(f"#{job.idx}: cannot write {job.dir / 'launcher.json'}: {exc}")

    def _wait(self, workers: List[threading.Thread]) -> None:
        """Run the slots to the end; on Ctrl-C or SIGTERM stop every child, then re-raise.

        The wait is on an event the slots set, never on ``Thread.join``: after a
        KeyboardInterrupt, Python 3.11's ``join(timeout)`` returns at once (the interrupted
        join marks the thread finished), which cut every job's grace period to nothing.
        """
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
        self._active_slots = len(workers)
        self._all_done.clear()
        if not workers:
            return
        try:
            for worker in workers:
                worker.start()
            self._all_done.wait()
        except BaseException:
            self._terminate()
            raise
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    def _terminate(self) -> None:
        """SIGTERM every running job's process group, give them ``grace_s`` to save their
        checkpoint and exit, SIGKILL what is left (at once on a second Ctrl-C)."""
        with self._lock:
            self._stopping = True
            procs = list(self._running.values())
        log.warning(f"Interrupted: stopping {len(procs)} running jobs "
                    f"(up to {self.grace_s:.0f} s for each to save its checkpoint)")
        self._signal(procs, signal.SIGTERM)
        try:
            self._all_done.wait(self.grace_s)
        except (KeyboardInterrupt, _Terminated):
            log.warning("Second interrupt: killing the jobs now")
        finally:
            self._signal([p for p in procs if p.poll() is None], signal.SIGKILL)
            self._all_done.wait(5.0)  # let the slots record how their jobs ended

    @staticmethod
    def _signal(procs: List[subprocess.Popen], signum: int) -> None:
        for proc in procs:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

    @staticmethod
    def _job_return(job: _Job) -> JobReturn:
        """What the BasicLauncher would return, with the child's failure as the exception."""
        task_cfg = copy.deepcopy(job.config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        ret = JobReturn(overrides=job.overrides, cfg=task_cfg,
                        hydra_cfg=OmegaConf.masked_copy(job.config, "hydra"),
                        working_dir=str(job.dir), task_name=job.config.hydra.job.name)
        record = job.record
        if record["status"] == "completed":
            ret.status = JobStatus.COMPLETED
            ret.return_value = None
        else:
            returncode = record.get("returncode")
            reason = exit_reason(returncode) if returncode is not None else record["error"]
            message = (f"job {job.place} {record['status']} ({reason}); log: "
                       f"{job.dir / 'launcher.log'}")
            tail = [line for line in record.get("log_tail", []) if "HYDRA_FULL_ERROR" not in line]
            if returncode is not None and returncode > 0 and tail:
                message += f": {tail[-1]}"  # the job's own error line
            ret.status = JobStatus.FAILED
            ret.return_value = JobFailed(message)
        return ret
