"""A readable NumPy reference of ``ubc.preprocess``: the oracle for tests, the baseline for
benchmarks. It is not used at run time. Same signatures and conventions as the native code.

Geometry (pixel centres): along an in-plane axis with ``n`` input pixels of spacing ``s`` and
``m`` output pixels of spacing ``t``, output pixel ``o`` samples the input at continuous index
``(o - (m - 1) / 2) * t / s + (n - 1) / 2``: the centre of the slice maps to the centre of the
output, pixel centres sit at integer indices, and samples outside the slice read 0.
Output axis H follows the volume's x axis, W its y axis (no transpose).

Resampling: upsampling (``t <= s``) is bilinear. Downsampling (``t > s``) integrates over the
output pixel's footprint: a triangle of half-width ``t / s`` input pixels around the source
coordinate (antialiased bilinear, as Pillow's resize and ``torch.nn.functional.interpolate(...,
antialias=True)``), normalised to sum 1 over every integer position with pixels outside the
slice counting as 0. So downsampling never decimates (1 mm -> 3 mm is not "every third voxel").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NORMS = ("zscore", "percentile", "none")


def source_coords(n_out: int, n_in: int, spacing_in: float, spacing_out: float) -> np.ndarray:
    """Continuous input index sampled by each output pixel (the pixel-centre convention)."""
    return (np.arange(n_out) - (n_out - 1) * 0.5) * (spacing_out / spacing_in) + (n_in - 1) * 0.5


def _foreground_stats(volume: np.ndarray, norm: str) -> tuple[float, float]:
    """(offset, scale) such that a foreground voxel v maps to (v - offset) * scale."""
    foreground = volume[volume != 0].astype(np.float64)
    if norm == "none":
        return 0.0, 1.0
    if foreground.size == 0:
        raise ValueError("volume has no foreground (every voxel is 0)")
    if norm == "zscore":
        std = foreground.std()
        if std == 0:
            raise ValueError("volume foreground is constant (std = 0)")
        return float(foreground.mean()), float(1.0 / std)
    lo, hi = np.percentile(foreground, [0.5, 99.5])
    if hi <= lo:
        raise ValueError("volume foreground is constant (0.5 and 99.5 percentiles are equal)")
    return float(lo), float(1.0 / (hi - lo))


def normalise(volume: np.ndarray, norm: str = "zscore") -> np.ndarray:
    """Per-volume intensity normalisation over the foreground (non-zero voxels); 0 stays 0."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():
        raise ValueError("volume contains NaN or Inf voxels")
    offset, scale = _foreground_stats(volume, norm)
    values = (volume.astype(np.float64) - offset) * scale
    if norm == "percentile":
        values = np.clip(values, 0.0, 1.0)
    return np.where(volume != 0, values, 0.0)


def _bilinear_weights(coords: np.ndarray, n_in: int) -> np.ndarray:
    """[n_out, n_in] matrix applying linear interpolation with zero outside the input."""
    weights = np.zeros((len(coords), n_in))
    lower = np.floor(coords).astype(np.int64)
    frac = coords - lower
    for i, (j, f) in enumerate(zip(lower, frac, strict=True)):
        if 0 <= j < n_in:
            weights[i, j] += 1.0 - f
        if 0 <= j + 1 < n_in:
            weights[i, j + 1] += f
    return weights


def _footprint_weights(coords: np.ndarray, n_in: int, ratio: float) -> np.ndarray:
    """[n_out, n_in] matrix of the downsampling kernel (``ratio`` > 1 input pixels per output
    pixel): a triangle of half-width ``ratio``, normalised over all integer positions."""
    weights = np.zeros((len(coords), n_in))
    for i, centre in enumerate(coords):
        j = np.arange(np.ceil(centre - ratio), np.floor(centre + ratio) + 1)
        w = 1.0 - np.abs(j - centre) / ratio
        inside = (j >= 0) & (j < n_in)
        weights[i, j[inside].astype(np.int64)] = w[inside] / w.sum()
    return weights


