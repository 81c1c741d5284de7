"""Outputs written whole or not at all, never over earlier results unless asked: a reader never
sees half a file, and a failed write leaves the previous version and no temporary."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from prostate_seg.errors import ConfigError, DataError
from prostate_seg.settings import shown

# A prepared dataset's two files, which every stage reads: its settings and its slices.
PREPARE_FILE, MANIFEST_FILE = "prepare.json", "manifest.csv"


def refuse_existing(path: Path, overwrite: bool, name: str | None = None) -> None:
    """Stop before any work if ``path`` (shown as ``name``) exists and overwrite is not set."""
    if path.exists() and not overwrite:
        raise DataError(f"{name or path} already exists; pass overwrite=true to replace it")


def not_found(path: Path, kind: str = "file") -> str:
    """Why ``path`` is not the ``kind`` ("file", "folder", "checkpoint file") it should be:
    missing, or something else there."""
    if not path.exists():
        return f"{kind} not found"
    found = "a folder" if path.is_dir() else "a file" if path.is_file() else "not a regular file"
    return f"is {found}, not a {kind}"


def check_data_dir(data_dir: object) -> None:
    """``data.dir`` is a prepared dataset, to train on or to score: without prepare.json, the
    size and grey levels its slices were made with are unknown. Torch-free: the command line
    checks it first."""
    folder = Path(str(data_dir))
    if not folder.is_dir():
        raise ConfigError(f"data.dir={shown(data_dir)}: {not_found(folder, 'folder')} (make one "
                          "with python -m prostate_seg prepare)")
    for marker in (MANIFEST_FILE, PREPARE_FILE):
        if not (folder / marker).is_file():
            raise ConfigError(f"data.dir={shown(data_dir)}: not a prepared dataset (no {marker}; "
                              "make one with python -m prostate_seg prepare)")


def make_folder(folder: Path) -> None:
    """``mkdir -p`` naming the file in the way (``mkdir`` names the folder, or "File exists")."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            break
    folder.mkdir(parents=True, exist_ok=True)


@contextmanager
def new_folders(folder: Path) -> Iterator[None]:
    """``folder`` made with its missing parents for the block; if the block fails, those it
    made and left empty are removed: a command that stops leaves no folder behind."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first
    make_folder(folder)
    try:
        yield
    except BaseException:
        for made in missing:
            with suppress(OSError):  # not empty (another process wrote there): kept
                made.rmdir()
        raise


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (timeout, scancel, kill) raises KeyboardInterrupt in the block as Ctrl-C does, so
    the cleanup of temporaries runs: by default it ends the process with them left. Only the
    main thread receives signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def parent_stops() -> None:
    """A pool worker's initializer: Ctrl-C and SIGTERM reach the whole process group, and the
    parent (sigterm_as_interrupt) stops the work; a worker would print a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def check_writable_folder(folder: Path) -> None:
    """Write a probe in ``folder``, or in the nearest folder above it that exists, where it
    would be made: a tool stops before its work naming the path (root ignores permission bits,
    so only a real write tells), and one that stops later has made no folder."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write in this folder ({exc.strerror})",
                      str(existing)) from exc


def check_name_fits(path: Path) -> None:
    """A name too long for the file system fails only when written: say so before the work."""
    folder = next((p for p in path.parents if p.is_dir()), Path("/"))
    if len(path.name.encode()) > os.pathconf(folder, "PC_NAME_MAX"):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))


def beside(path: Path, tag: str, suffix: str = "") -> Path:
    """A hidden ``.tag-PID-HASH`` beside ``path``: a hash, so it fits where ``path``'s name fits."""
    digest = hashlib.sha1(path.name.encode()).hexdigest()[:10]
    return path.with_name(f".{tag}-{os.getpid()}-{digest}{suffix}")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary beside ``path`` that replaces it when the block ends without error, flushed
    first (whole after a crash); it keeps the suffix (nibabel reads it); errors name ``path``."""
    suffix = "".join(path.suffixes[-2:]) if path.suffix.lower() == ".gz" else path.suffix
    tmp = beside(path, "tmp", suffix)
    make_folder(path.parent)  # made with the first file written in it, not before the work
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename in (str(tmp), tmp) or exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


# Beside a set that replacing_files wrote: each file's name and content digest, so the next set
# replaces or removes only those files, and nothing of the user's that bears one of the names.
WRITTEN_RECORD = ".written.json"


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _written_before(folder: Path, names: Sequence[str], own_folder: bool) -> dict[str, str]:
    """The files of the recorded earlier set still as written, by name; a file of one of
    ``names`` that is not among them is refused, naming it: it is not ours to replace."""
    if own_folder and not os.path.lexists(folder / WRITTEN_RECORD):  # a set from before records
        return {name: _digest(folder / name) for name in names if (folder / name).is_file()}
    try:
        record = json.loads((folder / WRITTEN_RECORD).read_text())
    except (OSError, ValueError):  # none (or unreadable): nothing here was written by us
        record = {}
    own = {name: digest for name, digest in (record.items() if isinstance(record, dict) else ())
           if Path(name).name == name and (folder / name).is_file()
           and _digest(folder / name) == digest}
    for name in names:
        if os.path.lexists(folder / name) and name not in own:
            raise DataError(f"{folder / name}: not written here by an earlier run of this "
                            "command, or changed since; move it, or choose another folder")
    return own


@contextmanager
def replacing_files(folder: Path, names: Sequence[str], own_folder: bool = False
                    ) -> Iterator[Path]:
    """A hidden folder inside ``folder`` to write a set of files in (some of ``names``); when the
    block ends without error each replaces its namesake and the names not written are removed
    (a stale one would pass for new). Only files of the set written before (WRITTEN_RECORD) are
    replaced or removed: a file of one of the names that is not is refused before the block. A
    block that fails leaves the previous set as it was, and no folder it made; errors name the
    file's place in ``folder``. ``own_folder``: the command's own (a sweep's report/), whose files
    of the names are an earlier version's set when no record is there yet."""
    with new_folders(folder):
        own = _written_before(folder, names, own_folder)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
        try:
            yield staging
            written = {name: _digest(staging / name) for name in names
                       if (staging / name).exists()}
            kept = {name: digest for name, digest in own.items() if name not in names}
            write_json(staging / WRITTEN_RECORD, kept | written)  # flushed, as the files are
            for name in names:
                if name in written:
                    os.replace(staging / name, folder / name)
                elif name in own:
                    (folder / name).unlink(missing_ok=True)
            os.replace(staging / WRITTEN_RECORD, folder / WRITTEN_RECORD)
        except OSError as exc:
            if not str(exc.filename or "").startswith(str(staging)):
                raise
            raise OSError(exc.errno, exc.strerror or str(exc),
                          str(folder / Path(exc.filename).relative_to(staging))) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)


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
