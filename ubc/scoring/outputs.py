"""What a run writes, in one place: ``OutputSpec`` (the results file and the per-case files:
NIfTI masks, PNG overlays, DICOM SEG) and the run's report, built once by the CLI or by
the caller of ``score_archive``; what the stages keep in memory for a case follows from it
(``CaseFiles.keep_masks``, ``keep_images``). A new per-case output is a field here, its
writer in ``ubc.scoring.stages.write_outputs``, and its CLI flag; a new output of the whole
run is a field here, its writer in ``ubc.scoring.archive.write_run_outputs``, and its CLI
flag."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from ubc.errors import UBCInputError
from ubc.scoring.discover import safe_path

__all__ = ["OutputSpec", "CaseFiles", "pictures_folder"]


def pictures_folder(report: Path) -> Path:
    """``report.html`` -> ``report_files/``, the folder of the report's pictures."""
    return report.with_name(f"{report.stem}_files")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case (None: not written)."""

    mask: Path | None = None
    overlay: Path | None = None
    seg: Path | None = None

    @property
    def keep_masks(self) -> bool:
        """The stages keep the case's mask probabilities (every file here needs them)."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    @property
    def keep_images(self) -> bool:
        """The stages keep the case's input slices (the overlay draws them)."""
        return self.overlay is not None


def _path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True)
class OutputSpec:
    """Where a run writes: ``results`` (.csv, .jsonl or .parquet; None when the rows are
    only returned), folders for one NIfTI mask (the input's grid and affine), one PNG
    overlay and one DICOM SEG (DICOM studies only) per case, and ``report``: one HTML page
    for the whole results file (``ubc.scoring.report``), whose pictures are the overlays
    (in ``<report>_files/overlays/`` unless ``overlays`` names a folder), and ``skipped``:
    a CSV of the archive's files that look like inputs but are not cases."""

    results: Path | None = None
    masks: Path | None = None
    overlays: Path | None = None
    dicom_seg: Path | None = None
    report: Path | None = None
    skipped: Path | None = None

    @classmethod
    def of(cls, results: str | os.PathLike[str] | None = None, *,
           masks: str | os.PathLike[str] | None = None,
           overlays: str | os.PathLike[str] | None = None,
           dicom_seg: str | os.PathLike[str] | None = None,
           report: str | os.PathLike[str] | None = None,
           skipped: str | os.PathLike[str] | None = None) -> OutputSpec:
        """The spec from paths as given (strings or paths)."""
        return cls(_path(results), _path(masks), _path(overlays), _path(dicom_seg),
                   _path(report), _path(skipped))

    @property
    def overlay_folder(self) -> Path | None:
        """Where the overlays go: ``overlays``, else the report's pictures folder."""
        if self.overlays is not None or self.report is None:
            return self.overlays
        return pictures_folder(self.report) / "overlays"

    def create(self) -> None:
        """Create the folders (and the results file's); ``UBCInputError`` naming one that
        cannot be made."""
        folders = [("masks", self.masks), ("overlays", self.overlay_folder),
                   ("DICOM SEG", self.dicom_seg),
                   ("results", None if self.results is None else self.results.parent),
                   ("report", None if self.report is None else self.report.parent)]
        for what, folder in folders:
            if folder is None:
                continue
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UBCInputError(f"{folder}: cannot create the {what} folder ({exc})") \
                    from exc

    def files_for(self, case_id: str, *, dicom: bool) -> CaseFiles:
        """The case's files, named by the safe name of its id (never outside the folders);
        a SEG only for a DICOM source."""
        def inside(folder: Path | None, suffix: str) -> Path | None:
            return None if folder is None else safe_path(folder, case_id, suffix)

        return CaseFiles(mask=inside(self.masks, ".nii.gz"),
                         overlay=inside(self.overlay_folder, ".png"),
                         seg=inside(self.dicom_seg, ".dcm") if dicom else None)
