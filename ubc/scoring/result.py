"""One row per case: ``CaseResult``, whose fields are the one declaration of the results
file's columns (names, order, types), and its conversion to and from the plain values that
CSV, JSON lines and Parquet hold. The writers, ``Prediction.to_row`` and ubc-serve's answer
are all derived from it."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OK", "ERROR", "NO_LESION", "STATUSES", "COLUMNS", "COLUMN_TYPES", "SERVED_COLUMNS",
           "CaseResult", "value_type"]

OK, ERROR, NO_LESION = "ok", "error", "no_lesion"
STATUSES = (OK, ERROR, NO_LESION)

# the columns that only a scored archive has: the input file and its identity, the DICOM
# source, the conformance flags; ubc-serve's answers leave them out
_ARCHIVE_ONLY = {"served": False}


@dataclass(frozen=True)
class CaseResult:
    """The result of scoring one volume; one row of the results file.

    - ``status``: ``ok``, ``no_lesion`` (predicted lesion volume under the threshold: no class
      is forced), or ``error`` (``error`` says why; the scores are empty).
    - ``p_hgg``: mean P(HGG) over the ``slices_used`` slices (the top-k by predicted lesion
      area, largest first, axial indices of the canonical RAS volume).
    - ``lesion_volume_ml``: predicted lesion volume in mL (mask probability > 0.5).
    - ``slices_total``: axial slices of the volume; ``slices_scored``: those holding any
      foreground (background-only slices are not sent to the engine).
    - ``seconds``: compute time spent on this case (load + preprocess + its share of engine
      time + aggregation and writing); queue waits are not counted.
    - ``input_bytes``/``input_mtime_ns``: the input file's size and mtime when it was read:
      a re-run skips the case while both are unchanged (and ``input_digest``). For a DICOM
      study: its instance files' total size and latest mtime, and ``input_digest`` a sha1
      over their names, sizes and mtimes (empty for NIfTI).
    - ``flags``: ``;``-separated notes on inputs the model was not trained for and on how a
      DICOM series was chosen (``ubc.io.conformance``, ``ubc.io.dicom_select``), e.g.
      ``thick_slices:5.5mm (trained 1mm)``; empty when there is nothing to say.
    - ``study_uid``/``series_uid``/``series_description``: the DICOM study and the series
      scored (empty for NIfTI).
    - ``mask_file``/``seg_file``/``overlay_file``: the case's NIfTI mask, DICOM SEG and
      overlay picture, relative to the results file's folder (empty when not written).
    - ``output_error``: the outputs that failed to write and why (``dicom_seg: ...``); the
      score is kept, and a re-run redoes only those outputs.
    - ``trained_on``: where the model's training data came from (``ubc-synth phantoms`` ...),
      so a score from a model that never saw a real scan says so.
    - ``seg_stored``: where the SEG went (``--store-seg``): ``<SOPInstanceUID>@<node>``;
      empty when not stored.
    """

    case_id: str
    path: str = field(metadata=_ARCHIVE_ONLY)
    status: str
    error: str | None = None
    p_hgg: float | None = None
    predicted_class: str | None = None
    lesion_volume_ml: float | None = None
    slices_total: int | None = None
    slices_scored: int | None = None
    slices_used: tuple[int, ...] = ()
    model: str | None = None
    bundle_sha256: str | None = None
    backend: str | None = None
    precision: str | None = None
    seconds: float | None = None
    input_bytes: int | None = field(default=None, metadata=_ARCHIVE_ONLY)
    input_mtime_ns: int | None = field(default=None, metadata=_ARCHIVE_ONLY)
    input_digest: str | None = field(default=None, metadata=_ARCHIVE_ONLY)
    flags: str | None = field(default=None, metadata=_ARCHIVE_ONLY)
    study_uid: str | None = field(default=None, metadata=_ARCHIVE_ONLY)
    series_uid: str | None = field(default=None, metadata=_ARCHIVE_ONLY)
    series_description: str | None = field(default=None, metadata=_ARCHIVE_ONLY)
    mask_file: str | None = None
    seg_file: str | None = None
    overlay_file: str | None = None
    output_error: str | None = None
    trained_on: str | None = None
    seg_stored: str | None = field(default=None, metadata=_ARCHIVE_ONLY)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def identity(self) -> tuple[int | None, int | None, str | None]:
        """``(size, mtime_ns, digest)`` of the input this row was computed from (see
        ``ubc.scoring.discover.case_identity``)."""
        return (self.input_bytes, self.input_mtime_ns, self.input_digest)

    def to_row(self) -> dict[str, Any]:
        """Plain values (str, int, float, None, list of int) in column order."""
        row = dataclasses.asdict(self)
        row["slices_used"] = list(self.slices_used)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CaseResult:
        """The inverse of ``to_row``; also accepts the strings of a CSV row."""
        return cls(**{name: _convert(row.get(name), name) for name in COLUMNS})


COLUMNS = tuple(f.name for f in dataclasses.fields(CaseResult))
COLUMN_TYPES: dict[str, Any] = typing.get_type_hints(CaseResult)
"""Column -> its type: ``str`` (never empty), ``str | None``, ``int | None``, ``float | None``
or ``tuple[int, ...]`` (``slices_used``)."""
SERVED_COLUMNS = tuple(f.name for f in dataclasses.fields(CaseResult)
                       if f.metadata.get("served", True))
"""The columns of ubc-serve's answers."""


def value_type(column: str) -> Any:
    """The type of a column's values: str, int, float or tuple[int, ...] (its type without
    ``| None``)."""
    hint = COLUMN_TYPES[column]
    args = typing.get_args(hint)
    return args[0] if type(None) in args else hint


def _convert(value: Any, column: str) -> Any:
    kind = value_type(column)
    if kind == tuple[int, ...]:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ()
        if isinstance(value, str):
            return tuple(int(v) for v in value.replace(";", " ").split())
        return tuple(int(v) for v in value)
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "" if COLUMN_TYPES[column] is str else None
    return kind(value)
