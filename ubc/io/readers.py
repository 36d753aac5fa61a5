"""One reader per input kind behind one small protocol, so that the scoring stages never
branch on a format: a NIfTI file, an NRRD file, a DICOM study's chosen series, the bytes of
a file held in memory, an array with its affine, a ``Volume`` already loaded.

A reader says who its input is (``identity``: what a resumed run compares with the row),
loads it to a canonical RAS ``Volume`` (``load``; a bad input raises ``UBCInputError``
naming it), and says what the row records of the source (``flags``, ``columns``). What an
output needs to refer back to the source travels in the ``Volume`` (``source_frames``: the
DICOM instances a SEG references). A new format is a new reader class here plus one entry
in ``FILE_READERS`` (found by name and by content), or in discovery for a source found
otherwise (a DICOM study).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ubc.errors import UBCInputError
from ubc.io.sniff import NIFTI, NRRD
from ubc.io.volume import Volume

if TYPE_CHECKING:
    from ubc.io.dicom import InstanceHeader
    from ubc.io.dicom_select import DicomStudy

__all__ = ["Identity", "NO_IDENTITY", "IN_MEMORY", "SourceColumns", "VolumeReader",
           "NiftiFile", "NrrdFile", "DicomSeries", "VolumeBytes", "ArrayVolume",
           "LoadedVolume", "FILE_READERS", "reader_for_file", "reader_for_content", "volume_suffix",
           "files_identity"]

#: ``(bytes, mtime_ns, digest)`` of an input as it is now (see ``files_identity``)
Identity = tuple["int | None", "int | None", "str | None"]
NO_IDENTITY: Identity = (None, None, None)
#: how messages and rows name an input held in memory (never the caller's case id, which
#: may identify a patient)
IN_MEMORY = "<in memory>"


@dataclass(frozen=True)
class SourceColumns:
    """The row's columns that describe a DICOM source (empty for other inputs)."""

    study_uid: str | None = None
    series_uid: str | None = None
    series_description: str | None = None


class VolumeReader(Protocol):
    """What the scoring stages know of an input."""

    @property
    def flags(self) -> tuple[str, ...]:
        """Notes for the row known before loading (e.g. how a DICOM series was chosen)."""
        ...

    def identity(self) -> Identity:
        """``(bytes, mtime_ns, digest)`` of the input now; ``NO_IDENTITY`` when it cannot be
        stat'ed or lives in memory."""
        ...

    def load(self) -> Volume:
        """The canonical RAS volume; ``UBCInputError`` naming the input when it is bad."""
        ...

    def columns(self) -> SourceColumns:
        """What the row records of the source (the DICOM study and series)."""
        ...


def files_identity(files: Sequence[Path], *, digest: bool) -> Identity:
    """Total size, latest mtime and (``digest``) a sha1 over the files' names, sizes and
    mtimes; ``NO_IDENTITY`` when one cannot be stat'ed."""
    sha = hashlib.sha1()
    total, latest = 0, 0
    try:
        for path in files:
            stat = os.stat(path)
            total += stat.st_size
            latest = max(latest, stat.st_mtime_ns)
            sha.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(
                "utf-8", "surrogatepass"))
    except OSError:
        return NO_IDENTITY
    return (total, latest, sha.hexdigest() if digest else None)


@dataclass(frozen=True)
class _Plain:
    """What a reader without DICOM says of its source: no flags, no columns."""

    flags: tuple[str, ...] = field(default=(), init=False)

    def columns(self) -> SourceColumns:
        return SourceColumns()


@dataclass(frozen=True)
class NiftiFile(_Plain):
    """A .nii or .nii.gz file (``ubc.io.nifti``)."""

    path: Path

    def identity(self) -> Identity:
        return files_identity([self.path], digest=False)

    def load(self) -> Volume:
        from ubc.io.nifti import load_volume

        return load_volume(self.path)


@dataclass(frozen=True)
class NrrdFile(_Plain):
    """A .nrrd file, or a detached .nhdr header with its data file (``ubc.io.nrrd``)."""

    path: Path

    def identity(self) -> Identity:
        from ubc.io.nrrd import nrrd_files

        files = nrrd_files(self.path)
        return files_identity(files, digest=len(files) > 1)

    def load(self) -> Volume:
        from ubc.io.nrrd import load_nrrd

        return load_nrrd(self.path)


