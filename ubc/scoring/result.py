"""One row per case: ``CaseResult``, its columns, and its conversion to and from the plain
values that CSV, JSON lines and Parquet hold."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["OK", "ERROR", "NO_LESION", "STATUSES", "COLUMNS", "CaseResult"]

OK, ERROR, NO_LESION = "ok", "error", "no_lesion"
STATUSES = (OK, ERROR, NO_LESION)


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
    """

    case_id: str
    path: str
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
    input_bytes: int | None = None
    input_mtime_ns: int | None = None
    input_digest: str | None = None
    flags: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    series_description: str | None = None

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
        values: dict[str, Any] = {}
        for name, kind in _KINDS.items():
            values[name] = _convert(row.get(name), kind, name)
        return cls(**values)


def _convert(value: Any, kind: str, name: str) -> Any:
    if kind == "ints":
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ()
        if isinstance(value, str):
            return tuple(int(v) for v in value.replace(";", " ").split())
        return tuple(int(v) for v in value)
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "" if kind == "str!" else None
    if kind in ("str", "str!"):
        return str(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    raise AssertionError(f"unknown column kind {kind} for {name}")


# Column -> how to read it back: "str!" never empty, "str"/"int"/"float" may be empty (None).
_KINDS = {
    "case_id": "str!", "path": "str!", "status": "str!", "error": "str", "p_hgg": "float",
    "predicted_class": "str", "lesion_volume_ml": "float", "slices_total": "int",
    "slices_scored": "int", "slices_used": "ints", "model": "str", "bundle_sha256": "str",
    "backend": "str", "precision": "str", "seconds": "float", "input_bytes": "int",
    "input_mtime_ns": "int", "input_digest": "str", "flags": "str", "study_uid": "str",
    "series_uid": "str", "series_description": "str",
}
COLUMNS = tuple(f.name for f in dataclasses.fields(CaseResult))
assert COLUMNS == tuple(_KINDS), "keep _KINDS in step with CaseResult's fields"
