"""``score_archive``: the batch job behind ``ubc-infer``. Discover the cases, skip those the
results file already holds, run the pipeline, append one durable row per case, summarise."""

from __future__ import annotations

import contextlib
import csv
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ubc.atomic import remove_stale_temporaries
from ubc.bundle import Bundle
from ubc.engine.base import Engine
from ubc.errors import OutputFault, UBCInputError
from ubc.scoring.discover import (
    DEFAULT_PATTERN,
    ArchiveSource,
    Case,
    Skipped,
    describe_skipped,
    discover_archive,
)
from ubc.scoring.options import ScoringOptions
from ubc.scoring.outputs import CASE_OUTPUTS, OutputSpec
from ubc.scoring.pipeline import STAGES, Pipeline
from ubc.scoring.result import ERROR, STATUSES, CaseResult
from ubc.scoring.stages import RunContext
from ubc.scoring.writers import ResultsFile, open_results

__all__ = ["ScoringOptions", "RunSummary", "RunPlan", "score_archive", "plan_run",
           "plan_resume", "recording", "count_rows", "file_identity", "output_spec",
           "write_run_outputs", "OUTPUTS_FAILED"]

#: the key of ``RunSummary.counts`` that counts rows whose outputs failed to write
OUTPUTS_FAILED = "outputs_failed"


def count_rows(rows: Iterable[CaseResult]) -> Counter[str]:
    """Rows by status, and by ``OUTPUTS_FAILED`` those with an ``output_error``."""
    counts: Counter[str] = Counter()
    for row in rows:
        counts[row.status] += 1
        if row.output_error is not None:
            counts[OUTPUTS_FAILED] += 1
    return counts


def needs_retry(row: CaseResult) -> bool:
    """A row ``--retry-errors`` scores again: an error, or outputs that failed to write."""
    return row.status == ERROR or row.output_error is not None


