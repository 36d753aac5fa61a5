"""Scoring volumes with a model bundle: ``Scorer`` for one volume, ``Predictor`` for many
callers at once in memory (thread-safe, micro-batching), ``score_archive`` for an archive
(the pipelined, resumable batch job behind ``ubc-infer``)."""

from __future__ import annotations

from ubc.scoring.archive import RunSummary, score_archive
from ubc.scoring.discover import Case, discover_cases, safe_name
from ubc.scoring.options import CaseOptions, ScoringOptions
from ubc.scoring.outputs import OutputSpec
from ubc.scoring.prediction import Prediction
from ubc.scoring.predictor import Overloaded, Predictor
from ubc.scoring.result import CaseResult
from ubc.scoring.scorer import Scorer
from ubc.scoring.writers import read_results

__all__ = ["Scorer", "Predictor", "Prediction", "Overloaded", "score_archive", "CaseResult",
           "ScoringOptions", "CaseOptions", "OutputSpec", "RunSummary", "Case",
           "discover_cases", "safe_name", "read_results"]
