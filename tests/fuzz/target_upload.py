"""Fuzz target ``upload``: bytes as ``ubc-serve`` and ``Predictor.predict(bytes)`` receive
them: content-sniffed (.nii or .nii.gz), loaded, checked and cut into model slices by
``ubc.scoring.stages`` (``load_case`` + ``prepare_case`` of ``case_for(bytes)``), the step
before the engine.

Allowed outcomes: model slices that are finite, float32 [S, 1, 32, 32] with S > 0, or the
case's error, which must name the source ``<in memory>`` and never the temporary file the
loader may use (a client sees that message in a 422). Anything else (an exception escaping
those steps, a warning) is a finding. The seeds and regressions are the ``nifti`` target's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

NAME = "upload"
INSTRUMENT = ("ubc", "nibabel")
SEEDS = Path(__file__).resolve().parent / "corpus" / "nifti"
REGRESSIONS = Path(__file__).resolve().parent / "regressions" / "nifti"
SIZE = (32, 32)


def prepare() -> Callable[[bytes], None]:
    """Import the code under test and return the function that runs one input."""
    import logging

    logging.getLogger("nibabel").setLevel(logging.ERROR)
    from ubc.bundle import Preprocessing
    from ubc.io.readers import IN_MEMORY
    from ubc.scoring.predictor import case_for
    from ubc.scoring.stages import RunContext, load_case, prepare_case

    context = RunContext(model="fuzz", bundle_sha256="0" * 64, backend="none",
                         precision="fp32", preprocessing=Preprocessing(size=SIZE,
                                                                       target_spacing=(2.0, 2.0)),
                         class_names=("LGG", "HGG"), top_k=5)

    def one_input(data: bytes) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # as pytest runs: a warning is a finding
            prepared = prepare_case(load_case(case_for(data)), context)
        if prepared.failure is not None:
            error = prepared.failure.message
            assert error.startswith(IN_MEMORY), f"error does not name the source: {error}"
            assert "ubc-upload-" not in error, f"temporary path leaked: {error}"
            return
        slices = prepared.slices
        assert slices is not None and slices.dtype == np.float32, slices
        assert slices.ndim == 4 and slices.shape[0] > 0 and slices.shape[1:] == (1, *SIZE)
        assert np.isfinite(slices).all()

    return one_input
