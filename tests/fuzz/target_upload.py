"""Fuzz target ``upload``: bytes as ``ubc-serve`` receives them: the service's own check of
what the volume will take to decode (``ubc.serve.upload.decode_cost`` at the default
``--max-volume-mb``, from the header alone), then as ``Predictor.predict(bytes)`` takes them:
content-sniffed (.nii or .nii.gz), loaded, checked and cut into model slices by
``ubc.scoring.stages`` (``load_case`` + ``prepare_case`` of ``case_for(bytes)``), the step
before the engine.

Allowed outcomes: ``TooLarge`` (the service's 413), model slices that are finite, float32
[S, 1, 32, 32] with S > 0, or the check's or the case's error, which must name the source
``<in memory>`` and never the temporary file the loader may use (a client sees that message
in a 422). Anything else (an exception escaping those steps, a warning, more memory than
``--memory-mb``) is a finding. Inputs go up to ``MAX_LEN`` bytes, not the driver's 4,096:
a gzip stream that inflates to a GiB takes a megabyte (issue 26). The seeds and regressions
are the ``nifti`` target's.
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
MAX_LEN = 1 << 20


def prepare() -> Callable[[bytes], None]:
    """Import the code under test and return the function that runs one input."""
    import logging

    logging.getLogger("nibabel").setLevel(logging.ERROR)
    from ubc.bundle import Preprocessing
    from ubc.errors import UBCInputError
    from ubc.io.readers import IN_MEMORY
    from ubc.scoring.predictor import case_for
    from ubc.scoring.stages import RunContext, load_case, prepare_case
    from ubc.serve import ServeConfig
    from ubc.serve.upload import TooLarge, decode_cost

    cap = int(ServeConfig.max_volume_mb * 1024 * 1024)

    context = RunContext(model="fuzz", bundle_sha256="0" * 64, backend="none",
                         precision="fp32", preprocessing=Preprocessing(size=SIZE,
                                                                       target_spacing=(2.0, 2.0)),
                         class_names=("LGG", "HGG"), top_k=5)

    def one_input(data: bytes) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # as pytest runs: a warning is a finding
            try:
                decode_cost(data, cap)
            except TooLarge:
                return
            except UBCInputError as exc:
                assert str(exc).startswith(IN_MEMORY), f"error does not name the source: {exc}"
                return
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
