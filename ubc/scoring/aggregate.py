"""From per-slice engine outputs to one verdict per case (the deployment rule of PAPER.md).

For every scored slice: its predicted lesion area (pixels with mask probability > 0.5, i.e.
mask logit > 0, times the model grid's pixel area in mm2) and its P(HGG) (softmax of the
class logits). Then, per case:
- the top-k slices by predicted area (k from the bundle unless overridden; slices with no
  predicted lesion are never used, so fewer than k may be), largest first;
- P(HGG) = the mean of their P(HGG); the predicted class is HGG when it is >= 0.5;
- lesion volume (mL) = sum of the areas (mm2) x the slice thickness (mm) / 1000;
- ``no_lesion`` when that volume is under ``min_lesion_ml`` (``DEFAULT_MIN_LESION_ML``): such
  a volume is reported as such, with no class forced on it.
Pixels of background (exactly 0 in the engine's input: outside the head, since
normalisation and resampling keep 0 as 0) cannot hold a lesion, whatever the mask head says,
for the same reason that background-only slices are not scored at all
(``lesion_pixels``). Areas are measured on the model grid (after in-plane
resampling and centre crop/pad), so a lesion outside the model's field of view is not
counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_MIN_LESION_ML", "Verdict", "CaseAccumulator", "lesion_pixels", "p_hgg_of",
           "top_slices", "decide"]

#: 0.1 mL = 100 voxels of 1 mm3: a lesion smaller than that is noise for this model.
DEFAULT_MIN_LESION_ML = 0.1


@dataclass(frozen=True)
class Verdict:
    """The aggregated scores of one case (before they become a ``CaseResult`` row)."""

    no_lesion: bool
    p_hgg: float | None
    predicted_class: str | None
    lesion_volume_ml: float
    slices_used: tuple[int, ...]


def lesion_pixels(mask_logits: np.ndarray, images: np.ndarray,
                  probs: np.ndarray | None = None,
                  image_halves: np.ndarray | None = None) -> np.ndarray:
    """The lesion pixels of each slice of engine outputs, int64 [n]: mask logits [n, 1, H, W]
    (or [n, H, W]) > 0 where the engine's input slices ``images`` [n, H, W] are not
    background. With ``probs`` (float16 [n, H, W], C-contiguous), also every pixel's lesion
    probability, written there: the sigmoid of its logit clamped to +-60, and of -60 on
    background. One pass of the native core, which computes the sigmoid in double precision
    and rounds it to float32 and then to float16: the same bits on every CPU (NumPy's
    float32 exp differs by CPU, by a few float32 ulps). With ``image_halves`` (float16
    [n, H, W], C-contiguous), also the images as float16 in the same pass (the bits of
    NumPy's ``astype(float16)``, which is a scalar loop: 30 ms for a 224 px volume)."""
    from ubc import _native

    image = np.ascontiguousarray(images, np.float32)
    logits = np.ascontiguousarray(mask_logits, np.float32).reshape(image.shape)
    counts = np.empty(len(image), np.int64)
    _native.lesion_pixels(logits, image, counts, None if probs is None else probs.view(np.uint16),
                          None if image_halves is None else image_halves.view(np.uint16))
    return counts


def p_hgg_of(class_logits: np.ndarray, hgg_index: int = 1) -> np.ndarray:
    """P(HGG) float64 [B]: the softmax of class logits [B, C] at ``hgg_index``."""
    logits = np.asarray(class_logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted[:, hgg_index] / shifted.sum(axis=1)


def top_slices(areas_mm2: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest non-zero areas, largest first (ties: lower index first):
    the slices a case's verdict reads, by predicted area at scoring and by the true lesion
    area in the paper's training protocol."""
    areas = np.asarray(areas_mm2)
    order = np.argsort(-areas, kind="stable")[:k]
    return order[areas[order] > 0]


def decide(p_hgg: np.ndarray, area_mm2: np.ndarray, slice_indices: np.ndarray, *,
           slice_thickness_mm: float, top_k: int, class_names: Sequence[str],
           hgg_index: int, min_lesion_ml: float = DEFAULT_MIN_LESION_ML) -> Verdict:
    """The case's verdict from its scored slices (``slice_indices``: their axial indices)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not np.isfinite(p_hgg).all():
        raise ValueError("the engine returned NaN or Inf class logits")
    volume_ml = float(area_mm2.sum()) * float(slice_thickness_mm) / 1000.0
    if volume_ml < min_lesion_ml or not (area_mm2 > 0).any():
        return Verdict(True, None, None, volume_ml, ())
    order = top_slices(area_mm2, top_k)
    p = float(p_hgg[order].mean())
    other = 1 - hgg_index if len(class_names) == 2 else hgg_index
    predicted = class_names[hgg_index] if p >= 0.5 else class_names[other]
    return Verdict(False, p, predicted, volume_ml,
                   tuple(int(i) for i in slice_indices[order]))


class CaseAccumulator:
    """Collects the engine outputs of one case's scored slices as batches come back.

    Keeps two floats per slice; with ``keep_masks`` also the mask probabilities (float16
    [S, H, W]) and with ``keep_images`` the input slices (float16), for masks and overlays.
    """

    def __init__(self, n_slices: int, size: tuple[int, int], *, keep_masks: bool = False,
                 keep_images: bool = False) -> None:
        self.n_slices = n_slices
        self.received = 0
        self.p_hgg = np.zeros(n_slices, dtype=np.float64)
        self.area_mm2 = np.zeros(n_slices, dtype=np.float64)
        shape = (n_slices, *size)
        # not zeroed: ``add`` writes every pixel of its slices
        self.mask_prob = np.empty(shape, np.float16) if keep_masks else None
        self.images = np.empty(shape, np.float16) if keep_images else None

    def add(self, start: int, p_hgg: np.ndarray, mask_logits: np.ndarray, images: np.ndarray,
            *, pixel_area_mm2: float) -> None:
        """Record slices ``start .. start + len(p_hgg)`` of this case: their P(HGG), their
        lesion areas in mm2 (``lesion_pixels`` of their mask logits [n, 1, H, W] over the
        engine's input slices ``images`` [n, H, W], times ``pixel_area_mm2``), and what
        ``keep_masks`` and ``keep_images`` keep."""
        stop = start + len(p_hgg)
        if stop > self.n_slices:
            raise ValueError(f"slices {start}:{stop} past the case's {self.n_slices}")
        probs = None if self.mask_prob is None else self.mask_prob[start:stop]
        halves = None if self.images is None else self.images[start:stop]
        pixels = lesion_pixels(mask_logits, images, probs, halves)
        self.p_hgg[start:stop] = p_hgg
        self.area_mm2[start:stop] = pixels * float(pixel_area_mm2)
        self.received += len(p_hgg)

    @property
    def complete(self) -> bool:
        return self.received == self.n_slices
