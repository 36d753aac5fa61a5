"""What a run writes, in one place: ``OutputSpec`` (the results file and the per-case files:
NIfTI masks, PNG overlays, DICOM SEG) and the run's report, built once by the CLI or by
the caller of ``score_archive``; what the stages keep in memory for a case follows from it
(``CaseFiles.keep_masks``, ``keep_images``). A new per-case output is a field here, its
writer in ``ubc.scoring.stages.write_outputs``, and its CLI flag; a new output of the whole
run is a field here, its writer in ``ubc.scoring.archive.write_run_outputs``, and its CLI
flag."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ubc.errors import OutputFault
from ubc.scoring.discover import safe_path

__all__ = ["OutputSpec", "CaseFiles", "CASE_OUTPUTS", "SegStore", "pictures_folder"]

#: the per-case outputs: CaseFiles' fields, the row's ``<name>_file`` columns
CASE_OUTPUTS = ("mask", "seg", "overlay")


class SegStore(Protocol):
    """Where ``--store-seg`` sends each case's DICOM SEG (a PACS, ``ubc.net``): ``send``
    returns what the row's ``seg_stored`` says (``<SOPInstanceUID>@<where>``) and raises
    ``UBCInputError`` naming the step when the node refuses or cannot be reached after its
    retries. Picklable (Ray ships the ``OutputSpec`` to its actors)."""

    def send(self, path: Path) -> str:
        ...


def pictures_folder(report: Path) -> Path:
    """``report.html`` -> ``report_files/``, the folder of the report's pictures."""
    return report.with_name(f"{report.stem}_files")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case (None: not written). ``kept``: those an earlier run wrote
    already (named in the row, not written again); ``base``: the folder the row's file
    columns are relative to (the results file's); ``store``: where the SEG is sent once
    written (or found kept: the same file again, so the PACS holds one copy)."""

    mask: Path | None = None
    overlay: Path | None = None
    seg: Path | None = None
    kept: frozenset[str] = frozenset()
    base: Path | None = None
    store: SegStore | None = None

    def to_write(self) -> dict[str, Path]:
        """``{output: path}`` of the files this run writes (``CASE_OUTPUTS`` order)."""
        paths = {name: getattr(self, name) for name in CASE_OUTPUTS}
        return {name: path for name, path in paths.items()
                if path is not None and name not in self.kept}

    def named(self, name: str) -> str | None:
        """The row's column value for output ``name``: its path relative to ``base``."""
        path = getattr(self, name)
        if path is None:
            return None
        return Path(os.path.relpath(path, self.base)).as_posix() if self.base else str(path)

    @property
    def keep_masks(self) -> bool:
        """The stages keep the case's mask probabilities (every file here needs them)."""
        return bool(self.to_write())

    @property
    def keep_images(self) -> bool:
        """The stages keep the case's input slices (the overlay draws them)."""
        return "overlay" in self.to_write()


def _path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True)
class OutputSpec:
    """Where a run writes: ``results`` (.csv, .jsonl or .parquet; None when the rows are
    only returned), folders for one NIfTI mask (the input's grid and affine), one PNG
    overlay and one DICOM SEG (DICOM studies only) per case, and ``report``: one HTML page
    for the whole results file (``ubc.scoring.report``), whose pictures are the overlays
    (in ``<report>_files/overlays/`` unless ``overlays`` names a folder), and ``skipped``:
    a CSV of the archive's files that look like inputs but are not cases. ``kept``: per
    case id, the outputs an earlier run wrote already (a retry writes only the others).
    ``store_seg``: where each SEG is sent (``--store-seg``; needs ``dicom_seg``)."""

    results: Path | None = None
    masks: Path | None = None
    overlays: Path | None = None
    dicom_seg: Path | None = None
    report: Path | None = None
    skipped: Path | None = None
    kept: Mapping[str, frozenset[str]] = field(default_factory=dict, hash=False)
    store_seg: SegStore | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.store_seg is not None and self.dicom_seg is None:
            raise ValueError("storing SEGs (--store-seg) needs a folder to write them "
                             "(--dicom-seg)")

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

    def folders(self) -> dict[str, Path]:
        """``{option: folder}`` of every folder this run writes into."""
        def parent(path: Path | None) -> Path | None:
            return None if path is None else path.parent

        folders = {"--out": parent(self.results), "--masks": self.masks,
                   "--overlays": self.overlay_folder, "--dicom-seg": self.dicom_seg,
                   "--report": parent(self.report), "--skipped": parent(self.skipped)}
        return {option: folder for option, folder in folders.items() if folder is not None}

    def create(self) -> None:
        """Create the folders and check that a file can be written in each: ``OutputFault``
        naming the option and the folder when not (before any model is loaded)."""
        for option, folder in self.folders().items():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as exc:
                raise OutputFault(f"{option} {folder}: cannot write there "
                                  f"({exc.strerror or exc})") from exc

    def files_for(self, case_id: str, *, dicom: bool) -> CaseFiles:
        """The case's files, named by the safe name of its id (never outside the folders);
        a SEG only for a DICOM source."""
        def inside(folder: Path | None, suffix: str) -> Path | None:
            return None if folder is None else safe_path(folder, case_id, suffix)

        return CaseFiles(mask=inside(self.masks, ".nii.gz"),
                         overlay=inside(self.overlay_folder, ".png"),
                         seg=inside(self.dicom_seg, ".dcm") if dicom else None,
                         kept=self.kept.get(case_id, frozenset()),
                         base=None if self.results is None else self.results.parent,
                         store=self.store_seg if dicom else None)
