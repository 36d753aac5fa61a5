"""A ``.zip`` archive as input: extracted once per process into a private temporary folder
(removed at exit), then discovered like a folder. Member names are sanitised by
``zipfile`` (no absolute paths, no ``..``); each extracted file gets its member's timestamp,
so a re-run over the same zip sees the same file identities and resumes."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from ubc.errors import UBCInputError

__all__ = ["MAX_ZIP_BYTES", "extract_zip"]

MAX_ZIP_BYTES = 64 << 30  # uncompressed total refused above this (a zip bomb guard)
_extracted: dict[tuple[str, int, int], Path] = {}
_lock = threading.Lock()


def _cleanup() -> None:
    for folder in _extracted.values():
        shutil.rmtree(folder.parent, ignore_errors=True)


atexit.register(_cleanup)


def _members(archive: zipfile.ZipFile, path: Path) -> list[zipfile.ZipInfo]:
    members = [m for m in archive.infolist() if not m.is_dir()]
    total = sum(m.file_size for m in members)
    if total > MAX_ZIP_BYTES:
        raise UBCInputError(f"{path}: {total / 2**30:.1f} GiB uncompressed is over the "
                            f"{MAX_ZIP_BYTES >> 30} GiB limit; extract it yourself")
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if total > free:
        raise UBCInputError(f"{path}: needs {total / 2**30:.1f} GiB to extract, "
                            f"{free / 2**30:.1f} GiB free in {tempfile.gettempdir()}")
    return members


def extract_zip(path: str | os.PathLike[str]) -> Path:
    """The folder holding the extracted contents of the zip file ``path`` (extracted on the
    first call for this file's size and mtime). ``UBCInputError`` for a damaged zip."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise UBCInputError(f"{path}: cannot read ({exc})") from exc
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key in _extracted:
            return _extracted[key]
        folder = Path(tempfile.mkdtemp(prefix="ubc-zip-")) / path.name.rsplit(".", 1)[0]
        try:
            with zipfile.ZipFile(path) as archive:
                for member in _members(archive, path):
                    target = Path(archive.extract(member, folder))
                    stamp = time.mktime((*member.date_time, 0, 0, -1))
                    os.utime(target, (stamp, stamp))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError,
                NotImplementedError) as exc:
            shutil.rmtree(folder.parent, ignore_errors=True)
            raise UBCInputError(f"{path}: cannot extract the zip ({type(exc).__name__}: "
                                f"{exc})") from exc
        _extracted[key] = folder
        return folder
