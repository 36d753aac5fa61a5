"""UBC, the Unet-Boosted Classifier: glioma grading (HGG vs LGG) with lesion segmentation
from brain MRI, and the engine that scores archives of volumes with it."""

from __future__ import annotations

from typing import Any

from ubc.errors import BundleError, UBCError, UBCInputError

__all__ = ["BundleError", "UBCError", "UBCInputError", "Scorer", "Predictor", "Prediction",
           "Overloaded", "score_archive", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The scoring entry points pull in torch-free but heavy modules; import them on first use.
    if name in ("Scorer", "Predictor", "Prediction", "Overloaded", "score_archive"):
        from ubc import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module 'ubc' has no attribute {name!r}")
