"""Results files that survive ``kill -9``: CSV, JSON lines and Parquet, chosen by extension.

Every row is appended and flushed to the operating system before the next case is reported
done, so a run killed at any moment loses at most the row being written; that torn last line
(no trailing newline) is dropped when the file is read back, and a re-run scores the case
again. Rows are fsync'ed together: by the first append ``SYNC_SECONDS`` or more after the
oldest row not yet fsync'ed, and when the file is closed. A machine that loses power loses
at most the rows not yet fsync'ed, which a re-run scores again (their files, written
atomically and durably before their rows, are rewritten). An fsync per row would cap a run
near 500 rows/s on a fast disk, and far lower on a network one.

Parquet cannot be appended to, so a Parquet run appends its rows to a hidden journal
(``.NAME.parquet.journal.jsonl`` beside it, same guarantees) and folds the journal into the
Parquet file, atomically, when the run ends or when the next run starts. The Parquet file
records the sha256 of the journal it folded in, so a journal left by a kill between the
fold and its removal is recognised as folded and never read twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from ubc.atomic import atomic_write_bytes
from ubc.errors import UBCInputError
from ubc.scoring.result import COLUMNS, CaseResult, value_type

__all__ = ["FORMATS", "SYNC_SECONDS", "ResultsFile", "open_results", "read_results"]

FORMATS = (".csv", ".jsonl", ".parquet")
#: the most seconds a flushed row waits for its fsync (see the module docstring)
SYNC_SECONDS = 0.5


class ResultsFile(ABC):
    """A results file: ``read()`` the rows already there, ``start()`` appending (optionally
    rewriting the file with only ``keep``), ``append()`` one row durably, ``close()``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @abstractmethod
    def read(self) -> list[CaseResult]:
        """Rows already in the file (a torn last line is ignored)."""

    @abstractmethod
    def start(self, keep: list[CaseResult] | None = None) -> None:
        """Get ready to append; with ``keep``, first replace the file's rows by ``keep``."""

    @abstractmethod
    def append(self, result: CaseResult) -> None:
        """Write one row: flushed before returning, fsync'ed with the rows around it (see the
        module docstring)."""

    @abstractmethod
    def close(self) -> None:
        """Finish the file (idempotent)."""

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _LineFile(ResultsFile):
    """One row per line, an optional header line; the base of CSV and JSON lines."""

    header: bytes = b""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._file: BinaryIO | None = None
        self._complete_bytes: int | None = None  # length without a torn tail
        self.columns = COLUMNS  # those of the file's header: an older ubc wrote fewer
        self._unsynced: float | None = None  # when the oldest row not fsync'ed was written

    @abstractmethod
    def encode(self, result: CaseResult) -> bytes:
        """One row as a line ending in a newline, with no other newline in it."""

    @abstractmethod
    def decode(self, line: str) -> dict[str, Any]:
        """The values of one line."""

    def _lines(self) -> list[str]:
        if not self.path.exists():
            self._complete_bytes = 0
            return []
        raw = self.path.read_bytes()
        self._complete_bytes = raw.rfind(b"\n") + 1  # a torn last line has no newline
        text = raw[: self._complete_bytes].decode("utf-8", errors="replace")
        lines = text.splitlines()
        if self.header and lines:
            self.columns = tuple(lines[0].split(","))
            if COLUMNS[:len(self.columns)] != self.columns or len(self.columns) < 2:
                raise UBCInputError(f"{self.path}: not a ubc-infer results file (its header is "
                                    "not the expected columns); choose another --out")
            lines = lines[1:]
        return lines

    def read(self) -> list[CaseResult]:
        results = []
        for number, line in enumerate(self._lines(), start=2 if self.header else 1):
            if not line.strip():
                continue
            try:
                results.append(CaseResult.from_row(self.decode(line)))
            except (ValueError, TypeError, KeyError) as exc:
                raise UBCInputError(f"{self.path}:{number}: malformed results row ({exc}); "
                                    "fix or remove the line, or choose another --out") from exc
        return results

    def start(self, keep: list[CaseResult] | None = None) -> None:
        if self._complete_bytes is None:
            self.read()
        if keep is None and self.columns != COLUMNS:  # an older ubc's file: new header
            keep = self.read()
        if keep is not None:
            atomic_write_bytes(self.path, self.header + b"".join(map(self.encode, keep)))
            self.columns = COLUMNS
        else:
            if self.path.exists() and self.path.stat().st_size != self._complete_bytes:
                os.truncate(self.path, self._complete_bytes or 0)  # drop the torn last line
            if not self.path.exists() or self.path.stat().st_size == 0:
                atomic_write_bytes(self.path, self.header)
        self._file = open(self.path, "ab")

    def append(self, result: CaseResult) -> None:
        if self._file is None:
            raise RuntimeError("call start() before append()")
        self._file.write(self.encode(result))
        self._file.flush()
        now = time.monotonic()
        if self._unsynced is None:
            self._unsynced = now
        if now - self._unsynced >= SYNC_SECONDS:
            self._sync()

    def _sync(self) -> None:
        if self._file is not None and self._unsynced is not None:
            os.fsync(self._file.fileno())
            self._unsynced = None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._sync()
            finally:
                self._file.close()
                self._file = None


