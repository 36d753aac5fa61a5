"""Slice extraction and normalisation, in native code (``ubc._native``).

Conventions (shared with ``ubc.preprocess_reference``, the NumPy oracle):
- The volume is in canonical RAS orientation, axes (x, y, z), z axial; ``spacing`` in mm.
- Along each in-plane axis, output pixel ``o`` samples input index
  ``(o - (m - 1) / 2) * t / s + (n - 1) / 2`` (n, s: input pixels and spacing; m, t: output):
  slice centre -> output centre, pixel centres at integer indices, zero outside the slice.
  Output H follows x, W follows y. Upsampling is bilinear; downsampling (target spacing coarser
  than the source) integrates over the output pixel's footprint (antialiased bilinear: a
  triangle of half-width t / s input pixels), so it never decimates.
- Normalisation uses statistics of the whole volume's foreground (non-zero voxels), computed
  once in double precision; background voxels stay exactly 0. Intensities are normalised
  first, then resampled, so a linear ramp stays linear.
- NaN or Inf voxels are rejected (ValueError): a scan with them is corrupt, and treating them
  as background would hide that.
- Output sizes must be multiples of 32 (the U-Net's five down-samplings; exported graphs do
  not check it).
Work is split over slices on ``threads`` threads (0 = all cores) with the GIL released; the
result is bit-identical for any thread count (so ``to_original`` refuses a slice index that
appears twice: two threads would write the same slice).

Limits of the native core (ValueError beyond them; every MRI is far inside): at most 65,536
voxels per axis, 2**24 per axial slice, 2**30 per volume; output and model-grid sides at most
4096; ``target_spacing / spacing`` within [1/1000, 1000]. An ``out`` buffer is refused
(ValueError), never converted, unless it is exactly what is written: writeable, aligned,
C-contiguous, of the documented dtype in native byte order and of the right shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import ubc._native as _native

__all__ = ["NORMS", "slices", "mask_slices", "lesion_areas", "to_original", "foreground_counts"]

NORMS = ("zscore", "percentile", "none")


def _indices(slice_indices: Sequence[int] | np.ndarray | None, n_slices: int) -> np.ndarray:
    if slice_indices is None:
        return np.arange(n_slices, dtype=np.int64)
    flat = np.asarray(slice_indices, dtype=np.int64).reshape(-1)
    return np.require(flat, requirements=["C", "A"])  # the core reads int64 through a pointer


def _checked_volume(volume: np.ndarray) -> np.ndarray:
    """The volume itself (no copy) unless its byte order is not native (NIfTI files may be
    big-endian) or it is misaligned (a view at an odd byte offset of a buffer): then a native,
    aligned copy, since the native code reads native numbers through typed pointers only."""
    if not isinstance(volume, np.ndarray):
        raise TypeError(f"volume must be a numpy array, got {type(volume).__name__}")
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (x, y, z), got shape {volume.shape}")
    if not volume.dtype.isnative or not volume.flags.aligned:
        return volume.astype(volume.dtype.newbyteorder("="))
    return volume


def _entries(values: Sequence[float], n: int, what: str) -> tuple[float, ...]:
    """``values`` as a tuple of ``n`` numbers; ValueError naming ``what`` otherwise."""
    entries = tuple(np.asarray(values, dtype=np.float64).reshape(-1))
    if len(entries) != n:
        raise ValueError(f"{what} must have {n} entries, got {values!r}")
    return entries


def _output(out: np.ndarray | None, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A new buffer, or the caller's ``out`` as it is: the binding checks it and refuses
    (ValueError) anything it would have to convert, since a converted copy would take the
    result and leave ``out`` unchanged."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    return out


def slices(volume: np.ndarray, spacing: Sequence[float], *, size: Sequence[int] = (224, 224),
           target_spacing: Sequence[float] = (1.0, 1.0), norm: str = "zscore",
           slice_indices: Sequence[int] | np.ndarray | None = None, threads: int = 0,
           out: np.ndarray | None = None) -> np.ndarray:
    """float32 [S, 1, H, W]: every axial slice (or ``slice_indices``), normalised per volume
    (``norm``: zscore | percentile | none), resampled in-plane to ``target_spacing`` mm
    (bilinear; antialiased when downsampling), centre-cropped/padded to ``size`` = (H, W).
    ``out`` reuses a buffer."""
    volume = _checked_volume(volume)
    indices = _indices(slice_indices, volume.shape[2])
    result = _output(out, (len(indices), 1, int(size[0]), int(size[1])), np.float32)
    _native.slices(volume, _entries(spacing, 3, "spacing (x, y, z) in mm"), tuple(size),
                   _entries(target_spacing, 2, "target_spacing (H, W) in mm"), norm, indices,
                   threads, result)
    return result


def mask_slices(labels: np.ndarray, spacing: Sequence[float], *,
                size: Sequence[int] = (224, 224), target_spacing: Sequence[float] = (1.0, 1.0),
                slice_indices: Sequence[int] | np.ndarray | None = None, threads: int = 0,
                out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [S, 1, H, W]: binary lesion mask (union of labels > 0), same geometry as
    ``slices``, resampled by nearest neighbour (ties round up)."""
    labels = _checked_volume(labels)
    indices = _indices(slice_indices, labels.shape[2])
    result = _output(out, (len(indices), 1, int(size[0]), int(size[1])), np.uint8)
    _native.mask_slices(labels, _entries(spacing, 3, "spacing (x, y, z) in mm"), tuple(size),
                        _entries(target_spacing, 2, "target_spacing (H, W) in mm"), indices,
                        threads, result)
    return result


