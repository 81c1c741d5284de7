"""Outputs written whole or not at all, and never over earlier results unless asked: a reader
(the report, a resumed job) never sees half a file, and a failed write leaves the previous
version and no temporary behind."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prostate_seg.errors import DataError


def refuse_existing(path: Path, overwrite: bool, name: str | None = None) -> None:
    """Stop before any work if ``path`` (shown as ``name``) exists and overwrite is not set."""
    if path.exists() and not overwrite:
        raise DataError(f"{name or path} already exists; pass overwrite=true to replace it")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block ends without error.

    It keeps ``path``'s suffix (nibabel picks the format from it) and carries the process id
    (concurrent jobs writing the same file do not collide; the last rename wins).
    """
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str))


def write_csv(path: Path, rows: Iterable[dict[str, Any]], fields: list[str]) -> None:
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
