"""The run report: one static HTML page for a whole results file, to look at rather than
read (``ubc-infer --report``, ``ubc-report``).

Self-contained and offline: inline CSS, JS and SVG plots, no request to any other host,
works from ``file://``. Each case's picture (its overlay PNG: top slices with the
predicted outline and per-slice P(HGG)) is a file in the sibling folder
``<name>_files/`` (or the run's ``--overlays`` folder), loaded lazily; the table shows one
page of rows at a time (250 by default, or all), sorted and filtered over every case, so a
10,000-case page opens in well under a second. The page holds nothing beyond what the rows
hold. Markup hooks other tools
may rely on: the case table is ``table#cases``, each case row shown ``tr[data-case-id]``
(the row's ``case_id`` exactly), sortable headers ``th[data-sort]``; every row is in the
page's JSON (``script#report-data``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from ubc.atomic import atomic_write
from ubc.errors import UBCError
from ubc.scoring.aggregate import Verdict
from ubc.scoring.discover import safe_path
from ubc.scoring.outputs import pictures_folder
from ubc.scoring.report_page import PAGE
from ubc.scoring.result import ERROR, NO_LESION, OK, STATUSES, CaseResult

__all__ = ["FLAG_HELP", "RunInfo", "report_data", "write_report", "draw_from_mask"]

#: flag kind (the text before ":") -> what it means, in plain words
FLAG_HELP = {
    "inplane_spacing": "After resampling to the model's grid, the pixels are coarser or "
                       "finer than those of the training scans: the model sees slices "
                       "unlike those it learnt from.",
    "thick_slices": "Slices are thicker than the training scans: small lesions may be "
                    "missed and the lesion volume is less exact.",
    "thin_slices": "Slices are thinner than the training scans: they are sharper and "
                   "noisier than what the model learnt from.",
    "non_axial": "The scan was acquired sagittally or coronally; the model was trained on "
                 "axial slices.",
    "oblique": "The slices are tilted against the patient's axes; the model saw straight "
               "axial slices.",
    "background_shifted": "The background was not 0 and was shifted to 0 before scoring.",
    "nonfinite_background": "Some background voxels were NaN or infinite and were set to 0.",
    "implausible_lesion": "The predicted lesion is too large for the brain: probably not a "
                          "skull-stripped FLAIR like the training data.",
    "series_rule": "How the FLAIR series of this DICOM study was chosen.",
    "series_tiebreak": "Several series qualified as FLAIR; this one was chosen by the "
                       "tie-break rules.",
}


def flag_kinds(row: CaseResult) -> list[str]:
    """The kinds of the row's flags (``thick_slices:5mm`` -> ``thick_slices``)."""
    return [f.split(":", 1)[0] for f in (row.flags or "").split(";") if f]


@dataclass(frozen=True)
class RunInfo:
    """What the page says of the run beyond its rows: when and where it was made and how
    long the last run took (None when the page is made for an existing results file)."""

    made: str
    machine: str
    wall_seconds: float | None = None

    @classmethod
    def now(cls, wall_seconds: float | None = None) -> RunInfo:
        from ubc.devices import cpu_model

        return cls(made=time.strftime("%Y-%m-%d %H:%M %Z"),
                   machine=f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.system()}",
                   wall_seconds=wall_seconds)


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _case(row: CaseResult, picture: str | None) -> dict[str, Any]:
    return {"id": row.case_id, "status": row.status, "cls": row.predicted_class,
            "p": row.p_hgg, "ml": row.lesion_volume_ml, "scored": row.slices_scored,
            "total": row.slices_total, "s": row.seconds, "flags": row.flags or "",
            "kinds": flag_kinds(row), "error": row.error, "outerr": row.output_error,
            "pic": picture}


def report_data(rows: Sequence[CaseResult], pictures: dict[str, str],
                run: RunInfo) -> dict[str, Any]:
    """What the page receives: the run's summary, one entry per row (``pictures``: case id
    -> the picture's path relative to the page) and the help text of the flags seen."""
    counts = Counter(r.status for r in rows)
    kinds = Counter(k for r in rows for k in flag_kinds(r))
    first = next((r for r in rows if r.model), None)
    return {
        "run": {"model": first.model if first else None,
                "bundle_sha256": first.bundle_sha256 if first else None,
                "backends": sorted({f"{r.backend} {r.precision}" for r in rows if r.backend}),
                "machine": run.machine, "made": run.made, "wall_seconds": run.wall_seconds,
                "compute_seconds": round(sum(r.seconds or 0.0 for r in rows), 1),
                "cases": len(rows), "counts": {s: counts.get(s, 0) for s in STATUSES}},
        "flags": {k: {"count": n, "help": FLAG_HELP.get(k, "")} for k, n in kinds.items()},
        "cases": [_case(r, pictures.get(r.case_id)) for r in rows],
    }


# --- plots: small inline SVGs --------------------------------------------------------------
def _bars_svg(title: str, labels: Sequence[str], values: Sequence[float], *,
              ends_only: bool = False) -> str:
    """A bar chart as inline SVG: a label under each bar, or (``ends_only``, for a
    histogram) the first and the last; each bar's label and value on hover."""
    width, height, top, bottom = 360, 150, 22, 34
    n = max(len(values), 1)
    peak = max(values, default=0) or 1
    step = (width - 10) / n
    parts = [f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}"><text x="4" y="14" class="t">{escape(title)}</text>']
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        bar = (height - top - bottom) * value / peak
        x, y = 5 + i * step, height - bottom - bar
        parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(step - 2, 1):.1f}" '
                     f'height="{bar:.1f}"><title>{escape(label)}: {value:g}</title></rect>')
        if not ends_only:
            parts.append(f'<text x="{x + step / 2:.1f}" y="{height - bottom + 12}" '
                         f'class="l">{escape(label)}</text>')
    if ends_only and labels:  # a histogram's range: "low\u2013..." to "...\u2013high"
        low, high = labels[0].split("\u2013")[0], labels[-1].split("\u2013")[-1]
        parts.append(f'<text x="5" y="{height - bottom + 12}" class="l0">{escape(low)}'
                     f'</text><text x="{width - 5}" y="{height - bottom + 12}" class="l1">'
                     f'{escape(high)}</text>')
    return "".join(parts) + "</svg>"


