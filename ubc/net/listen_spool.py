"""What the DICOM node (``ubc-listen``, ``ubc.net.listen``) does with one received instance:
check it (``read_instance``: the bytes a C-STORE brought, file meta included) and keep it
durably (``InstanceSpool.add``: written to ``.incoming/``, fsync'ed, renamed into the
study's folder ``<spool>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``, the folder fsync'ed).

The spool counts its bytes and refuses an instance past its cap (``SpoolFull``) before
writing anything, so nothing already received is ever dropped. A study's folder name is its
StudyInstanceUID, checked to be a DICOM UID (digits and dots, at most 64 characters): it
cannot leave the spool, and a restart knows each folder's study. No message here carries a
patient attribute.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import threading
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from ubc.atomic import fsync_dir

__all__ = ["Instance", "Malformed", "SpoolFull", "InstanceSpool", "read_instance",
           "is_image_storage", "is_uid"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
INCOMING = ".incoming"
#: transfer syntaxes whose pixel data is stored native (its length follows from the header)
_NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
           "1.2.840.10008.1.2.2")


class Malformed(Exception):
    """An instance that cannot be kept; the message says why, never a patient attribute."""


class SpoolFull(Exception):
    """The spool is at its cap (``--spool-max-gb``)."""


@dataclass(frozen=True)
class Instance:
    """The UIDs of a received instance."""

    study_uid: str
    series_uid: str
    sop_uid: str


def is_uid(text: str) -> bool:
    return len(text) <= 64 and _UID.match(text) is not None


def is_image_storage(sop_class_uid: str) -> bool:
    """An image storage SOP class (MR, Enhanced MR, CT, Secondary Capture ...): what is
    spooled; SR, SEG, presentation states, PDF and the like are not images."""
    from pydicom.uid import UID

    return "Image Storage" in UID(sop_class_uid).name


def _uid(ds: object, keyword: str) -> str:
    value = str(getattr(ds, keyword, "") or "").strip()
    if not is_uid(value):
        raise Malformed(f"no valid {keyword}")
    return value


def _check_pixels(ds: object, syntax: str) -> None:
    """Native pixel data as long as its header says (a transfer cut short is refused)."""
    if syntax not in _NATIVE or "PixelData" not in ds:  # type: ignore[operator]
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)  # type: ignore[attr-defined]
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)  # type: ignore[attr-defined]
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise Malformed("pixel data without a readable Rows, Columns or BitsAllocated") \
            from exc
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if len(ds.PixelData) < expected:  # type: ignore[attr-defined]
        raise Malformed(f"pixel data cut short ({len(ds.PixelData)} of {expected} "  # type: ignore[attr-defined]
                        "bytes)")


def read_instance(data: bytes) -> Instance:
    """The UIDs of a received instance (``data``: preamble, file meta and dataset, as
    pynetdicom's ``event.encoded_dataset()`` gives them), read in full: ``Malformed`` when
    it cannot be decoded in its transfer syntax, lacks a valid Study, Series or SOP Instance
    UID, or its native pixel data is shorter than its header says."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every odd value it copes with
            ds = pydicom.dcmread(io.BytesIO(data))
            instance = Instance(_uid(ds, "StudyInstanceUID"), _uid(ds, "SeriesInstanceUID"),
                                _uid(ds, "SOPInstanceUID"))
            _check_pixels(ds, str(ds.file_meta.get("TransferSyntaxUID", "")))
    except Malformed:
        raise
    except Exception as exc:  # pydicom raises many types on damaged bytes; no value shown
        raise Malformed(f"cannot be decoded ({type(exc).__name__})") from exc
    return instance


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class InstanceSpool:
    """``root/<StudyInstanceUID>/`` per study received and not yet done, at most
    ``max_bytes`` in all. Thread-safe."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"--spool-max-gb must be > 0, got {max_bytes / 1e9:g}")
        self.root, self.max_bytes = root, max_bytes
        self.incoming = root / INCOMING
        shutil.rmtree(self.incoming, ignore_errors=True)  # what a killed write left
        self.incoming.mkdir(parents=True)
        self._lock = threading.Lock()
        self.bytes = sum(_size(self.folder(uid)) for uid in self.studies())

    def folder(self, study_uid: str) -> Path:
        if not is_uid(study_uid):  # guards the path: only UIDs become folder names
            raise ValueError(f"not a DICOM UID: {study_uid[:80]!r}")
        return self.root / study_uid

    def studies(self) -> list[str]:
        """The studies in the spool (the folders named by a UID), oldest first."""
        found = [p for p in self.root.iterdir() if p.is_dir() and is_uid(p.name)]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime_ns)]

    def add(self, instance: Instance, data: bytes) -> Path:
        """Keep ``data`` durably as the instance's file (a repeat replaces it);
        ``SpoolFull`` (nothing written) when it would pass the cap."""
        folder = self.folder(instance.study_uid)
        target = folder / f"{instance.sop_uid}.dcm"
        with self._lock:
            if self.bytes + len(data) > self.max_bytes:
                raise SpoolFull(f"the spool holds {self.bytes / 1e9:.3g} GB of its "
                                f"{self.max_bytes / 1e9:g} GB (--spool-max-gb)")
            self.bytes += len(data)
        try:
            temporary = self.incoming / f"{uuid.uuid4().hex}.tmp"
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                fsync_dir(self.root)
            replaced = target.stat().st_size if target.exists() else 0
            os.replace(temporary, target)
            fsync_dir(folder)
        except BaseException:
            with self._lock:
                self.bytes -= len(data)
            raise
        with self._lock:
            self.bytes -= replaced
        return target

    def remove(self, study_uid: str) -> None:
        """The study is done: its folder goes."""
        folder = self.folder(study_uid)
        if not folder.is_dir():
            return
        size = _size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        with self._lock:
            self.bytes -= size
