"""NRRD in (``.nrrd`` with attached data, ``.nhdr`` with a detached data file), as 3D
Slicer and ITK write them: the header is parsed by pynrrd (``pip install ubc[nrrd]``), the
voxels are read by our own bounded readers (``ubc.io.bounded``), because pynrrd inflates a
gzip stream whole before it compares its size with the header's: a small file could ask
for gigabytes.

Refused before anything large is allocated, with ``UBCInputError`` naming the file: a
header over ``MAX_HEADER_BYTES`` or that pynrrd cannot parse, a type other than integers
and floats, more than ``ubc.io.nifti.MAX_VOXELS`` voxels or sizes that are not positive,
more than one volume, an encoding other than raw or gzip, a detached data file outside the
header's folder (or a list of files), a space without a patient orientation
(``scanner-xyz``), a singular or non-finite geometry, voxel sizes outside
``ubc.io.nifti.PIXDIM_RANGE``, and data shorter than declared.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ubc.errors import UBCInputError
from ubc.io.bounded import GzipReader, PlainReader, Reader
from ubc.io.nifti import MAX_VOXELS, PIXDIM_RANGE, _as_3d, input_error
from ubc.io.volume import Volume, canonical_volume, orientation_of

__all__ = ["MAX_HEADER_BYTES", "NRRD_MAGIC", "load_nrrd", "nrrd_files"]

NRRD_MAGIC = b"NRRD000"  # the first line is NRRD0001 .. NRRD0005

MAX_HEADER_BYTES = 1024 * 1024
"""Largest header accepted (Slicer's are under 1 kB; a long key/value list is a few kB)."""

#: patient spaces -> the sign of each world axis to make it RAS
_SPACES = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
}
_ENCODINGS = {"raw": False, "gzip": True, "gz": True}


def _header_text(path: Path) -> tuple[list[str], int]:
    """The header's lines and the offset of the data after it (a detached header is the
    whole file)."""
    with open(path, "rb") as file:
        head = file.read(MAX_HEADER_BYTES + 1)
    if not head.startswith(NRRD_MAGIC):
        raise UBCInputError(f"{path}: not an NRRD file (no NRRD000x magic line)")
    end = head.find(b"\n\n")
    if end < 0:
        if len(head) > MAX_HEADER_BYTES:
            raise UBCInputError(f"{path}: no end of the NRRD header within "
                                f"{MAX_HEADER_BYTES:,} bytes")
        end = len(head)
    return head[:end].decode("latin-1").splitlines(), end + 2


def _parse(path: Path) -> tuple[dict[str, Any], int]:
    import nrrd

    lines, offset = _header_text(path)
    try:
        return nrrd.read_header(lines), offset
    except Exception as exc:  # pynrrd raises NRRDError, ValueError, KeyError ...
        raise UBCInputError(f"{path}: malformed NRRD header ({type(exc).__name__}: "
                            f"{exc})") from exc


def _data_file(path: Path, header: dict[str, Any]) -> Path | None:
    """The detached data file named by the header (None: attached data)."""
    name = header.get("data file", header.get("datafile"))
    if name is None:
        return None
    if not isinstance(name, str) or " " in name.strip() or name.strip().upper() == "LIST":
        raise UBCInputError(f"{path}: a data file list or pattern is not supported "
                            f"({name!r}); write the volume as one file")
    folder = path.resolve().parent
    data = (folder / name.strip()).resolve()
    if data.parent != folder:
        raise UBCInputError(f"{path}: the data file {name!r} is not beside the header; "
                            "refused (a header may not point elsewhere)")
    return data


def nrrd_files(path: Path) -> list[Path]:
    """The files a resumed run compares: the header, and a detached header's data file
    (the header alone when it cannot be read)."""
    try:
        header, _ = _parse(path)
        data = _data_file(path, header)
    except (UBCInputError, OSError):
        return [path]
    return [path] if data is None else [path, data]


def _dtype(path: Path, header: dict[str, Any]) -> np.dtype[Any]:
    from nrrd.reader import _determine_datatype  # pynrrd's table of type names

    try:
        dtype = np.dtype(_determine_datatype(header))
    except Exception as exc:
        raise UBCInputError(f"{path}: NRRD type {header.get('type')!r} ({exc})") from exc
    if dtype.kind not in "iuf":
        raise UBCInputError(f"{path}: NRRD type {header.get('type')!r} is not an integer "
                            "or float type")
    return dtype