def _histogram_svg(title: str, values: Sequence[float], bins: int,
                   low: float | None = None, high: float | None = None) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return _bars_svg(f"{title} (no values)", [], [])
    low = min(finite) if low is None else low
    high = max(finite) if high is None else high
    counts, edges = np.histogram(finite, bins=bins, range=(low, high if high > low else low + 1))
    labels = [f"{a:.3g}\u2013{b:.3g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return _bars_svg(title, labels, [int(c) for c in counts], ends_only=True)


def plots(rows: Sequence[CaseResult], flags: dict[str, dict[str, Any]]) -> list[str]:
    """The page's plots: P(HGG), lesion volumes, flags by kind (``report_data``'s
    ``flags``), seconds per case."""
    scored = [r for r in rows if r.status == OK]
    return [
        _histogram_svg("P(HGG) of the ok cases", [r.p_hgg or 0.0 for r in scored], 10, 0, 1),
        _histogram_svg("Lesion volume, mL", [r.lesion_volume_ml or 0.0 for r in rows
                                             if r.status in (OK, NO_LESION)], 12),
        _bars_svg("Flags by kind", list(flags), [f["count"] for f in flags.values()]),
        _histogram_svg("Seconds per case", [r.seconds or 0.0 for r in rows], 12),
    ]


# --- pictures ------------------------------------------------------------------------------
def draw_from_mask(row: CaseResult, mask: Path, target: Path) -> Path:
    """The case's picture from its input file and its NIfTI mask (a run made without
    ``--report``): its top-k slices with the mask's outline; per-slice P(HGG) is not known
    then. Raises ``UBCInputError``, ``OSError`` or ``ValueError`` when the files cannot be
    drawn."""
    from ubc.io import load_volume
    from ubc.io.readers import reader_for_file
    from ubc.scoring.overlays import write_overlay

    volume = reader_for_file(Path(row.path)).load()
    labels = load_volume(mask)
    if labels.data.shape != volume.data.shape:
        raise ValueError(f"{mask}: mask shape {labels.data.shape} is not the input's "
                         f"{volume.data.shape}")
    indices = np.array(row.slices_used or (volume.data.shape[2] // 2,), np.int64)
    images = np.moveaxis(np.asarray(volume.data[:, :, indices], np.float32), 2, 0)
    masks = np.moveaxis(np.asarray(labels.data[:, :, indices]) > 0, 2, 0)
    area = masks.reshape(len(indices), -1).sum(axis=1) * volume.spacing[0] * volume.spacing[1]
    verdict = Verdict(no_lesion=row.status == NO_LESION, p_hgg=row.p_hgg,
                      predicted_class=row.predicted_class,
                      lesion_volume_ml=row.lesion_volume_ml or 0.0,
                      slices_used=tuple(int(i) for i in indices))
    return write_overlay(target, case_id=row.case_id, images=images,
                         mask_prob=masks.astype(np.float32), slice_indices=indices,
                         area_mm2=area, p_hgg=None, verdict=verdict)


def _pictures(rows: Sequence[CaseResult], page: Path, overlays: Path | None,
              masks: Path | None) -> dict[str, str]:
    """case id -> its picture relative to the page: the overlay a run wrote, else one drawn
    now from the case's mask (into the page's folder) when a masks folder is given."""
    found: dict[str, str] = {}
    drawn = pictures_folder(page) / "overlays"
    for row in rows:
        if row.status == ERROR:
            continue
        picture = safe_path(overlays or drawn, row.case_id, ".png")
        if not picture.is_file() and masks is not None and row.study_uid is None:
            mask = safe_path(masks, row.case_id, ".nii.gz")
            picture = safe_path(drawn, row.case_id, ".png")
            try:
                drawn.mkdir(parents=True, exist_ok=True)
                draw_from_mask(row, mask, picture)
            except (UBCError, OSError, ValueError):
                continue  # no mask, or its input moved: the page says there is no picture
        if picture.is_file():
            found[row.case_id] = _relative(picture, page.parent)
    return found


def write_report(rows: Sequence[CaseResult], page: str | os.PathLike[str], *,
                 overlays: str | os.PathLike[str] | None = None,
                 masks: str | os.PathLike[str] | None = None,
                 run: RunInfo | None = None) -> Path:
    """Write the page for ``rows`` atomically (its pictures: the overlays in ``overlays``,
    default ``<page>_files/overlays``; for cases without one, drawn from ``masks``)."""
    import jinja2

    page = Path(page).resolve()
    page.parent.mkdir(parents=True, exist_ok=True)
    pictures = _pictures(rows, page, None if overlays is None else Path(overlays).resolve(),
                         None if masks is None else Path(masks).resolve())
    data = report_data(rows, pictures, run or RunInfo.now())
    # "<" inside the JSON could end or escape the script element: written as JSON's \u003c
    payload = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    html = jinja2.Environment(autoescape=True).from_string(PAGE).render(
        data=data, payload=payload, plots=plots(rows, data["flags"]),
        statuses=STATUSES)
    return atomic_write(page, lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
