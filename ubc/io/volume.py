"""The volume every reader returns: voxels in canonical RAS orientation with their spacing,
and the affine and shape of the file (or series) as stored, to write masks back into."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from nibabel import orientations

__all__ = ["Volume", "canonical_volume", "orientation_of"]

_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
#: the voxel types preprocessing reads as they are (``csrc/bindings/module.cpp``)
NATIVE_DTYPES = frozenset(np.dtype(t) for t in
                          ("bool", "uint8", "int16", "uint16", "int32", "float32", "float64"))


def native_voxels(data: np.ndarray) -> np.ndarray:
    """``data`` itself when preprocessing reads its type, else converted to one it reads:
    int8 to int16 (exact), float16, uint32 and 64-bit integers to float32 (intensities are
    normalised per volume, so float32's 24-bit mantissa loses nothing that matters)."""
    if data.dtype.byteorder == ">":  # big-endian NRRD or ANALYZE: native order first
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype in NATIVE_DTYPES:
        return data
    if data.dtype.kind not in "iuf":
        raise TypeError(f"voxels of type {data.dtype} are not intensities")
    return data.astype(np.int16 if data.dtype == np.int8 else np.float32)


@dataclass(frozen=True)
class Volume:
    """A 3-D scan in canonical (RAS) orientation.

    ``data`` keeps the on-disk dtype unless the header scales intensities (then float32) or
    preprocessing does not read it (``native_voxels``: int8, uint32, ... are converted); it
    may be a strided view (reorientation flips and transposes without copying).
    ``spacing`` is the voxel size (x, y, z) in mm; ``affine`` maps canonical voxel indices to
    world mm, ``original_affine`` and ``original_shape`` describe the file as stored.
    ``source_frames`` (DICOM): the (instance file, frame in it) of each stored slice, what a
    DICOM SEG of this volume references.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    path: Path | None = None
    source_frames: tuple[tuple[Path, int], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", native_voxels(self.data))

    def header_only(self) -> Volume:
        """This volume with its voxels replaced by a zero-byte view of the same shape (what
        the steps after preprocessing need: the grid, never the voxels)."""
        empty = np.broadcast_to(np.zeros((), dtype=np.uint8), self.data.shape)
        return dataclasses.replace(self, data=empty)

    def stored_layout(self, dtype: npt.DTypeLike) -> np.ndarray:
        """A zeroed array laid out as the file stores its voxels (its own axes, Fortran
        order, as NIfTI and DICOM frames go), seen on this canonical grid: a view whose
        ``to_original_orientation`` is that array again, so that what is written through it
        (a mask) is saved without a reorienting copy."""
        stored = np.zeros(self.original_shape, dtype, order="F")
        return orientations.apply_orientation(
            stored, orientations.io_orientation(self.original_affine))

    def to_original_orientation(self, array: np.ndarray) -> np.ndarray:
        """Map an array on this volume's canonical grid back to the file's own axes."""
        back = orientations.ornt_transform(_RAS, orientations.io_orientation(self.original_affine))
        return orientations.apply_orientation(array, back)


def orientation_of(affine: np.ndarray) -> np.ndarray | None:
    """The orientation [3, 2] of a voxel -> world affine (``io_orientation``); None when it
    has none: not finite, singular, or two axes that point (nearly) the same way, which
    nibabel would refuse later with OrientationError."""
    if not np.isfinite(affine).all():
        return None
    det = float(np.linalg.det(affine[:3, :3]))
    if not math.isfinite(det) or det == 0:
        return None
    ornt = orientations.io_orientation(affine)
    return None if np.isnan(ornt).any() else ornt


def canonical_volume(data: np.ndarray, affine: np.ndarray, zooms: Sequence[float],
                     path: Path | None, *, ornt: np.ndarray | None = None) -> Volume:
    """``data`` [I, J, K] on the grid ``affine`` (voxel -> RAS world mm, voxel sizes
    ``zooms``) reoriented to canonical RAS with views (no copy); ``ornt``: the affine's
    ``io_orientation`` when already known."""
    if ornt is None:
        ornt = orientations.io_orientation(affine)
    canonical = orientations.apply_orientation(data, ornt)
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        spacing[int(target)] = float(zooms[axis])
    return Volume(data=canonical, spacing=(spacing[0], spacing[1], spacing[2]),
                  affine=affine @ orientations.inv_ornt_aff(ornt, data.shape),
                  original_affine=affine,
                  original_shape=(data.shape[0], data.shape[1], data.shape[2]), path=path)
