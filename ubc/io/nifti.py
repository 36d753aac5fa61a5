"""NIfTI in and out: volumes reoriented to canonical RAS, masks written back in the input's
own grid, orientation and affine."""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import cast

import nibabel as nib
import numpy as np
from nibabel import orientations

from ubc.errors import UBCInputError

_gzip: ModuleType
_GZIP_ERRORS: tuple[type[Exception], ...] = (EOFError, zlib.error, gzip.BadGzipFile)
try:  # igzip (ISA-L) inflates .nii.gz twice as fast as zlib (bench/bench_preprocess.py)
    from isal import igzip as _gzip
    from isal import isal_zlib

    _GZIP_ERRORS += (cast("type[Exception]", isal_zlib.error),)
except ImportError:  # pragma: no cover - isal has wheels for every platform we ship to
    _gzip = gzip

GZIP_BACKEND = _gzip.__name__
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


@dataclass(frozen=True)
class Volume:
    """A 3-D scan in canonical (RAS) orientation.

    ``data`` keeps the on-disk dtype unless the header scales intensities (then float32); it
    may be a strided view (reorientation flips and transposes without copying).
    ``spacing`` is the voxel size (x, y, z) in mm; ``affine`` maps canonical voxel indices to
    world mm, ``original_affine`` and ``original_shape`` describe the file as stored.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    path: Path | None = None

    def to_original_orientation(self, array: np.ndarray) -> np.ndarray:
        """Map an array on this volume's canonical grid back to the file's own axes."""
        back = orientations.ornt_transform(_RAS, orientations.io_orientation(self.original_affine))
        return orientations.apply_orientation(array, back)


def _read_image(path: Path) -> nib.Nifti1Image:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = _gzip.decompress(raw)
    if len(raw) < 348:
        raise ValueError(f"{len(raw)} bytes is too short for a NIfTI header")
    header_sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    if not header_sizes & {348, 540}:
        raise ValueError("not a NIfTI file (bad header size field)")
    image_class = nib.Nifti2Image if 540 in header_sizes else nib.Nifti1Image
    return image_class.from_bytes(raw)


def _voxels(image: nib.Nifti1Image) -> np.ndarray:
    proxy = image.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if slope == 1 and inter == 0:
        return np.asanyarray(image.dataobj)  # on-disk dtype, no float64 blow-up
    return np.asarray(image.get_fdata(dtype=np.float32))


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


def load_volume(path: str | os.PathLike[str], volume_index: int | None = None) -> Volume:
    """Read a .nii or .nii.gz file as a canonical (RAS) ``Volume``.

    Any failure (missing file, corrupt or truncated gzip, not NIfTI, several volumes without
    ``volume_index``, empty) raises ``UBCInputError`` naming the file and the cause.
    """
    path = Path(path)
    try:
        image = _read_image(path)
        data = _as_3d(_voxels(image), volume_index)
    except UBCInputError:
        raise
    except FileNotFoundError as exc:
        raise UBCInputError(f"{path}: file not found") from exc
    except PermissionError as exc:
        raise UBCInputError(f"{path}: permission denied") from exc
    except _GZIP_ERRORS as exc:
        raise UBCInputError(f"{path}: corrupt or truncated gzip ({exc})") from exc
    except Exception as exc:  # nibabel raises many types on malformed headers
        raise UBCInputError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") \
            from exc
    original_affine = image.affine.astype(np.float64)
    ornt = orientations.io_orientation(original_affine)
    canonical = orientations.apply_orientation(data, ornt)
    affine = original_affine @ orientations.inv_ornt_aff(ornt, data.shape)
    zooms = image.header.get_zooms()[:3]
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        spacing[int(target)] = float(zooms[axis])
    return Volume(data=canonical, spacing=(spacing[0], spacing[1], spacing[2]), affine=affine,
                  original_affine=original_affine,
                  original_shape=(data.shape[0], data.shape[1], data.shape[2]), path=path)


def save_mask(mask: np.ndarray, volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write a mask on ``volume``'s canonical grid as NIfTI in the file's original grid,
    orientation and affine (uint8 for integer/bool masks, float32 otherwise); atomic."""
    if mask.shape != volume.data.shape:
        raise ValueError(f"mask shape {mask.shape} does not match volume {volume.data.shape}")
    dtype = np.float32 if mask.dtype.kind == "f" else np.uint8
    data = np.asarray(volume.to_original_orientation(mask), dtype=dtype)
    image = nib.Nifti1Image(data, volume.original_affine)
    image.header.set_xyzt_units("mm")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}" + "".join(path.suffixes))
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
