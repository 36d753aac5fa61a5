"""``score_archive``: the batch job behind ``ubc-infer``. Discover the cases, skip those the
results file already holds, run the pipeline, append one durable row per case, summarise."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ubc.bundle import Bundle
from ubc.engine.base import Engine
from ubc.errors import UBCInputError
from ubc.scoring.aggregate import DEFAULT_MIN_LESION_ML
from ubc.scoring.discover import (
    CASE_ID_MODES,
    DEFAULT_PATTERN,
    Case,
    case_identity,
    discover_cases,
)
from ubc.scoring.pipeline import STAGES, Pipeline, PipelineOptions
from ubc.scoring.result import ERROR, STATUSES, CaseResult
from ubc.scoring.stages import RunContext
from ubc.scoring.writers import ResultsFile, open_results

__all__ = ["ScoringOptions", "RunSummary", "RunPlan", "score_archive", "plan_run",
           "plan_resume", "recording", "file_identity"]


@dataclass(frozen=True)
class ScoringOptions:
    """How to score: pipeline sizes, top-k (None: the bundle's), the no-lesion threshold in
    mL, native preprocessing threads, and whether earlier ``error`` rows are retried."""

    batch_size: int | None = None
    workers: int = 2
    prefetch: int = 2
    top_k: int | None = None
    min_lesion_ml: float = DEFAULT_MIN_LESION_ML
    preprocess_threads: int = 1
    retry_errors: bool = False
    #: DICOM (issue 12): a ``--series-select`` override of the FLAIR rules
    #: (``ubc.io.dicom_select``), how studies are named (``CASE_ID_MODES``), and a folder for
    #: one DICOM SEG per scored study.
    series_select: str | None = None
    case_id: str = "study"
    dicom_seg: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if self.case_id not in CASE_ID_MODES:
            raise ValueError(f"case_id must be one of {CASE_ID_MODES}, got {self.case_id!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.min_lesion_ml < 0:
            raise ValueError(f"min_lesion_ml must be >= 0, got {self.min_lesion_ml}")

    @property
    def pipeline(self) -> PipelineOptions:
        return PipelineOptions(batch_size=self.batch_size, workers=self.workers,
                               prefetch=self.prefetch)


@dataclass(frozen=True)
class RunSummary:
    """The closing summary of a run. ``counts``: rows by status over every case of the
    archive (this run's and those already in the results file); ``scored``: rows written by
    this run; ``skipped``: cases found done in the results file."""

    out: Path
    cases: int
    scored: int
    skipped: int
    counts: Mapping[str, int]
    wall_seconds: float
    stage_seconds: Mapping[str, float]
    slices_scored: int
    peak_in_flight: int
    backend: str
    precision: str
    batch_size: int

    @property
    def failed(self) -> int:
        return int(self.counts.get(ERROR, 0))

    @property
    def slices_per_second(self) -> float:
        return self.slices_scored / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def format(self) -> str:
        """Human-readable closing summary (several lines)."""
        counts = ", ".join(f"{s} {self.counts.get(s, 0)}" for s in STATUSES)
        stages = ", ".join(f"{s} {self.stage_seconds.get(s, 0.0):.1f}s" for s in STAGES)
        busy = self.stage_seconds.get("engine", 0.0) / self.wall_seconds \
            if self.wall_seconds else 0.0
        return "\n".join([
            f"{self.cases} cases: {counts} ({self.scored} scored now, {self.skipped} already "
            f"in {self.out})",
            f"wall {self.wall_seconds:.1f}s, {self.slices_scored} slices scored, "
            f"{self.slices_per_second:.1f} slices/s, engine busy {busy:.0%} "
            f"({self.backend} {self.precision}, batch {self.batch_size})",
            f"time per stage (busy, summed over threads): {stages}",
        ])


def file_identity(path: Path) -> tuple[int | None, int | None]:
    """``(size, mtime_ns)`` of a file, ``(None, None)`` when it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return (None, None)
    return (stat.st_size, stat.st_mtime_ns)


def plan_resume(cases: list[Case], existing: list[CaseResult], *, bundle_sha256: str,
                retry_errors: bool = False) \
        -> tuple[list[Case], list[CaseResult], list[CaseResult] | None]:
    """``(to score, rows kept for these cases, rewrite)``: a case is done when the results
    hold a row with its id and its file's current size + mtime (an ``error`` row too, unless
    ``retry_errors``). ``rewrite`` is the rows to keep when stale or repeated rows must go
    first, else None. Rows of another model are refused (``UBCInputError``)."""
    others = {r.bundle_sha256 for r in existing if r.bundle_sha256 not in (None, bundle_sha256)}
    if others:
        raise UBCInputError(f"the results file holds rows of another model (weights sha256 "
                            f"{sorted(others)[0][:12]}...); choose another --out or delete it")
    latest = {r.case_id: r for r in existing}
    stale: set[str] = set()
    todo, done = [], []
    for case in cases:
        row = latest.get(case.case_id)
        if row is not None and row.identity == case_identity(case) \
                and not (retry_errors and row.status == ERROR):
            done.append(row)
            continue
        todo.append(case)
        if row is not None:
            stale.add(case.case_id)
    if not stale and len(latest) == len(existing):
        return todo, done, None
    keep = [r for r in existing if r.case_id not in stale and latest[r.case_id] is r]
    return todo, done, keep


def _progress(total: int, enabled: bool) -> tuple[Callable[[CaseResult], None],
                                                  Callable[[], None]]:
    """``(update, close)`` of a tqdm bar showing cases/s, slices/s and failures."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="case", disable=not enabled, dynamic_ncols=True,
               desc="scoring")
    state = {"slices": 0, "failed": 0, "start": time.perf_counter()}

    def update(result: CaseResult) -> None:
        state["slices"] += result.slices_scored or 0
        state["failed"] += result.status == ERROR
        elapsed = max(time.perf_counter() - state["start"], 1e-9)
        bar.set_postfix_str(f"{state['slices'] / elapsed:.1f} slices/s, "
                            f"failed {state['failed']}", refresh=False)
        bar.update(1)

    return update, bar.close


def _load_engine(bundle: Bundle, backend: str, device: str) -> Engine:
    from ubc import engine as engines

    return engines.load(bundle, backend=backend, device=device)


def _mkdir(folder: str | os.PathLike[str] | None, what: str) -> Path | None:
    if folder is None:
        return None
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UBCInputError(f"{path}: cannot create the {what} folder ({exc})") from exc
    return path


@dataclass
class RunPlan:
    """What a run has to do, decided before any case is scored (shared by the single-machine
    and the Ray runner): the archive's cases, those to score, the rows already done, the
    rows to keep when the results file must be rewritten first, and where to write."""

    bundle: Bundle
    cases: list[Case]
    todo: list[Case]
    done: list[CaseResult]
    rewrite: list[CaseResult] | None
    results: ResultsFile
    masks: Path | None
    overlays: Path | None


def plan_run(bundle: str | os.PathLike[str] | Bundle, source: str | os.PathLike[str],
             out: str | os.PathLike[str], *, masks: str | os.PathLike[str] | None = None,
             overlays: str | os.PathLike[str] | None = None, pattern: str | None = None,
             limit: int | None = None, retry_errors: bool = False,
             part: tuple[int, int] | None = None, series_select: str | None = None,
             case_id: str = "study") -> RunPlan:
    """Discover the cases (only part ``part[1]`` of ``part[0]`` when given, see
    ``ubc.scoring.shards``), read the results file, decide what is left (``plan_resume``)
    and create the output folders. ``UBCInputError`` when the run cannot start."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    cases = discover_cases(source, pattern=pattern, limit=limit, series_select=series_select,
                           case_id=case_id)
    if not cases and limit != 0:
        raise UBCInputError(f"{source}: no cases found (file pattern "
                            f"{pattern or DEFAULT_PATTERN!r}); to take every NIfTI file pass "
                            "--pattern '*.nii*'")
    if part is not None:
        from ubc.scoring.shards import select_part

        cases = select_part(cases, *part)
    results = open_results(out)
    todo, done, rewrite = plan_resume(cases, results.read(), bundle_sha256=bundle.weights_sha256,
                                      retry_errors=retry_errors)
    folders = dict(masks=_mkdir(masks, "masks"), overlays=_mkdir(overlays, "overlays"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return RunPlan(bundle=bundle, cases=cases, todo=todo, done=done, rewrite=rewrite,
                   results=results, **folders)


def score_archive(bundle: str | os.PathLike[str] | Bundle, source: str | os.PathLike[str],
                  out: str | os.PathLike[str], *, masks: str | os.PathLike[str] | None = None,
                  overlays: str | os.PathLike[str] | None = None, backend: str = "auto",
                  device: str = "auto", pattern: str | None = None, limit: int | None = None,
                  options: ScoringOptions | None = None, progress: bool = False,
                  engine: Engine | None = None,
                  on_result: Callable[[CaseResult], None] | None = None,
                  part: tuple[int, int] | None = None) -> RunSummary:
    """Score every case of ``source`` (folder tree, path list or CSV manifest; see
    ``discover_cases``) with the bundle and append one row per case to ``out`` (.csv,
    .jsonl or .parquet), resuming where an earlier run into the same ``out`` stopped.

    ``masks``/``overlays``: folders for a NIfTI mask (input grid and affine) and a PNG per
    case. ``engine``: an engine already loaded (the caller closes it); otherwise one is
    loaded with ``backend``/``device`` and closed at the end. ``part``: ``(num_parts,
    part_id)``, score only that deterministic part of the archive (``ubc.scoring.shards``).
    Per-case failures become ``error`` rows; ``UBCInputError``/``BundleError`` mean the run
    could not start (an archive with no case at all is one).
    """
    options = options or ScoringOptions()
    plan = plan_run(bundle, source, out, masks=masks, overlays=overlays, pattern=pattern,
                    limit=limit, retry_errors=options.retry_errors, part=part,
                    series_select=options.series_select, case_id=options.case_id)
    own_engine = engine is None
    engine = engine or _load_engine(plan.bundle, backend, device)
    counts = Counter(r.status for r in plan.done)
    try:
        context = RunContext.create(plan.bundle, engine.backend, engine.precision,
                                    top_k=options.top_k, min_lesion_ml=options.min_lesion_ml,
                                    preprocess_threads=options.preprocess_threads,
                                    masks=plan.masks, overlays=plan.overlays,
                                    dicom_seg=_mkdir(options.dicom_seg, "DICOM SEG"))
        pipeline = Pipeline(engine, context, options.pipeline)
        with recording(plan, counts, progress, on_result) as record:
            stats = pipeline.run(plan.todo, record)
    finally:
        if own_engine:
            engine.close()
    return RunSummary(out=Path(out), cases=len(plan.cases), scored=stats.cases,
                      skipped=len(plan.done), counts=dict(counts),
                      wall_seconds=stats.wall_seconds, stage_seconds=dict(stats.stage_seconds),
                      slices_scored=stats.slices_scored, peak_in_flight=stats.peak_in_flight,
                      backend=engine.backend, precision=engine.precision,
                      batch_size=pipeline.batch_size)


@contextlib.contextmanager
def recording(plan: RunPlan, counts: Counter[str], progress: bool,
              on_result: Callable[[CaseResult], None] | None = None) \
        -> Iterator[Callable[[CaseResult], None]]:
    """Open the plan's results file for appending (rewriting it first when the plan says
    so) and yield ``record(row)``: append the row durably, count it, show it, report it.
    The file and the progress bar are closed on leaving, whatever happened."""
    update, close_bar = _progress(len(plan.todo), progress)
    plan.results.start(plan.rewrite)

    def record(result: CaseResult) -> None:
        plan.results.append(result)
        counts[result.status] += 1
        update(result)
        if on_result is not None:
            on_result(result)

    try:
        yield record
    finally:
        close_bar()
        plan.results.close()