@dataclass(frozen=True)
class RunSummary:
    """The closing summary of a run. ``counts``: rows by status over every case of the
    archive (this run's and those already in the results file); ``scored``: rows written by
    this run; ``skipped``: cases found done in the results file; ``skipped_files``: files
    of the archive that look like inputs but are not cases (``ubc.scoring.discover``)."""

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
    skipped_files: tuple[Skipped, ...] = ()

    @property
    def failed(self) -> int:
        """Error rows plus rows whose outputs failed to write (exit 1 when any)."""
        return int(self.counts.get(ERROR, 0)) + int(self.counts.get(OUTPUTS_FAILED, 0))

    @property
    def slices_per_second(self) -> float:
        return self.slices_scored / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def format(self) -> str:
        """Human-readable closing summary (several lines)."""
        counts = ", ".join(f"{s} {self.counts.get(s, 0)}" for s in STATUSES)
        if self.counts.get(OUTPUTS_FAILED):
            counts += f"; outputs failed to write for {self.counts[OUTPUTS_FAILED]} (their " \
                "rows keep the score and say why in output_error; --retry-errors redoes them)"
        stages = ", ".join(f"{s} {self.stage_seconds.get(s, 0.0):.1f}s" for s in STAGES)
        busy = self.stage_seconds.get("engine", 0.0) / self.wall_seconds \
            if self.wall_seconds else 0.0
        passed_over = describe_skipped(self.skipped_files)
        return "\n".join([
            f"{self.cases} cases: {counts} ({self.scored} scored now, {self.skipped} already "
            f"in {self.out})",
            *([f"{passed_over} (--skipped FILE lists them all)"] if passed_over else []),
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
    hold a row with its id and its file's current size + mtime (an ``error`` row, or one
    whose outputs failed to write, too, unless ``retry_errors``). ``rewrite`` is the rows
    to keep when stale or repeated rows must go first, else None. Rows of another model are
    refused (``UBCInputError``)."""
    others = {r.bundle_sha256 for r in existing if r.bundle_sha256 not in (None, bundle_sha256)}
    if others:
        raise UBCInputError(f"the results file holds rows of another model (weights sha256 "
                            f"{sorted(others)[0][:12]}...); choose another --out or delete it")
    latest = {r.case_id: r for r in existing}
    stale: set[str] = set()
    todo, done = [], []
    for case in cases:
        row = latest.get(case.case_id)
        if row is not None and row.identity == case.reader.identity() \
                and not (retry_errors and needs_retry(row)):
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
        state["failed"] += needs_retry(result)
        elapsed = max(time.perf_counter() - state["start"], 1e-9)
        bar.set_postfix_str(f"{state['slices'] / elapsed:.1f} slices/s, "
                            f"failed {state['failed']}", refresh=False)
        bar.update(1)

    return update, bar.close


def _load_engine(bundle: Bundle, backend: str, device: str) -> Engine:
    from ubc import engine as engines

    return engines.load(bundle, backend=backend, device=device)


@dataclass
class RunPlan:
    """What a run has to do, decided before any case is scored (shared by the single-machine
    and the Ray runner): the archive's cases, those to score, the rows already done, the
    rows to keep when the results file must be rewritten first, what to write, and the
    files of the archive that are not cases."""

    bundle: Bundle
    cases: list[Case]
    todo: list[Case]
    done: list[CaseResult]
    rewrite: list[CaseResult] | None
    results: ResultsFile
    outputs: OutputSpec
    skipped: list[Skipped]


def _write_skipped(path: str | os.PathLike[str], skipped: list[Skipped]) -> None:
    """The files passed over as a CSV ``path,reason`` (header included)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows([item.path, item.reason] for item in skipped)


def kept_outputs(todo: list[Case], existing: list[CaseResult], results: Path
                 ) -> dict[str, frozenset[str]]:
    """Per case to score again whose row has an ``output_error``: the outputs that row
    names and that are still on disk (a retry writes only the others)."""
    latest = {r.case_id: r for r in existing}
    kept = {}
    for case in todo:
        row = latest.get(case.case_id)
        if row is None or row.output_error is None or row.status == ERROR:
            continue
        names = frozenset(name for name in CASE_OUTPUTS
                          if (column := getattr(row, f"{name}_file")) is not None
                          and (results.parent / column).is_file())
        if names:
            kept[case.case_id] = names
    return kept


def plan_run(bundle: str | os.PathLike[str] | Bundle,
             source: str | os.PathLike[str] | ArchiveSource, outputs: OutputSpec, *,
             pattern: str | None = None, limit: int | None = None,
             options: ScoringOptions | None = None,
             part: tuple[int, int] | None = None) -> RunPlan:
    """Discover the cases (only part ``part[1]`` of ``part[0]`` when given, see
    ``ubc.scoring.shards``), write the files passed over to ``outputs.skipped`` when asked,
    read the results file, decide what is left (``plan_resume``) and create the output
    folders. ``UBCInputError`` when the run cannot start."""
    options = options or ScoringOptions()
    if outputs.results is None:
        raise ValueError("a batch run needs a results file (OutputSpec.results)")
    outputs.create()  # before anything slow: a folder we cannot write to stops the run now
    for folder in outputs.folders().values():  # what an earlier, killed run left
        remove_stale_temporaries(folder)
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    found = discover_archive(source, pattern=pattern, limit=limit,
                             series_select=options.series_select, case_id=options.case_id)
    cases = found.cases
    if outputs.skipped is not None:
        _write_skipped(outputs.skipped, found.skipped)
    if not cases and limit != 0:
        passed_over = describe_skipped(found.skipped)
        raise UBCInputError(f"{source}: no cases found: no NIfTI (.nii, .nii.gz) or NRRD "
                            "(.nrrd, .nhdr) file whose name matches "
                            f"{pattern or DEFAULT_PATTERN!r} and no DICOM file (by content)"
                            + (f"; {passed_over}" if passed_over else "")
                            + "; to take every volume file pass --pattern "
                            "'*.nii*|*.nrrd|*.nhdr'")
    if part is not None:
        from ubc.scoring.shards import select_part

        cases = select_part(cases, *part)
    results = open_results(outputs.results)
    existing = results.read()
    todo, done, rewrite = plan_resume(cases, existing, bundle_sha256=bundle.weights_sha256,
                                      retry_errors=options.retry_errors)
    outputs = replace(outputs, kept=kept_outputs(todo, existing, outputs.results))
    return RunPlan(bundle=bundle, cases=cases, todo=todo, done=done, rewrite=rewrite,
                   results=results, outputs=outputs, skipped=found.skipped)


def score_archive(bundle: str | os.PathLike[str] | Bundle,
                  source: str | os.PathLike[str] | ArchiveSource,
                  out: str | os.PathLike[str] | OutputSpec, *,
                  masks: str | os.PathLike[str] | None = None,
                  overlays: str | os.PathLike[str] | None = None,
                  dicom_seg: str | os.PathLike[str] | None = None, backend: str = "auto",
                  device: str = "auto", pattern: str | None = None, limit: int | None = None,
                  options: ScoringOptions | None = None, progress: bool = False,
                  engine: Engine | None = None,
                  on_result: Callable[[CaseResult], None] | None = None,
                  part: tuple[int, int] | None = None) -> RunSummary:
    """Score every case of ``source`` (folder tree, path list or CSV manifest, or an
    ``ArchiveSource`` such as a PACS; see ``discover_cases``) with the bundle and append
    one row per case to the results file (.csv, .jsonl or .parquet), resuming where an
    earlier run into the same file stopped.

    ``out``: the results file, or the whole ``OutputSpec``; else ``masks``/``overlays``/
    ``dicom_seg`` name folders for a NIfTI mask (input grid and affine), a PNG and a DICOM
    SEG per case. ``engine``: an engine already loaded (the caller closes it); otherwise one
    is loaded with ``backend``/``device`` and closed at the end. ``part``: ``(num_parts,
    part_id)``, score only that deterministic part of the archive (``ubc.scoring.shards``).
    Per-case failures become ``error`` rows; ``UBCInputError``/``BundleError`` mean the run
    could not start (an archive with no case at all is one). An ``ArchiveSource`` releases
    each case once its row is written (the caller closes it).
    """
    options = options or ScoringOptions()
    if isinstance(source, ArchiveSource):
        on_result = _releasing(source, on_result)
    outputs = output_spec(out, masks=masks, overlays=overlays, dicom_seg=dicom_seg)
    plan = plan_run(bundle, source, outputs, pattern=pattern, limit=limit, options=options,
                    part=part)
    own_engine = engine is None
    engine = engine or _load_engine(plan.bundle, backend, device)
    counts = count_rows(plan.done)
    try:
        context = RunContext.create(plan.bundle, engine.backend, engine.precision,
                                    options.case)
        pipeline = Pipeline(engine, context, options.pipeline, plan.outputs)
        with recording(plan, counts, progress, on_result) as record:
            stats = pipeline.run(plan.todo, record)
    finally:
        if own_engine:
            engine.close()
    write_run_outputs(plan, stats.wall_seconds)
    return RunSummary(out=plan.results.path, cases=len(plan.cases),
                      scored=stats.cases, skipped=len(plan.done), counts=dict(counts),
                      wall_seconds=stats.wall_seconds, stage_seconds=dict(stats.stage_seconds),
                      slices_scored=stats.slices_scored, peak_in_flight=stats.peak_in_flight,
                      backend=engine.backend, precision=engine.precision,
                      batch_size=pipeline.batch_size, skipped_files=tuple(plan.skipped))


def _releasing(source: ArchiveSource, on_result: Callable[[CaseResult], None] | None
               ) -> Callable[[CaseResult], None]:
    """``on_result`` that first lets ``source`` free what the case held (its spool)."""
    def release(result: CaseResult) -> None:
        source.release(result.case_id)
        if on_result is not None:
            on_result(result)

    return release


def write_run_outputs(plan: RunPlan, wall_seconds: float) -> None:
    """The outputs of the whole run, made from every row of the results file (a resumed
    run's too): the report."""
    outputs = plan.outputs
    if outputs.report is not None:
        from ubc.scoring.report import RunInfo, write_report

        write_report(plan.results.read(), outputs.report, overlays=outputs.overlay_folder,
                     masks=outputs.masks, run=RunInfo.now(wall_seconds))


def output_spec(out: str | os.PathLike[str] | OutputSpec, *,
                masks: str | os.PathLike[str] | None = None,
                overlays: str | os.PathLike[str] | None = None,
                dicom_seg: str | os.PathLike[str] | None = None) -> OutputSpec:
    """``out`` when it is a spec already (then the folders must not be given again), else
    the spec of these paths."""
    if not isinstance(out, OutputSpec):
        return OutputSpec.of(out, masks=masks, overlays=overlays, dicom_seg=dicom_seg)
    if (masks, overlays, dicom_seg) != (None, None, None):
        raise ValueError("give the output folders in the OutputSpec or as arguments, "
                         "not both")
    return out


@contextlib.contextmanager
def recording(plan: RunPlan, counts: Counter[str], progress: bool,
              on_result: Callable[[CaseResult], None] | None = None) \
        -> Iterator[Callable[[CaseResult], None]]:
    """Open the plan's results file for appending (rewriting it first when the plan says
    so) and yield ``record(row)``: append the row durably, count it, show it, report it.
    The file and the progress bar are closed on leaving, whatever happened."""
    update, close_bar = _progress(len(plan.todo), progress)
    with _results_fault(plan.results.path):
        plan.results.start(plan.rewrite)

    def record(result: CaseResult) -> None:
        with _results_fault(plan.results.path):
            plan.results.append(result)
        counts.update(count_rows([result]))
        update(result)
        if on_result is not None:
            on_result(result)

    try:
        yield record
    finally:
        close_bar()
        with _results_fault(plan.results.path):
            plan.results.close()


@contextlib.contextmanager
def _results_fault(path: Path) -> Iterator[None]:
    """An ``OSError`` of the results file is the environment's fault (a full disk): the run
    stops with ``OutputFault`` naming ``--out``."""
    try:
        yield
    except OSError as exc:
        raise OutputFault(f"--out {path}: cannot write the results file "
                          f"({exc.strerror or exc})") from exc
