"""Volumes in and out, each read as a canonical RAS ``Volume``: NIfTI (``ubc.io.nifti``),
DICOM series (``ubc.io.dicom``, selection in ``ubc.io.dicom_select``, SEG out in
``ubc.io.dicom_seg``; pydicom/highdicom from the ``[dicom]`` extra, imported when used), and
the conformance checks run before scoring (``ubc.io.conformance``)."""

from __future__ import annotations

from ubc.io.conformance import Thresholds, check_volume
from ubc.io.dicom import is_dicom_file, load_series
from ubc.io.nifti import (
    GZIP_BACKEND,
    MAX_VOXELS,
    Volume,
    load_volume,
    load_volume_bytes,
    save_mask,
)

__all__ = ["GZIP_BACKEND", "MAX_VOXELS", "Volume", "load_volume", "load_volume_bytes",
           "save_mask", "is_dicom_file", "load_series", "Thresholds", "check_volume"]
