"""A file's bytes read in bounded steps, plain or gzip-inflated on demand, so that a loader
can check a header before it allocates and a gzip bomb costs only what was asked for
(issue 9). Used by ``ubc.io.nifti``."""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from types import ModuleType
from typing import Protocol, cast

from ubc.errors import UBCInputError

_zlib: ModuleType
GZIP_ERRORS: tuple[type[Exception], ...] = (EOFError, zlib.error, gzip.BadGzipFile)
try:  # ISA-L inflates the BraTS FLAIR in 19 ms, zlib in 52 ms (chunked, as below)
    from isal import isal_zlib as _zlib

    GZIP_ERRORS += (cast("type[Exception]", _zlib.error),)
except ImportError:  # pragma: no cover - isal has wheels for every platform we ship to
    _zlib = zlib
GZIP_BACKEND = _zlib.__name__

GZIP_MARGIN = 1024 * 1024
"""Bytes a .gz may inflate to past the size its header declares (a trailing gzip member or
padding); a stream that goes on is refused as a gzip bomb."""

_CHUNK = 1024 * 1024  # compressed bytes read per step, and inflated bytes produced per step


class Reader(Protocol):
    """What a loader reads a file's (inflated) bytes through."""

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` from the current position; fewer bytes only at the end."""

    def finish(self, path: Path, declared: int) -> None:
        """Check what follows the ``declared`` bytes (UBCInputError naming ``path``)."""


def open_reader(file: io.BufferedIOBase) -> tuple[Reader, bool]:
    """(reader, compressed): gzip is recognised by its magic bytes, not by the file name."""
    compressed = file.read(2) == b"\x1f\x8b"
    file.seek(0)
    return (GzipReader(file) if compressed else PlainReader(file)), compressed


def read_exactly(reader: Reader, count: int) -> bytes:
    """Up to ``count`` bytes (fewer at the end of the data), read in steps so that a large
    ``count`` costs memory only for the bytes that are there."""
    parts = []
    while count > 0:
        buffer = bytearray(min(count, _CHUNK))
        got = reader.readinto(memoryview(buffer))
        parts.append(bytes(buffer[:got]))
        if got < len(buffer):
            break
        count -= got
    return b"".join(parts)


class PlainReader:
    """The bytes of an uncompressed file."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        self._file = file

    def readinto(self, view: memoryview) -> int:
        filled = 0
        while filled < len(view):
            count = self._file.readinto(view[filled:filled + _CHUNK])
            if not count:
                break
            filled += count
        return filled

    def finish(self, path: Path, declared: int) -> None:
        pass  # trailing bytes of a plain file are ignored, as nibabel ignores them


class GzipReader:
    """The inflated bytes of a gzip file (every member, as ``gzip.decompress`` reads them),
    produced on demand: no call inflates more than it is asked for, and a large request is
    served in steps of ``_CHUNK`` bytes (issue 26: one step of 1 GiB held a second copy of
    the voxels and the interpreter lock through its copy, stalling a service's other
    threads for seconds)."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        self._file = file
        self._stream = _zlib.decompressobj(31)
        self._input = b""  # compressed bytes read but not yet given to a stream

    def readinto(self, view: memoryview) -> int:
        filled = 0
        while filled < len(view):
            chunk = self._inflate(min(len(view) - filled, _CHUNK))
            if not chunk:
                break
            view[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
        return filled

    def _inflate(self, limit: int) -> bytes:
        """Up to ``limit`` (> 0) inflated bytes; b"" after the last member."""
        while True:
            if not self._input:
                self._input = self._file.read(_CHUNK)
            if self._stream.eof:
                if self._input[:1] != b"\x1f":
                    return b""  # end of the last member; padding after it is ignored
                self._stream = _zlib.decompressobj(31)
            if not self._input:  # the file ended: only output the stream still holds
                out = self._stream.decompress(b"", limit)
                if out:
                    return cast(bytes, out)
                raise EOFError("compressed file ended before the end-of-stream marker "
                               "was reached")
            out = self._stream.decompress(self._input, limit)
            self._input = self._stream.unused_data if self._stream.eof \
                else self._stream.unconsumed_tail
            if out:
                return cast(bytes, out)

    def finish(self, path: Path, declared: int) -> None:
        """Inflate to the end of the stream (which checks its CRC), at most ``GZIP_MARGIN``
        bytes past the declared size: a stream that goes on is a gzip bomb."""
        extra = 0
        while chunk := self._inflate(GZIP_MARGIN + 1 - extra):
            extra += len(chunk)
            if extra > GZIP_MARGIN:
                raise UBCInputError(
                    f"{path}: gzip stream inflates to more than the {declared:,} bytes its "
                    f"header declares (+{GZIP_MARGIN:,} margin); refused as a gzip bomb")
