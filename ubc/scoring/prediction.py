"""``Prediction``: what ``Predictor.predict`` returns for one volume, in memory: the
case's verdict (the columns of a results-file row), its per-slice scores and its lesion
mask in the input's own grid, orientation and affine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ubc.io.nifti import encode_mask
from ubc.scoring.result import ERROR, CaseResult

__all__ = ["Prediction"]


@dataclass(frozen=True, eq=False)
class Prediction:
    """The scores of one volume.

    - ``result``: its results-file row (``CaseResult``; ``to_row`` gives its columns);
      ``status`` is ``ok`` or ``no_lesion`` (bad input raises instead, see ``Predictor``),
      and ``p_hgg``, ``predicted_class``, ``lesion_volume_ml``, ``slices_*``, ``flags``
      are the row's.
    - ``slice_indices`` int64 [S]: the axial indices (canonical RAS) of the scored slices
      (those holding any foreground), with their predicted lesion area ``slice_area_mm2``
      (float64 [S], mm2 on the model grid) and P(HGG) ``slice_p_hgg`` (float64 [S]).
    - ``mask`` uint8 [X, Y, Z] (0/1) in the input file's own grid and axis order, with
      ``affine`` (4 x 4, voxel -> world mm) its affine; None when not asked for.
    """

    result: CaseResult
    slice_indices: np.ndarray
    slice_area_mm2: np.ndarray
    slice_p_hgg: np.ndarray
    mask: np.ndarray | None
    affine: np.ndarray

    def __post_init__(self) -> None:
        if self.result.status == ERROR:
            raise ValueError(f"{self.result.case_id}: an error row has no prediction")

    @property
    def case_id(self) -> str:
        """The row's case id."""
        return self.result.case_id

    @property
    def status(self) -> str:
        """``ok`` or ``no_lesion``."""
        return self.result.status

    @property
    def p_hgg(self) -> float | None:
        """Mean P(HGG) of the slices used (None for no_lesion)."""
        return self.result.p_hgg

    @property
    def predicted_class(self) -> str | None:
        """HGG or LGG (None for no_lesion)."""
        return self.result.predicted_class

    @property
    def lesion_volume_ml(self) -> float | None:
        """Predicted lesion volume, mL."""
        return self.result.lesion_volume_ml

    @property
    def slices_total(self) -> int | None:
        """Axial slices of the volume."""
        return self.result.slices_total

    @property
    def slices_scored(self) -> int | None:
        """Slices holding foreground, sent to the engine."""
        return self.result.slices_scored

    @property
    def slices_used(self) -> tuple[int, ...]:
        """The top-k slices by predicted area, largest first."""
        return self.result.slices_used

    @property
    def flags(self) -> str | None:
        """Conformance notes, ``;``-separated (None: nothing to say)."""
        return self.result.flags

    def to_row(self) -> dict[str, Any]:
        """The results file's columns as plain values (``CaseResult.to_row``)."""
        return self.result.to_row()

    def slice_scores(self) -> dict[str, list[Any]]:
        """Per-slice scores as plain lists: ``index``, ``lesion_area_mm2``, ``p_hgg``."""
        return {"index": [int(i) for i in self.slice_indices],
                "lesion_area_mm2": [float(a) for a in self.slice_area_mm2],
                "p_hgg": [float(p) for p in self.slice_p_hgg]}

    def mask_nifti(self, *, compress: bool = True) -> bytes:
        """The mask as the bytes of a NIfTI-1 file (.nii.gz unless ``compress`` is False),
        uint8, in the input's grid with its affine (``ubc.io.nifti.encode_mask``, which
        ``ubc.io.save_mask`` writes too)."""
        if self.mask is None:
            raise ValueError(f"{self.case_id}: predicted without a mask (mask=False)")
        return encode_mask(self.mask, self.affine, compress=compress)