def _shape(path: Path, header: dict[str, Any]) -> tuple[int, ...]:
    sizes = [int(s) for s in np.atleast_1d(header["sizes"])]
    if len(sizes) != int(header["dimension"]) or not 3 <= len(sizes) <= 4 \
            or min(sizes) < 1:
        raise UBCInputError(f"{path}: NRRD sizes {sizes} are not a 3-D volume")
    if math.prod(sizes) > MAX_VOXELS:
        raise UBCInputError(f"{path}: {math.prod(sizes):,} voxels is over the limit of "
                            f"{MAX_VOXELS:,}")
    return tuple(sizes)


def _grid(path: Path, header: dict[str, Any], axes: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(affine: voxel (first three axes) -> RAS world mm, its orientation, voxel sizes)."""
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space not in _SPACES:
        raise UBCInputError(f"{path}: NRRD space {space!r} has no patient orientation "
                            f"(one of {', '.join(sorted(_SPACES))} is needed)")
    to_ras = np.diag(np.asarray(_SPACES[space], dtype=np.float64))
    affine = np.eye(4)
    if "space directions" in header:
        directions = np.asarray(header["space directions"], dtype=np.float64)[:3]
    else:  # axis-aligned: the spacings alone
        spacings = np.asarray(header.get("spacings", [1.0] * axes), dtype=np.float64)
        directions = np.diag(spacings[:3])
    if directions.shape != (3, 3):
        raise UBCInputError(f"{path}: NRRD space directions {directions.tolist()} are not "
                            "three 3-D vectors")
    affine[:3, :3] = to_ras @ directions.T
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine[:3, 3] = to_ras @ origin[:3]
    ornt = orientation_of(affine)
    if ornt is None:
        raise UBCInputError(f"{path}: NRRD geometry is singular or not finite (zero spacing "
                            f"or collinear axes): {affine[:3].tolist()}")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    low, high = PIXDIM_RANGE
    if not ((zooms >= low) & (zooms <= high)).all():
        raise UBCInputError(f"{path}: NRRD voxel sizes {zooms.tolist()} are not between "
                            f"{low:g} and {high:g}")
    return affine, ornt, zooms


def _read_voxels(path: Path, source: Path, offset: int, compressed: bool,
                 nbytes: int) -> np.ndarray:
    """Exactly ``nbytes`` of (inflated) data from ``source`` at ``offset``."""
    with open(source, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if not compressed and size < offset + nbytes:
            raise UBCInputError(f"{path}: truncated: the header declares {nbytes:,} bytes of "
                                f"voxels, {source.name} holds {max(size - offset, 0):,}")
        file.seek(offset)
        reader: Reader = GzipReader(file) if compressed else PlainReader(file)
        data = np.empty(nbytes, dtype=np.uint8)
        got = reader.readinto(data.data)
        if got < nbytes:
            raise UBCInputError(f"{path}: truncated: the header declares {nbytes:,} bytes of "
                                f"voxels, the data holds {got:,}")
        reader.finish(path, nbytes)
    return data


def load_nrrd(path: str | os.PathLike[str]) -> Volume:
    """Read a .nrrd or .nhdr file as a canonical (RAS) ``Volume`` (see the module
    docstring for what is refused, always as ``UBCInputError`` naming the file)."""
    path = Path(path)
    try:
        header, offset = _parse(path)
        shape, dtype = _shape(path, header), _dtype(path, header)
        encoding = str(header.get("encoding", "")).lower()
        if encoding not in _ENCODINGS:
            raise UBCInputError(f"{path}: NRRD encoding {encoding!r} is not supported "
                                "(raw or gzip)")
        if int(header.get("line skip", 0)) or int(header.get("byte skip", 0)):
            raise UBCInputError(f"{path}: NRRD line/byte skip is not supported")
        data_file = _data_file(path, header)
        affine, ornt, zooms = _grid(path, header, len(shape))
        nbytes = math.prod(shape) * dtype.itemsize
        raw = _read_voxels(path, data_file or path, 0 if data_file else offset,
                           _ENCODINGS[encoding], nbytes)
        array = _as_3d(np.ndarray(shape, dtype=dtype, buffer=raw, order="F"), None)
    except Exception as exc:  # pynrrd and numpy raise many types on malformed files
        raise input_error(exc, path, "NRRD") from exc
    return canonical_volume(array, affine, zooms.tolist(), path, ornt=ornt)