def _one_line(text: str | None) -> str | None:
    return None if text is None else " ".join(text.splitlines())


def _csv_field(value: Any) -> Any:
    if value is None:
        return ""
    return ";".join(map(str, value)) if isinstance(value, list) else value


class CsvResults(_LineFile):
    """Comma-separated, a header line, ``slices_used`` as ``12;13;14``, empty = missing. A
    file of an older ubc, whose header holds the first of today's columns, is read (the
    others empty) and rewritten with today's header when appended to."""

    header = (",".join(COLUMNS) + "\n").encode()

    def encode(self, result: CaseResult) -> bytes:
        row = result.to_row()
        row["error"] = _one_line(row["error"])
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(map(_csv_field, row.values()))
        return buffer.getvalue().encode()

    def decode(self, line: str) -> dict[str, Any]:
        values = next(csv.reader([line]))
        if len(values) != len(self.columns):
            raise ValueError(f"{len(values)} fields, expected {len(self.columns)}")
        return dict(zip(self.columns, values, strict=True))


class JsonlResults(_LineFile):
    """One JSON object per line; missing values are ``null``."""

    def encode(self, result: CaseResult) -> bytes:
        return (json.dumps(result.to_row(), allow_nan=False) + "\n").encode()

    def decode(self, line: str) -> dict[str, Any]:
        row = json.loads(line)
        if not isinstance(row, dict):
            raise ValueError("a row must be a JSON object")
        return row


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError("Parquet output needs pyarrow: pip install ubc[parquet]") from exc
    return pa, pq


def _schema(pa: Any) -> Any:
    arrow = {str: pa.string(), int: pa.int64(), float: pa.float64(),
             tuple[int, ...]: pa.list_(pa.int64())}
    return pa.schema([(c, arrow[value_type(c)]) for c in COLUMNS])


#: Parquet metadata key: the sha256 of the journal folded into the file
_FOLDED = b"ubc.folded_journal_sha256"


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


class ParquetResults(ResultsFile):
    """Parquet, made durable through a JSON-lines journal folded in at ``close()``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        try:
            _pyarrow()
        except ImportError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        self.journal = JsonlResults(self.path.with_name(f".{self.path.name}.journal.jsonl"))

    def _table_rows(self) -> list[CaseResult]:
        if not self.path.exists():
            return []
        _, pq = _pyarrow()
        try:
            rows = pq.read_table(self.path).to_pylist()
        except Exception as exc:  # pyarrow raises its own types on a damaged file
            raise UBCInputError(f"{self.path}: unreadable Parquet file ({exc}); choose "
                                "another --out") from exc
        return [CaseResult.from_row(row) for row in rows]

    def _journal_folded(self) -> bool:
        """The journal beside the file is one the file already holds (a kill came between
        the fold and the journal's removal)."""
        if not self.path.exists() or not self.journal.path.exists():
            return False
        _, pq = _pyarrow()
        try:
            folded = (pq.read_schema(self.path).metadata or {}).get(_FOLDED)
        except Exception:  # a damaged file: _table_rows names it
            return False
        return folded is not None and folded.decode() == _sha256_of(self.journal.path)

    def read(self) -> list[CaseResult]:
        journal = [] if self._journal_folded() else self.journal.read()
        return self._table_rows() + journal

    def _write(self, rows: Iterable[CaseResult], *, folded: str | None = None) -> None:
        pa, pq = _pyarrow()
        schema = _schema(pa)
        if folded is not None:
            schema = schema.with_metadata({_FOLDED: folded.encode()})
        table = pa.Table.from_pylist([r.to_row() for r in rows], schema=schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.path, sink.getvalue().to_pybytes())

    def start(self, keep: list[CaseResult] | None = None) -> None:
        if self._journal_folded():
            self.journal.path.unlink()
        if keep is not None:
            self._write(keep)
            self.journal.path.unlink(missing_ok=True)
        self.journal.start()

    def append(self, result: CaseResult) -> None:
        self.journal.append(result)

    def close(self) -> None:
        if self.journal._file is None and not self.journal.path.exists():
            return
        self.journal.close()
        if not self._journal_folded():  # so read() would take the journal too
            self._write(self._table_rows() + self.journal.read(),
                        folded=_sha256_of(self.journal.path))
        self.journal.path.unlink(missing_ok=True)


def open_results(path: str | os.PathLike[str]) -> ResultsFile:
    """The results file for ``path``, its format chosen by the extension (``FORMATS``)."""
    suffix = Path(path).suffix.lower()
    kinds: dict[str, type[ResultsFile]] = {".csv": CsvResults, ".jsonl": JsonlResults,
                                           ".parquet": ParquetResults}
    if suffix not in kinds:
        raise ValueError(f"{path}: unknown results format {suffix or '(no extension)'!r}; "
                         f"use one of {', '.join(FORMATS)}")
    return kinds[suffix](path)


def read_results(path: str | os.PathLike[str]) -> list[CaseResult]:
    """Every complete row of a results file (any format), in file order."""
    return open_results(path).read()
