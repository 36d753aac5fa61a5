"""Atomic file writes: the one way this package puts a file in place.

A file is written beside its final name, flushed to disk, given mode 0644 (readable by a
service account other than the writer's) and renamed over the final name, so a reader or a
killed writer never sees half a file.

The temporary is named ``.NAME.ubc-HOST-PID.RANDOM.tmp.SUFFIXES`` (``HOST``: a hash of the
host name), so the one a killed writer left can be told from one being written by a live
process, here or on another host sharing the folder: ``remove_stale_temporaries``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "fsync_dir",
           "remove_stale_temporaries"]

FILE_MODE = 0o644
#: a temporary of another host is stale when untouched this long (its writer's liveness
#: cannot be asked from here)
STALE_AFTER_S = 24 * 3600
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(r"^\..+\.ubc-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.tmp(\.[^.]+)*$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _is_stale(path: Path, host: str, pid: int, now: float) -> bool:
    if host == _HOST:
        return pid != os.getpid() and not _alive(pid)
    try:
        return now - path.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of ``atomic_write`` in ``folder`` (not below it) whose writer
    is gone: killed on this host, or untouched for ``STALE_AFTER_S`` elsewhere. Returns
    those removed."""
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        path = Path(entry.path)
        if match is None or not entry.is_file(follow_symlinks=False) \
                or not _is_stale(path, match["host"], int(match["pid"]), now):
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path`` (with the same suffixes,
    for writers that go by them, such as nibabel), then put it in place atomically."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.ubc-{_HOST}-{os.getpid()}.",
                                suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
