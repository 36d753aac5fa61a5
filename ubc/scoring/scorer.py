"""``Scorer``: one volume at a time, from Python, with the same steps as the batch pipeline
(load, preprocess, engine, aggregate) run one after the other in the caller's thread."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from types import TracebackType

import numpy as np

from ubc.bundle import Bundle
from ubc.engine.base import Engine
from ubc.scoring.archive import ScoringOptions
from ubc.scoring.predictor import Source, work_for
from ubc.scoring.result import CaseResult
from ubc.scoring.stages import (
    CaseWork,
    RunContext,
    accumulate,
    batch_size_for,
    finish_case,
)

__all__ = ["Scorer"]


class Scorer:
    """Score single volumes with a bundle.

    >>> with Scorer("model.ubc") as scorer:           # doctest: +SKIP
    ...     result = scorer.score("case_flair.nii.gz")
    ...     result.status, result.p_hgg, result.lesion_volume_ml

    ``score`` never raises for a bad volume: like a row of ``score_archive``, the result has
    ``status == "error"`` and ``error`` says why. ``engine``: an engine already loaded (the
    caller closes it); otherwise one is loaded with ``backend``/``device``.
    """

    def __init__(self, bundle: str | os.PathLike[str] | Bundle, *, backend: str = "auto",
                 device: str = "auto", engine: Engine | None = None,
                 options: ScoringOptions | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.options = options or ScoringOptions()
        self._own_engine = engine is None
        if engine is None:
            from ubc import engine as engines

            engine = engines.load(self.bundle, backend=backend, device=device)
        self.engine = engine
        self.context = RunContext.create(
            self.bundle, engine.backend, engine.precision, top_k=self.options.top_k,
            min_lesion_ml=self.options.min_lesion_ml,
            preprocess_threads=self.options.preprocess_threads)
        self.batch_size = batch_size_for(engine.max_batch, self.options.batch_size)

    def _infer(self, work: CaseWork, context: RunContext) -> None:
        slices, work.slices = work.slices, None
        if work.error is not None or slices is None:
            return
        start = time.perf_counter()
        try:
            for first in range(0, work.n_scored, self.batch_size):
                batch = slices[first:first + self.batch_size]
                class_logits, mask_logits = self.engine.infer(batch)
                accumulate(work, first, class_logits, mask_logits, batch[:, 0], context)
        except Exception as exc:  # reported in the row, like in the pipeline
            work.fail("inference", exc)
        work.seconds += time.perf_counter() - start

    def score(self, source: Source, *, case_id: str | None = None,
              affine: np.ndarray | None = None, mask_path: str | os.PathLike[str] | None = None,
              overlay_path: str | os.PathLike[str] | None = None) -> CaseResult:
        """Score one volume: a NIfTI path, the bytes of a .nii/.nii.gz file, a loaded
        ``ubc.io.Volume``, or a 3-D array with its ``affine`` (4 x 4).

        ``mask_path``: also write the predicted mask there as NIfTI, in the input file's
        grid, orientation and affine; ``overlay_path``: a PNG of the top slices.
        """
        mask = Path(mask_path) if mask_path is not None else None
        overlay = Path(overlay_path) if overlay_path is not None else None
        for target in (mask, overlay):
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
        context = dataclasses.replace(self.context, masks=mask.parent if mask else None,
                                      overlays=overlay.parent if overlay else None)
        work = work_for(source, self.context, case_id=case_id, affine=affine)
        self._infer(work, context)
        return finish_case(work, context, mask_path=mask, overlay_path=overlay)

    def close(self) -> None:
        """Close the engine if this scorer loaded it."""
        if self._own_engine:
            self.engine.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
