"""Is this volume what the model was trained on? Checks that cost milliseconds, run on every
volume before it is scored, and the one check on the model's output.

The model expects a skull-stripped axial FLAIR near its training spacing with background
exactly 0 (as BraTS). Every threshold is a field of ``Thresholds`` (the one place they
live); what each check does with a volume:

- non-finite voxels (SPM and resamplers write NaN outside the field of view): those
  connected to the volume's border along a row, column or slice line are outside the head
  and become 0, flagged ``nonfinite_background:N``; any other NaN/Inf is inside the head and
  the volume is refused (a corrupt scan). The line rule is conservative: a pocket reachable
  only by a bent path counts as inside.
- background: the dominant value of the volume's six faces must cover at least
  ``background_share`` of them, else there is no uniform background around the head (a raw,
  not skull-stripped scan with noise outside the head): refused with the fix. A dominant
  value other than 0 (z-scored or shifted intensities) is handled when at most
  ``below_background_share`` of the voxels lie below it: voxels at or below it become 0 and
  the rest are shifted by it (the zscore and percentile normalisations are shift-invariant)
  and flagged ``background_shifted:B``; otherwise refused (background and brain cannot be told
  apart). Every voxel is never taken as brain.
- skull: a non-zero volume above ``max_brain_ml`` is a head, not a brain (brain masks are
  1.0-1.8 L: 1,639 mL and 1,246 mL on the two real volumes; a head in a clinical FLAIR's
  field of view is 3 L or more): refused, run brain extraction first. A raw scan whose
  background is noise is refused by the background check already. A partial-coverage head
  scan under the limit with an exactly-zero background is not caught.
- spacing, against the training volumes' spacing range that ``ubc-train`` records in the
  bundle (``TrainedSpacing``): in-plane pixels as the model sees them, after resampling to
  its grid (``max(spacing, grid)``: finer inputs are downsampled by the anti-aliased
  resampler and look like the training slices), more than ``spacing_ratio`` times coarser
  or finer than the training slices did; slices more than ``thickness_ratio`` times thicker
  than the thickest training slices or thinner than the thinnest (slices are not
  resampled). A bundle without the record (older than it) is checked against its grid
  (``spacing_ratio`` either way) and ``thick_slice_mm`` (BraTS's 1 mm slices).
- orientation: an acquisition whose slices are not axial (the stored slice axis is
  sagittal or coronal) or oblique beyond ``oblique_deg``. Spacing and orientation give
  flags with the numbers; the volume is still scored.
- output (``check_output``): a predicted lesion larger than ``max_lesion_share`` of the
  brain (foreground) volume is implausible: flagged and the row is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ubc.errors import UBCInputError
from ubc.io.volume import Volume

__all__ = ["SKULL_FIX", "Thresholds", "TrainedSpacing", "Conformance", "check_volume",
           "check_output"]

SKULL_FIX = "run brain extraction first (e.g. HD-BET or SynthStrip)"


@dataclass(frozen=True)
class Thresholds:
    """Every conformance threshold (see the module docstring for what each does)."""

    background_share: float = 0.5  # of the border voxels holding the dominant value
    below_background_share: float = 0.001  # of all voxels allowed below a shifted background
    max_brain_ml: float = 2200.0  # non-zero volume above this is a head, not a brain
    spacing_ratio: float = 1.5  # in-plane pixels as seen vs as trained, either way
    thickness_ratio: float = 1.5  # slice thickness vs the training range, either way
    thick_slice_mm: float = 3.0  # slices thicker than this: flagged (bundles without a range)
    oblique_deg: float = 10.0  # slice normal off its nearest axis by more: flagged
    max_lesion_share: float = 0.5  # predicted lesion / brain volume; above: implausible


@dataclass(frozen=True)
class TrainedSpacing:
    """The spacing range (min, max) in mm of the volumes a model was trained on, canonical
    RAS: ``inplane`` over x and y, ``thickness`` along z (``ubc.provenance``)."""

    inplane: tuple[float, float]
    thickness: tuple[float, float]


@dataclass(frozen=True)
class Conformance:
    """The volume to score (``data`` replaced when non-finite voxels or a shifted
    background were handled), the flags raised and its brain (non-zero) volume in mL."""

    volume: Volume
    flags: tuple[str, ...]
    brain_ml: float


def _faces(data: np.ndarray) -> list[np.ndarray]:
    return [data[0], data[-1], data[:, 0], data[:, -1], data[:, :, 0], data[:, :, -1]]


def _border_connected(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` joined to a face of the volume by a straight run of ``mask``
    voxels along an axis (six sweeps)."""
    reached = np.zeros_like(mask)
    for axis in range(3):
        forward = np.logical_and.accumulate(mask, axis=axis)
        backward = np.flip(np.logical_and.accumulate(np.flip(mask, axis), axis=axis), axis)
        reached |= forward | backward
    return reached


