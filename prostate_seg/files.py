"""Outputs written whole or not at all, and never over earlier results unless asked: a reader
(the report, a resumed job) never sees half a file, and a failed write leaves the previous
version and no temporary behind."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from prostate_seg.errors import DataError


def refuse_existing(path: Path, overwrite: bool, name: str | None = None) -> None:
    """Stop before any work if ``path`` (shown as ``name``) exists and overwrite is not set."""
    if path.exists() and not overwrite:
        raise DataError(f"{name or path} already exists; pass overwrite=true to replace it")


def make_folder(folder: Path) -> None:
    """``mkdir -p`` that names the file in the way when a parent is a file (``mkdir`` names
    the folder it could not make, or says "File exists")."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            break
    folder.mkdir(parents=True, exist_ok=True)


def check_writable_folder(folder: Path) -> None:
    """Make ``folder`` and write a probe file in it, so that a file in the way, a read-only
    disk or a missing permission stops a tool before its work, naming the path (root ignores
    permission bits, so only a real write tells)."""
    make_folder(folder)
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write in this folder ({exc.strerror})",
                      str(folder)) from exc


def check_name_fits(path: Path) -> None:
    """A file name longer than the folder's file system allows fails only when written: say so
    before the work."""
    folder = next((p for p in path.parents if p.is_dir()), Path("/"))
    if len(path.name.encode()) > os.pathconf(folder, "PC_NAME_MAX"):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))


def beside(path: Path, tag: str, suffix: str = "") -> Path:
    """A hidden name next to ``path`` for this process's work on it (``.tag-PID-HASH``): a
    short hash of the name instead of the name, so it fits wherever ``path``'s name fits."""
    digest = hashlib.sha1(path.name.encode()).hexdigest()[:10]
    return path.with_name(f".{tag}-{os.getpid()}-{digest}{suffix}")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block ends without error.

    The temporary keeps ``path``'s suffix (nibabel picks the format from it), carries the
    process id (concurrent jobs writing the same file do not collide; the last rename wins)
    and a short hash instead of the full name (a name near the file system's limit still has
    room). It is flushed to disk before the rename, so the file is whole even after a crash;
    an OSError names ``path``, not the temporary.
    """
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    tmp = beside(path, "tmp", suffix)
    try:
        yield tmp
        _flush_to_disk(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename in (str(tmp), tmp) or exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def _flush_to_disk(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
