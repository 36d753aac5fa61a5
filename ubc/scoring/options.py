"""How to score, apart from what to write (``ubc.scoring.outputs``): ``CaseOptions`` for
every way of scoring a case (``Scorer``, ``Predictor``, the batch job), ``ScoringOptions``
for the batch job (pipeline sizes, resume, DICOM discovery) on top of them, and
``PipelineOptions``, the sizes of the threaded pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from ubc.scoring.aggregate import DEFAULT_MIN_LESION_ML
from ubc.scoring.discover import CASE_ID_MODES

__all__ = ["CaseOptions", "PipelineOptions", "ScoringOptions"]


@dataclass(frozen=True)
class CaseOptions:
    """How one case is scored: top-k (None: the bundle's), the no-lesion threshold in mL,
    native preprocessing threads (0: all cores)."""

    top_k: int | None = None
    min_lesion_ml: float = DEFAULT_MIN_LESION_ML
    preprocess_threads: int = 1

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.min_lesion_ml < 0:
            raise ValueError(f"min_lesion_ml must be >= 0, got {self.min_lesion_ml}")


@dataclass(frozen=True)
class PipelineOptions:
    """Sizes of the threaded pipeline (``ubc.scoring.pipeline``). ``batch_size`` None: the
    engine's ``max_batch``, at most 32."""

    batch_size: int | None = None
    workers: int = 2
    prefetch: int = 2
    batch_queue: int = 2

    def __post_init__(self) -> None:
        for name in ("workers", "prefetch", "batch_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class ScoringOptions(CaseOptions):
    """The batch job's options: ``CaseOptions``, the pipeline's sizes (``batch_size`` None:
    the engine's, at most 32), whether earlier ``error`` rows are retried, and for DICOM a
    ``--series-select`` override of the FLAIR rules (``ubc.io.dicom_select``) and how
    studies are named (``CASE_ID_MODES``)."""

    batch_size: int | None = None
    workers: int = 2
    prefetch: int = 2
    retry_errors: bool = False
    series_select: str | None = None
    case_id: str = "study"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.case_id not in CASE_ID_MODES:
            raise ValueError(f"case_id must be one of {CASE_ID_MODES}, got {self.case_id!r}")

    @property
    def pipeline(self) -> PipelineOptions:
        return PipelineOptions(batch_size=self.batch_size, workers=self.workers,
                               prefetch=self.prefetch)

    @property
    def case(self) -> CaseOptions:
        """The options every case is scored with."""
        return CaseOptions(top_k=self.top_k, min_lesion_ml=self.min_lesion_ml,
                           preprocess_threads=self.preprocess_threads)