def _non_finite(data: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
    if data.dtype.kind != "f":
        return data, []
    bad = ~np.isfinite(data)
    n = int(bad.sum())
    if n == 0:
        return data, []
    inside = int((bad & ~_border_connected(bad)).sum())
    if inside:
        raise UBCInputError(f"{name}: {inside} NaN/Inf voxels inside the head (not connected "
                            f"to the volume's border; {n} in all): the scan is corrupt")
    return np.where(bad, np.float32(0), data).astype(np.float32, copy=False), \
        [f"nonfinite_background:{n}"]


def _dominant(parts: list[np.ndarray]) -> tuple[float, float]:
    """(most frequent value, its share of the values of ``parts``). Zero held by more than
    half of them (the usual background) is that value without gathering and sorting them."""
    size = sum(part.size for part in parts)
    zeros = size - sum(np.count_nonzero(part) for part in parts)
    if 2 * zeros > size:
        return 0.0, zeros / size
    values = np.concatenate([part.ravel() for part in parts])
    unique, counts = np.unique(values, return_counts=True)
    best = int(np.argmax(counts))
    return float(unique[best]), float(counts[best]) / float(values.size)


def _background(data: np.ndarray, name: str, t: Thresholds) -> tuple[np.ndarray, list[str]]:
    value, share = _dominant(_faces(data))
    if share < t.background_share:
        raise UBCInputError(f"{name}: no uniform background around the head (the most common "
                            f"border value {value:g} covers {share:.0%} of the border, needs "
                            f"{t.background_share:.0%}): not skull-stripped? {SKULL_FIX}")
    if value == 0:
        return data, []
    below = float(np.count_nonzero(data < value)) / data.size
    if below > t.below_background_share:
        raise UBCInputError(f"{name}: the background is {value:g}, not 0, and {below:.1%} of "
                            "the voxels lie below it: background and brain cannot be told "
                            "apart; give intensities with background 0 (as BraTS)")
    shifted = np.asarray(data, dtype=np.float32) - np.float32(value)
    shifted = np.where(shifted <= 0, np.float32(0), shifted)
    if not shifted.any():
        raise UBCInputError(f"{name}: constant volume (every voxel is {value:g})")
    return shifted, [f"background_shifted:{value:g}"]


def _brain_ml(data: np.ndarray, spacing: tuple[float, float, float],
              foreground: Callable[[np.ndarray], int]) -> float:
    """Foreground (non-zero) volume in mL."""
    return float(foreground(data)) * spacing[0] * spacing[1] * spacing[2] / 1000.0


def _mm(low: float, high: float) -> str:
    """``1mm`` or ``0.9-1.2mm``."""
    return f"{low:.3g}mm" if f"{low:.3g}" == f"{high:.3g}" else f"{low:.3g}-{high:.3g}mm"


def _grid_spacing_flags(spacing: tuple[float, float, float], grid: tuple[float, float],
                        t: Thresholds) -> list[str]:
    """The checks of a bundle that does not record its training spacing."""
    (sx, sy, sz), (tx, ty) = spacing, grid
    flags = []
    if max(sx / tx, tx / sx, sy / ty, ty / sy) > t.spacing_ratio:
        flags.append(f"inplane_spacing:{sx:.3g}x{sy:.3g}mm (trained {tx:g}x{ty:g}mm)")
    if sz > t.thick_slice_mm:
        flags.append(f"thick_slices:{sz:.3g}mm (trained 1mm)")
    return flags


def _trained_spacing_flags(spacing: tuple[float, float, float], grid: tuple[float, float],
                           trained: TrainedSpacing, t: Thresholds) -> list[str]:
    sx, sy, sz = spacing
    low, high = trained.inplane
    flags = []
    for size, cell in ((sx, grid[0]), (sy, grid[1])):
        seen = max(size, cell)  # finer pixels are averaged down to the grid
        if seen > max(high, cell) * t.spacing_ratio or seen < max(low, cell) / t.spacing_ratio:
            flags.append(f"inplane_spacing:{sx:.3g}x{sy:.3g}mm (trained {_mm(low, high)})")
            break
    low, high = trained.thickness
    if sz > high * t.thickness_ratio:
        flags.append(f"thick_slices:{sz:.3g}mm (trained {_mm(low, high)})")
    elif sz < low / t.thickness_ratio:
        flags.append(f"thin_slices:{sz:.3g}mm (trained {_mm(low, high)})")
    return flags


def _orientation_flags(volume: Volume, t: Thresholds) -> list[str]:
    flags = []
    normal = np.asarray(volume.original_affine[:3, 2], dtype=np.float64)
    normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
    axis = int(np.argmax(np.abs(normal)))
    if axis != 2:
        flags.append(f"non_axial:{('sagittal', 'coronal')[axis]} slices")
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[axis])))))
    if angle > t.oblique_deg:
        flags.append(f"oblique:{angle:.0f}deg")
    return flags


