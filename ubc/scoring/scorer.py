"""``Scorer``: one volume at a time, from Python, with the same steps as the batch pipeline
(load, preprocess, engine, aggregate) run one after the other in the caller's thread."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import TracebackType

import numpy as np

from ubc.bundle import Bundle
from ubc.engine.base import Engine
from ubc.scoring.options import CaseOptions
from ubc.scoring.outputs import CaseFiles
from ubc.scoring.packer import Packer, batch_size_for, infer
from ubc.scoring.predictor import Source, case_for
from ubc.scoring.result import CaseResult
from ubc.scoring.stages import (
    CaseOutputs,
    RunContext,
    finish_case,
    hand_back,
    load_case,
    prepare_case,
)

__all__ = ["Scorer"]


class Scorer:
    """Score single volumes with a bundle.

    >>> with Scorer("model.ubc") as scorer:           # doctest: +SKIP
    ...     result = scorer.score("case_flair.nii.gz")
    ...     result.status, result.p_hgg, result.lesion_volume_ml

    ``score`` never raises for a bad volume: like a row of ``score_archive``, the result has
    ``status == "error"`` and ``error`` says why. ``engine``: an engine already loaded (the
    caller closes it); otherwise one is loaded with ``backend``/``device``. ``batch_size``:
    slices per engine call (default: the engine's, at most 32).
    """

    def __init__(self, bundle: str | os.PathLike[str] | Bundle, *, backend: str = "auto",
                 device: str = "auto", engine: Engine | None = None,
                 options: CaseOptions | None = None, batch_size: int | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.options = options or CaseOptions()
        self._own_engine = engine is None
        if engine is None:
            from ubc import engine as engines

            engine = engines.load(self.bundle, backend=backend, device=device)
        self.engine = engine
        self.context = RunContext.create(self.bundle, engine.backend, engine.precision,
                                         self.options)
        self.batch_size = batch_size_for(engine.max_batch, batch_size)

    def score(self, source: Source, *, case_id: str | None = None,
              affine: np.ndarray | None = None, mask_path: str | os.PathLike[str] | None = None,
              overlay_path: str | os.PathLike[str] | None = None) -> CaseResult:
        """Score one volume: a NIfTI or NRRD path, the bytes of a .nii/.nii.gz file, a
        loaded ``ubc.io.Volume``, or a 3-D array with its ``affine`` (4 x 4).

        ``mask_path``: also write the predicted mask there as NIfTI, in the input file's
        grid, orientation and affine; ``overlay_path``: a PNG of the top slices.
        """
        files = CaseFiles(mask=None if mask_path is None else Path(mask_path),
                          overlay=None if overlay_path is None else Path(overlay_path))
        for target in (files.mask, files.overlay):
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
        prepared = prepare_case(load_case(case_for(source, case_id=case_id, affine=affine)),
                                self.context)
        outputs = CaseOutputs(dataclasses.replace(prepared, slices=None), self.context, files)
        if prepared.slices is not None and prepared.failure is None:
            packer: Packer[CaseOutputs] = Packer(self.batch_size, prepared.slices.shape[1:])
            for batch in [*packer.add(outputs, prepared.slices), packer.flush()]:
                if batch is not None:
                    hand_back(batch, infer(self.engine, batch))
        return finish_case(outputs).result
    def close(self) -> None:
        """Close the engine if this scorer loaded it."""
        if self._own_engine:
            self.engine.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
