"""Hostile upload bodies for ``ubc-serve`` (issue 26), built in bounded memory: small files
that declare large volumes, and gzip streams that inflate past what their header declares.
Used by tests/test_serve_abuse.py and bench/abuse_serve.py."""

from __future__ import annotations

import zlib

import nibabel as nib
import numpy as np
from isal import isal_zlib

_STEP = 1 << 20


def declared_gz(shape: tuple[int, ...], dtype: str, inflated: int | None = None) -> bytes:
    """A .nii.gz whose header declares ``shape`` of ``dtype`` (unit voxels, identity
    affine), followed by ``inflated`` zero bytes of voxel data (default: exactly what the
    header declares). Zeros compress about 1000:1, so the issue's 1,043,713-byte file that
    declares 1024^3 uint8 is ``declared_gz((1024,) * 3, "uint8")``; an ``inflated`` past
    the declared size makes a gzip bomb."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.dtype(dtype))
    header.set_zooms((1.0,) * len(shape))
    header["vox_offset"] = 352
    left = int(np.prod(shape)) * np.dtype(dtype).itemsize if inflated is None else inflated
    stream = isal_zlib.compressobj(1, zlib.DEFLATED, 31)  # ISA-L: 1 GiB in a quarter second
    parts = [stream.compress(header.binaryblock + b"\0" * 4)]
    zeros = bytes(_STEP)
    while left > 0:
        parts.append(stream.compress(zeros[:min(left, _STEP)]))
        left -= _STEP
    parts.append(stream.flush())
    return b"".join(parts)