def resampling_weights(n_out: int, n_in: int, spacing_in: float, spacing_out: float) -> np.ndarray:
    """[n_out, n_in] matrix resampling one axis: bilinear, or the footprint kernel when the
    output spacing is coarser than the input's."""
    coords = source_coords(n_out, n_in, spacing_in, spacing_out)
    ratio = spacing_out / spacing_in
    if ratio <= 1:
        return _bilinear_weights(coords, n_in)
    return _footprint_weights(coords, n_in, ratio)


def _indices(n_slices: int, slice_indices: Sequence[int] | None) -> np.ndarray:
    return np.arange(n_slices) if slice_indices is None else np.asarray(slice_indices)


def slices(volume: np.ndarray, spacing: Sequence[float], *, size: Sequence[int] = (224, 224),
           target_spacing: Sequence[float] = (1.0, 1.0), norm: str = "zscore",
           slice_indices: Sequence[int] | None = None) -> np.ndarray:
    """float32 [S, 1, H, W]: normalised axial slices resampled (bilinear, or over the output
    pixel's footprint when downsampling) and centre-cropped."""
    normalised = normalise(np.asarray(volume), norm)
    nx, ny, nz = normalised.shape
    wx = resampling_weights(size[0], nx, spacing[0], target_spacing[0])
    wy = resampling_weights(size[1], ny, spacing[1], target_spacing[1])
    out = [wx @ normalised[:, :, k] @ wy.T for k in _indices(nz, slice_indices)]
    return np.stack(out)[:, None].astype(np.float32)


def mask_slices(labels: np.ndarray, spacing: Sequence[float], *,
                size: Sequence[int] = (224, 224), target_spacing: Sequence[float] = (1.0, 1.0),
                slice_indices: Sequence[int] | None = None) -> np.ndarray:
    """uint8 [S, 1, H, W]: union of labels > 0, resampled by nearest neighbour."""
    nx, ny, nz = labels.shape
    ix = np.floor(source_coords(size[0], nx, spacing[0], target_spacing[0]) + 0.5).astype(int)
    iy = np.floor(source_coords(size[1], ny, spacing[1], target_spacing[1]) + 0.5).astype(int)
    vx, vy = (ix >= 0) & (ix < nx), (iy >= 0) & (iy < ny)
    out = np.zeros((len(_indices(nz, slice_indices)), 1, size[0], size[1]), np.uint8)
    for s, k in enumerate(_indices(nz, slice_indices)):
        binary = labels[:, :, k] > 0
        out[s, 0][np.ix_(vx, vy)] = binary[np.ix_(ix[vx], iy[vy])]
    return out


def lesion_areas(labels: np.ndarray, spacing: Sequence[float], *,
                 slice_indices: Sequence[int] | None = None) -> np.ndarray:
    """float64 [S]: lesion area (labels > 0) per axial slice in mm2, on the original grid."""
    counts = np.count_nonzero(labels > 0, axis=(0, 1))
    return counts[_indices(labels.shape[2], slice_indices)] * float(spacing[0] * spacing[1])


def to_original(values: np.ndarray, original_shape: Sequence[int], spacing: Sequence[float], *,
                target_spacing: Sequence[float] = (1.0, 1.0),
                slice_indices: Sequence[int] | None = None) -> np.ndarray:
    """float32 volume of ``original_shape``: [S, H, W] slices mapped back (as ``slices``
    resamples) onto the original in-plane grid; slices not in ``slice_indices`` are 0."""
    nx, ny, nz = original_shape
    h, w = values.shape[1:]
    wx = resampling_weights(nx, h, target_spacing[0], spacing[0])
    wy = resampling_weights(ny, w, target_spacing[1], spacing[1])
    out = np.zeros(tuple(original_shape), np.float32)
    for s, k in enumerate(_indices(nz, slice_indices)):
        out[:, :, k] = wx @ values[s].astype(np.float64) @ wy.T
    return out
