"""What a run leaves in its folder, read and written in one place.

    <run>/.hydra/config.yaml     composed config (Hydra)
    <run>/status.json            running | completed | failed | interrupted, times, traceback
    <run>/results.json           validation metrics of the best checkpoint, epochs trained
    <run>/metrics.csv            every epoch's logged metrics
    <run>/val_preview.npz        the best model's output on fixed validation slices
    <run>/checkpoints/           best-*.ckpt, last.ckpt
    <run>/events.out.tfevents.*  TensorBoard
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from prostate_seg.files import write_json

STATUS_FILE = "status.json"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.csv"
PREVIEW_FILE = "val_preview.npz"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class RunStatus:
    """Keeps ``status.json`` of a run folder current."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATUS_FILE
        self.record: dict[str, Any] = read_json(self.path) or {}

    @property
    def state(self) -> str | None:
        return self.record.get("status")

    def _write(self, **fields: Any) -> None:
        self.record.update(fields, updated=time.time())
        write_json(self.path, self.record)

    def running(self, resumed_from: str | None) -> None:
        self._write(status="running", started=time.time(), host=socket.gethostname(),
                    pid=os.getpid(), resumed_from=resumed_from, error=None, traceback=None)

    def completed(self) -> None:
        self._write(status="completed", finished=time.time())

    def failed(self, exc: BaseException) -> None:
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        self._write(status="interrupted" if interrupted else "failed", finished=time.time(),
                    error=f"{type(exc).__name__}: {exc}",
                    traceback="".join(traceback.format_exception(exc)))