@dataclass(frozen=True)
class DicomSeries:
    """The chosen series of a DICOM study (``ubc.io.dicom_select``); a study where no
    series qualifies (or whose header could not be read) fails to load with its reason."""

    study: DicomStudy

    @property
    def flags(self) -> tuple[str, ...]:
        return self.study.flags

    def identity(self) -> Identity:
        return files_identity(self.study.files, digest=True)

    def load(self) -> Volume:
        from ubc.io.dicom import load_series

        study = self.study
        if study.error is not None or study.chosen is None:
            raise UBCInputError(study.error or f"{study.folder}: no series chosen")
        volume, _ = load_series(study.chosen.files, headers=self.headers,
                                name=f"{study.folder} series {study.chosen.summary()}")
        return volume

    @property
    def headers(self) -> tuple[InstanceHeader, ...]:
        """The chosen series' instance headers as discovery read them (none once dropped:
        ``DicomStudy.without_headers``)."""
        return () if self.study.chosen is None else self.study.chosen.headers

    def columns(self) -> SourceColumns:
        chosen = self.study.chosen
        if chosen is None:
            return SourceColumns(study_uid=self.study.study_uid or None)
        return SourceColumns(self.study.study_uid or None, chosen.series_uid,
                             chosen.description)


@dataclass(frozen=True, eq=False)
class VolumeBytes(_Plain):
    """The bytes of a .nii/.nii.gz file held in memory (an upload); errors name ``name``."""

    data: bytes | bytearray | memoryview
    name: str = IN_MEMORY

    def identity(self) -> Identity:
        return NO_IDENTITY

    def load(self) -> Volume:
        from ubc.io.nifti import load_volume_bytes

        return load_volume_bytes(self.data, name=self.name)


@dataclass(frozen=True, eq=False)
class ArrayVolume(_Plain):
    """A 3-D array on the grid of ``affine`` (4 x 4, voxel -> world mm); errors name
    ``name``."""

    array: np.ndarray
    affine: np.ndarray
    name: str = IN_MEMORY

    def identity(self) -> Identity:
        return NO_IDENTITY

    def load(self) -> Volume:
        from ubc.io.array import volume_from_array

        return volume_from_array(self.array, self.affine, name=self.name)


@dataclass(frozen=True, eq=False)
class LoadedVolume(_Plain):
    """A ``Volume`` the caller loaded already."""

    volume: Volume

    def identity(self) -> Identity:
        return NO_IDENTITY

    def load(self) -> Volume:
        return self.volume


#: volume files: their kind by content (``ubc.io.sniff.file_kind``), their suffixes (lower
#: case) and their reader
FILE_READERS: tuple[tuple[str, tuple[str, ...], Callable[[Path], VolumeReader]], ...] = (
    (NIFTI, (".nii.gz", ".nii"), NiftiFile),
    (NRRD, (".nrrd", ".nhdr"), NrrdFile),
)


def volume_suffix(name: str) -> str | None:
    """The volume-file suffix ``name`` ends with (as written), None for other names."""
    lower = name.lower()
    for _, suffixes, _ in FILE_READERS:
        for suffix in suffixes:
            if lower.endswith(suffix):
                return name[len(name) - len(suffix):]
    return None


def reader_for_file(path: Path) -> VolumeReader:
    """The reader of a volume file by its name; NIfTI for any other name (its loader
    recognises the content and names what is wrong)."""
    lower = path.name.lower()
    for _, suffixes, reader in FILE_READERS:
        if lower.endswith(suffixes):
            return reader(path)
    return NiftiFile(path)


def reader_for_content(path: Path, kind: str | None) -> VolumeReader | None:
    """The reader of a file whose content is of ``kind`` (``ubc.io.sniff.file_kind``),
    whatever its name; None when no volume reader takes that kind."""
    return next((reader(path) for found, _, reader in FILE_READERS if found == kind), None)
