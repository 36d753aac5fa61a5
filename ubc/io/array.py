"""A volume from an array and its affine, held in memory (``Predictor``, ``Scorer``): the
same refusals as a NIfTI file's header and voxels get, without a round trip through NIfTI
bytes."""

from __future__ import annotations

import numpy as np

from ubc.errors import UBCInputError
from ubc.io.nifti import MAX_VOXELS, PIXDIM_RANGE, _as_3d
from ubc.io.volume import Volume, canonical_volume, orientation_of

__all__ = ["volume_from_array"]


def _checked_affine(affine: np.ndarray, name: str) -> np.ndarray:
    """The affine's orientation; refused when not finite or singular."""
    if not np.isfinite(affine).all():
        raise UBCInputError(f"{name}: the affine is not finite: {affine[:3].tolist()}")
    ornt = orientation_of(affine)
    if ornt is None:
        raise UBCInputError(f"{name}: the affine is singular (zero spacing or collinear "
                            f"axes): {affine[:3].tolist()}")
    return ornt


def volume_from_array(array: np.ndarray, affine: np.ndarray, *, name: str,
                      max_voxels: int = MAX_VOXELS) -> Volume:
    """``array`` [I, J, K] (trailing axes of size 1 allowed) on the grid of ``affine``
    (4 x 4, voxel -> world mm) as a canonical RAS ``Volume`` (views, no copy). Refused with
    ``UBCInputError`` naming ``name``: a dtype other than integers and floats, more than
    ``max_voxels`` voxels, not 3-D or empty, an affine that is not finite or singular, or
    voxel sizes outside ``ubc.io.nifti.PIXDIM_RANGE``."""
    array, affine = np.asarray(array), np.asarray(affine, dtype=np.float64)
    if array.dtype.kind not in "iuf" or array.dtype.itemsize > 8:
        raise UBCInputError(f"{name}: cannot score an array of dtype {array.dtype} (integers "
                            "or floats of at most 64 bits)")
    if array.size > max_voxels:
        raise UBCInputError(f"{name}: {array.size:,} voxels is over the limit of "
                            f"{max_voxels:,}")
    try:
        data = _as_3d(array, None)
    except ValueError as exc:
        raise UBCInputError(f"{name}: {exc}") from exc
    ornt = _checked_affine(affine, name)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    low, high = PIXDIM_RANGE
    if not ((zooms >= low) & (zooms <= high)).all():
        raise UBCInputError(f"{name}: voxel sizes {zooms.tolist()} from the affine are not "
                            f"between {low:g} and {high:g}")
    return canonical_volume(data, affine, zooms.tolist(), None, ornt=ornt)