def check_volume(volume: Volume, *, target_spacing: tuple[float, float] = (1.0, 1.0),
                 name: str | None = None, thresholds: Thresholds | None = None,
                 trained: TrainedSpacing | None = None,
                 foreground: Callable[[np.ndarray], int] = np.count_nonzero) -> Conformance:
    """Run the input checks on ``volume`` (see the module docstring); ``target_spacing``:
    the bundle's in-plane grid (mm); ``trained``: the spacing range of its training volumes
    (None: a bundle that does not record it); ``foreground``: counts the non-zero voxels of
    the data checked (scoring passes one that keeps the per-slice counts it needs next, so
    that the volume is counted once). Refusals raise ``UBCInputError`` naming ``name``
    (default: the volume's path) with the reason and the fix."""
    t = thresholds or Thresholds()
    name = name or str(volume.path or "<volume>")
    data, flags = _non_finite(volume.data, name)
    data, shifted = _background(data, name, t)
    flags += shifted
    brain_ml = _brain_ml(data, volume.spacing, foreground)
    if brain_ml > t.max_brain_ml:
        raise UBCInputError(f"{name}: {brain_ml:.0f} mL of non-zero voxels is more than any "
                            f"brain ({t.max_brain_ml:g} mL): the skull and scalp are probably "
                            f"still there; {SKULL_FIX}")
    flags += _grid_spacing_flags(volume.spacing, target_spacing, t) if trained is None \
        else _trained_spacing_flags(volume.spacing, target_spacing, trained, t)
    flags += _orientation_flags(volume, t)
    if data is not volume.data:
        volume = replace(volume, data=data)
    return Conformance(volume, tuple(flags), brain_ml)


def check_output(lesion_ml: float, brain_ml: float,
                 thresholds: Thresholds | None = None) -> str | None:
    """The implausibility flag for a predicted lesion of ``lesion_ml`` in a brain
    (foreground) of ``brain_ml`` mL, or None when plausible."""
    t = thresholds or Thresholds()
    if brain_ml > 0 and lesion_ml > t.max_lesion_share * brain_ml:
        return f"implausible_lesion:{lesion_ml:.0f}mL is {lesion_ml / brain_ml:.0%} of the " \
               f"{brain_ml:.0f}mL brain (limit {t.max_lesion_share:.0%})"
    return None