def lesion_areas(labels: np.ndarray, spacing: Sequence[float], *,
                 slice_indices: Sequence[int] | np.ndarray | None = None,
                 threads: int = 0) -> np.ndarray:
    """float64 [S]: lesion area (labels > 0) of each axial slice in mm2, original grid."""
    labels = _checked_volume(labels)
    indices = _indices(slice_indices, labels.shape[2])
    result = np.empty(len(indices), dtype=np.float64)
    _native.lesion_areas(labels, _entries(spacing, 3, "spacing (x, y, z) in mm"), indices,
                         threads, result)
    return result


def foreground_counts(volume: np.ndarray, *, threads: int = 0) -> np.ndarray:
    """int64 [Z]: number of non-zero voxels in each axial slice (0 = background only)."""
    volume = _checked_volume(volume)
    result = np.empty(volume.shape[2], dtype=np.int64)
    _native.foreground_counts(volume, threads, result)
    return result


def to_original(values: np.ndarray, original_shape: Sequence[int], spacing: Sequence[float], *,
                target_spacing: Sequence[float] = (1.0, 1.0),
                slice_indices: Sequence[int] | np.ndarray | None = None,
                threads: int = 0, threshold: float | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """float32 array of ``original_shape`` (x, y, z), Fortran order: model-grid slices
    ``values`` [S, H, W] (or [S, 1, H, W]) mapped back onto the original in-plane grid
    (the inverse of ``slices``' geometry, resampled as ``slices`` does). Slices not in
    ``slice_indices`` are 0; each index may appear once (ValueError otherwise).

    ``threshold`` (> 0): a binary mask instead, uint8, 1 where the mapped value is above it:
    the voxels of ``to_original(...) > threshold`` without the float volume (4x the memory
    traffic), resampling only around the values that reach it; float16 ``values`` (the mask
    probabilities scoring keeps) are read as they are, without a float32 copy; ``out``: the
    zeroed uint8 array of ``original_shape`` (any strides) to write it into."""
    values = np.asarray(values)
    if values.ndim == 4 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 3:
        raise ValueError(f"values must be [S, H, W] or [S, 1, H, W], got shape {values.shape}")
    shape = tuple(int(n) for n in original_shape)
    if len(shape) != 3:
        raise ValueError(f"original_shape must have 3 entries (x, y, z), got {shape}")
    indices = _indices(slice_indices, shape[2])
    if len(indices) != values.shape[0]:
        raise ValueError(f"{values.shape[0]} slices given for {len(indices)} slice indices")
    geometry = (_entries(spacing, 3, "spacing (x, y, z) in mm"),
                _entries(target_spacing, 2, "target_spacing (H, W) in mm"), indices)
    if threshold is not None:
        mask = np.zeros(shape, dtype=np.uint8, order="F") if out is None else out
        half = values.dtype == np.float16  # read as such (bits), not converted here
        _native.to_original_mask(np.require(values, None, ["C", "A"]).view(np.uint16) if half
                                 else np.require(values, np.float32, ["C", "A"]),
                                 *geometry, threshold, threads, mask)
        return mask
    result = np.zeros(shape, dtype=np.float32, order="F")
    _native.to_original(np.require(values, np.float32, ["C", "A"]), *geometry, threads, result)
    return result
