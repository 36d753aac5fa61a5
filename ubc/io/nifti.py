"""NIfTI in and out: volumes reoriented to canonical RAS, masks written back in the input's
own grid, orientation and affine.

Hostile files are refused before anything large is allocated (issue 9): the header's shape,
datatype, bitpix, vox_offset, pixdim and affine are checked first, the voxel count is capped
(``MAX_VOXELS``), a plain file must hold the bytes its header declares, and a .nii.gz is
inflated in bounded chunks, never more than the declared size plus
``ubc.io.bounded.GZIP_MARGIN``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

from ubc.atomic import atomic_write_bytes
from ubc.errors import UBCInputError
from ubc.io.bounded import GZIP_BACKEND, GZIP_ERRORS, Reader, open_reader, read_exactly
from ubc.io.volume import Volume, canonical_volume, orientation_of

__all__ = ["GZIP_BACKEND", "MAX_VOXELS", "Volume", "declared_voxels", "encode_mask",
           "load_volume", "load_volume_bytes", "save_mask"]

MAX_VOXELS = 1024 ** 3
"""Default cap on the voxels a header may declare (all volumes of a 4-D file together).
2^30 admits every real MRI (a 0.25 mm 7 T whole head, 800 x 1000 x 800 = 6.4e8; a 300-volume
diffusion series, 140 x 140 x 90 x 300 = 5.3e8), is the native preprocessing's own limit per
volume, and refuses the 1.7e10 voxels that a 384-byte hostile file declared. A file can make
the loader hold at most the cap times its bytes per voxel (+ 12 bytes per voxel when the
header scales intensities: nibabel's float64 step and the float32 result), so a service that
takes uploads should pass a smaller ``max_voxels`` (512^3 covers clinical scans)."""

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest vox_offset accepted: the header plus its extensions (CIFTI XML is a few MB)."""

PIXDIM_RANGE = (1e-6, 1e6)
"""Accepted voxel sizes (pixdim[1..3], absolute): 10 um stored in metres to 10 mm stored in
micrometres, with room to spare; outside it (0, denormals, 1e30) resampling is meaningless."""

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_SCALE_STEP = 1 << 20  # voxels scaled per step: nibabel's two float64 intermediates, 16 MB
def _read_header(reader: Reader) -> nib.Nifti1Header:
    """The fixed part of the header (348 or 540 bytes), unchecked, byte order detected."""
    raw = read_exactly(reader, 348)
    if len(raw) < 348:
        raise ValueError(f"{len(raw)} bytes is too short for a NIfTI header")
    # Byte order from sizeof_hdr alone (nibabel guesses it from dim[0], which may be hostile).
    little, big = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")
    if little in (348, 540):
        endian, size = "<", little
    elif big in (348, 540):
        endian, size = ">", big
    else:
        raise ValueError("not a NIfTI file (bad header size field)")
    if size == 540:
        raw += read_exactly(reader, 540 - 348)
        if len(raw) < 540:
            raise ValueError(f"{len(raw)} bytes is too short for a NIfTI-2 header")
        return nib.Nifti2Header(raw, endianness=endian, check=False)
    return nib.Nifti1Header(raw, endianness=endian, check=False)


@dataclass(frozen=True)
class _Layout:
    """Where the voxels are and what they are, as the header declares them."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _declared_layout(header: nib.Nifti1Header, path: Path, max_voxels: int) -> _Layout:
    """Shape, dtype and data offset from the raw header fields, refused when absurd."""
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise UBCInputError(f"{path}: header dim[0] = {dim[0]}; NIfTI allows 1 to 7 axes")
    shape = tuple(dim[1:dim[0] + 1])
    if min(shape) < 0:
        raise UBCInputError(f"{path}: header declares a negative size, shape {shape}")
    voxels = math.prod(shape)
    if voxels > max_voxels:
        raise UBCInputError(f"{path}: header declares shape {shape} = {voxels:,} voxels, "
                            f"more than the cap of {max_voxels:,} (max_voxels)")
    code = int(header["datatype"])
    try:
        dtype = header.get_data_dtype()
    except (KeyError, nib.spatialimages.HeaderDataError) as exc:
        raise UBCInputError(f"{path}: header datatype code {code} is not a NIfTI data type") \
            from exc
    if dtype.kind not in "iuf" or dtype.fields:  # complex, RGB: no scalar intensity to score
        raise UBCInputError(f"{path}: header datatype {code} ({dtype}) is not a scalar real "
                            f"image; integer and float volumes are read")
    bitpix = int(header["bitpix"])
    if bitpix != 8 * dtype.itemsize:
        raise UBCInputError(f"{path}: header bitpix {bitpix} does not match datatype {code} "
                            f"({dtype.name}, {8 * dtype.itemsize} bits)")
    return _Layout(shape, dtype, _data_offset(header, path))


def _data_offset(header: nib.Nifti1Header, path: Path) -> int:
    vox_offset = float(header["vox_offset"])
    minimum = int(header["sizeof_hdr"]) + 4  # the header and its 4-byte extension flag
    if not (math.isfinite(vox_offset) and minimum <= vox_offset <= MAX_HEADER_BYTES):
        raise UBCInputError(f"{path}: header vox_offset {vox_offset:g} is outside "
                            f"{minimum} .. {MAX_HEADER_BYTES:,} bytes")
    return int(vox_offset)


def _check_pixdim(header: nib.Nifti1Header, path: Path, axes: int) -> None:
    """Voxel sizes that are zero (nibabel would silently make them 1), not finite, or
    outside ``PIXDIM_RANGE`` are refused; a negative size is made positive, as nibabel does."""
    low, high = PIXDIM_RANGE
    for axis in range(1, min(axes, 3) + 1):
        value = float(header["pixdim"][axis])
        if not low <= abs(value) <= high:  # False for NaN too
            raise UBCInputError(f"{path}: header pixdim[{axis}] = {value:g} is not a voxel "
                                f"size: it must be finite, between {low:g} and {high:g}")


def _affine_field(header: nib.Nifti1Header) -> str:
    """The header fields ``get_best_affine`` builds the affine from."""
    if header["sform_code"] != 0:
        return "sform (srow_x, srow_y, srow_z)"
    if header["qform_code"] != 0:
        return "qform (quatern_b/c/d, qoffset_x/y/z, pixdim)"
    return "pixdim"


def _checked_affine(header: nib.Nifti1Header, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(affine float64 [4, 4], its orientation [3, 2]); refused when not finite or singular
    (nibabel and numpy would raise OrientationError / LinAlgError later)."""
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    field = _affine_field(header)
    if not np.isfinite(affine).all():
        raise UBCInputError(f"{path}: the affine from the header's {field} is not finite: "
                            f"{affine[:3].tolist()}")
    ornt = orientation_of(affine)
    if ornt is None:
        raise UBCInputError(f"{path}: the affine from the header's {field} is singular "
                            f"(zero spacing or collinear axes): {affine[:3].tolist()}")
    return affine, ornt


@dataclass(frozen=True)
class _Image:
    header: nib.Nifti1Header
    data: np.ndarray  # the file's own axes and dtype, unscaled
    affine: np.ndarray
    ornt: np.ndarray


def _read_image(file: io.BufferedIOBase, size: int, path: Path, max_voxels: int) -> _Image:
    """Header checked field by field, then exactly the declared voxels, read into one
    buffer (np.empty: pages are only touched as the bytes arrive). ``size``: the file's
    bytes; ``path`` names it in errors."""
    reader, compressed = open_reader(file)
    fixed = _read_header(reader)
    layout = _declared_layout(fixed, path, max_voxels)
    if not compressed and size < layout.offset + layout.nbytes:
        raise UBCInputError(f"{path}: truncated: header declares {layout.nbytes:,} bytes "
                            f"of voxels at offset {layout.offset}, the file has {size:,}")
    _check_pixdim(fixed, path, len(layout.shape))
    raw = fixed.binaryblock + read_exactly(reader, layout.offset - len(fixed.binaryblock))
    header = type(fixed).from_fileobj(io.BytesIO(raw), fixed.endianness, check=False)
    header.check_fix()  # nibabel's own checks (magic, ...): raises on errors
    affine, ornt = _checked_affine(header, path)
    data = _allocate(layout.nbytes, path)
    got = reader.readinto(data.data)
    if got < layout.nbytes:
        raise UBCInputError(f"{path}: truncated: header declares {layout.nbytes:,} bytes "
                            f"of voxels, the file holds {got:,}")
    reader.finish(path, layout.offset + layout.nbytes)
    array = np.ndarray(layout.shape, dtype=layout.dtype, buffer=data, order="F")
    return _Image(header, array, affine, ornt)


def _allocate(nbytes: int, path: Path) -> np.ndarray:
    try:
        return np.empty(nbytes, dtype=np.uint8)
    except MemoryError as exc:
        raise UBCInputError(f"{path}: not enough memory for the {nbytes:,} bytes of voxels "
                            f"its header declares") from exc


def _voxels(image: _Image, path: Path) -> np.ndarray:
    """On-disk dtype when the header does not scale (no float64 blow-up), else float32 as
    nibabel's ``get_fdata(dtype=np.float32)`` computes it, ``_SCALE_STEP`` voxels at a time
    (nibabel's float64 intermediate of the whole volume would take 8 bytes per voxel)."""
    slope, inter = image.header.get_slope_inter()
    slope = 1.0 if slope is None else slope
    inter = 0.0 if inter is None else inter
    if slope == 1 and inter == 0:
        return image.data
    kind = image.data.dtype.kind
    bound = np.iinfo(image.data.dtype) if kind in "iu" else None
    may_overflow = bound is None \
        or max(-bound.min, bound.max) * abs(slope) + abs(inter) > _FLOAT32_MAX
    source = image.data.reshape(-1, order="F")  # views: both are Fortran-contiguous
    scaled = np.empty(image.data.shape, dtype=np.float32, order="F")
    target = scaled.reshape(-1, order="F")
    for start in range(0, source.size, _SCALE_STEP):
        part, out = source[start:start + _SCALE_STEP], target[start:start + _SCALE_STEP]
        with np.errstate(over="ignore", invalid="ignore"):  # checked below, by name
            out[:] = apply_read_scaling(part, slope, inter)
        if may_overflow and (np.isinf(out) & np.isfinite(part)).any():
            raise UBCInputError(f"{path}: header scl_slope {slope:g} and scl_inter {inter:g} "
                                f"scale voxels beyond the float32 range")
    return scaled


def _as_3d(data: np.ndarray, volume_index: int | None) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        if volume_index is None:
            raise ValueError(f"4-D file with {data.shape[3]} volumes; pass a volume index")
        if not 0 <= volume_index < data.shape[3]:
            raise ValueError(f"volume index {volume_index} out of range for "
                             f"{data.shape[3]} volumes")
        data = data[..., volume_index]
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {data.shape}")
    if min(data.shape) == 0:
        raise ValueError(f"empty volume, shape {data.shape}")
    return data


def _canonical(image: _Image, data: np.ndarray, path: Path) -> Volume:
    """The file's 3-D voxels reoriented (views, no copy) to RAS."""
    return canonical_volume(data, image.affine, image.header.get_zooms()[:3], path,
                            ornt=image.ornt)


def _checked_cap(max_voxels: int) -> None:
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < 1:
        raise ValueError(f"max_voxels must be a positive int, got {max_voxels!r}")


def _load(read: Callable[[], _Image], path: Path, volume_index: int | None) -> Volume:
    """``read()``'s image as a canonical Volume; every failure a UBCInputError naming path."""
    try:
        image = read()
        return _canonical(image, _as_3d(_voxels(image, path), volume_index), path)
    except Exception as exc:  # nibabel raises many types on malformed headers
        raise input_error(exc, path, "NIfTI") from exc


def input_error(exc: Exception, path: Path, kind: str) -> UBCInputError:
    """A reader's failure as the ``UBCInputError`` that names the file and the problem."""
    if isinstance(exc, UBCInputError):
        return exc
    if isinstance(exc, FileNotFoundError):
        missing = f" ({exc.filename})" if exc.filename and Path(exc.filename) != path else ""
        return UBCInputError(f"{path}: file not found{missing}")
    if isinstance(exc, PermissionError):
        return UBCInputError(f"{path}: permission denied")
    if isinstance(exc, IsADirectoryError):
        return UBCInputError(f"{path}: is a directory, not a file")
    if isinstance(exc, GZIP_ERRORS):
        return UBCInputError(f"{path}: corrupt or truncated gzip ({exc})")
    return UBCInputError(f"{path}: cannot read as {kind} ({type(exc).__name__}: {exc})")


def load_volume(path: str | os.PathLike[str], volume_index: int | None = None, *,
                max_voxels: int = MAX_VOXELS) -> Volume:
    """Read a .nii or .nii.gz file as a canonical (RAS) ``Volume``.

    Any failure (missing file, corrupt or truncated gzip, not NIfTI, a complex or RGB
    datatype, a header whose shape, datatype, bitpix, vox_offset, pixdim, scaling or affine
    is absurd, more than ``max_voxels`` voxels declared (all volumes of a 4-D file
    together), several volumes without ``volume_index``, empty) raises ``UBCInputError``
    naming the file and the cause, before memory is allocated for voxels the file does not
    hold.
    """
    _checked_cap(max_voxels)
    path = Path(path)

    def read() -> _Image:
        with open(path, "rb") as file:
            return _read_image(file, os.fstat(file.fileno()).st_size, path, max_voxels)

    return _load(read, path, volume_index)


def load_volume_bytes(data: bytes | bytearray | memoryview, *, name: str = "<upload>",
                      volume_index: int | None = None, max_voxels: int = MAX_VOXELS) -> Volume:
    """``load_volume`` for the bytes of a .nii or .nii.gz file held in memory (an upload):
    gzip is recognised by content, errors name ``name``; the Volume has no ``path``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    _checked_cap(max_voxels)
    label = Path(name)
    volume = _load(lambda: _read_image(io.BytesIO(data), len(data), label, max_voxels),
                   label, volume_index)
    return dataclasses.replace(volume, path=None)


def declared_voxels(data: bytes | bytearray | memoryview, *, name: str = "<upload>"
                    ) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, stored dtype) of the voxels that a .nii/.nii.gz file held in memory declares
    (all volumes of a 4-D file), from its header alone (a few hundred inflated bytes): what
    ``load_volume_bytes`` would allocate, known before loading, so that a service can refuse
    or budget it. A header the loader refuses raises its ``UBCInputError`` naming ``name``."""
    label = Path(name)
    try:
        reader, _ = open_reader(io.BytesIO(data))
        layout = _declared_layout(_read_header(reader), label, MAX_VOXELS)
    except Exception as exc:  # nibabel raises many types on malformed headers
        raise input_error(exc, label, "NIfTI") from exc
    return layout.shape, layout.dtype


_SINGLE_FILE_OFFSET = 352  # a NIfTI-1 header (348 bytes) and a no-extension flag


def encode_mask(mask: np.ndarray, affine: np.ndarray, *, compress: bool = True) -> bytes:
    """``mask`` as the bytes of a NIfTI-1 file (.nii.gz unless ``compress`` is False) in its
    own grid with ``affine`` (4 x 4, voxel -> world mm): uint8 for integer/bool masks,
    float32 otherwise. The same mask gives the same bytes (mtime 0). Deflated by isal at
    level 1: on a 240 x 240 x 155 mask 30x faster than zlib level 1 (nibabel's) and 4x
    smaller (``ubc-bench --feed``; isal's levels 0, 2 and 3 are slower or larger)."""
    dtype = np.float32 if mask.dtype.kind == "f" else np.uint8
    voxels = np.asfortranarray(mask, dtype=dtype)
    raw = b"".join([_single_file_header(voxels, affine), voxels.ravel(order="F").data])
    if not compress:
        return raw
    from isal import igzip

    return igzip.compress(raw, 1, mtime=0)


def _single_file_header(voxels: np.ndarray, affine: np.ndarray) -> bytes:
    """The header and (empty) extension block that nibabel's ``to_bytes`` writes before
    ``voxels`` (unscaled, Fortran order, from byte 352): the same bytes, without its
    chunked copy of the voxels (6 ms of the 8 a BraTS mask took to encode)."""
    header = nib.Nifti1Image(voxels, affine).header
    header.set_xyzt_units("mm")
    header["vox_offset"] = _SINGLE_FILE_OFFSET
    header.set_slope_inter(1.0, 0.0)
    return header.binaryblock + b"\0" * (_SINGLE_FILE_OFFSET - len(header.binaryblock))


def save_mask(mask: np.ndarray, volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write a mask on ``volume``'s canonical grid as a .nii or .nii.gz file in the input's
    original grid, orientation and affine (``encode_mask``); atomic."""
    if mask.shape != volume.data.shape:
        raise ValueError(f"mask shape {mask.shape} does not match volume {volume.data.shape}")
    name = Path(path).name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: a mask is written as NIfTI; name it .nii.gz or .nii")
    data = encode_mask(volume.to_original_orientation(mask), volume.original_affine,
                       compress=name.endswith(".gz"))
    return atomic_write_bytes(path, data)
