"""Volumes in and out: NIfTI (``ubc.io.nifti``), each read as a canonical RAS ``Volume``."""

from __future__ import annotations

from ubc.io.nifti import (
    GZIP_BACKEND,
    MAX_VOXELS,
    Volume,
    load_volume,
    load_volume_bytes,
    save_mask,
)

__all__ = ["GZIP_BACKEND", "MAX_VOXELS", "Volume", "load_volume", "load_volume_bytes",
           "save_mask"]
