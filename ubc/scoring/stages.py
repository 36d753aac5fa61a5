"""The per-case steps of scoring, shared by the threaded pipeline, ``Scorer``, ``Predictor``
and the Ray tasks, as typed records: ``load_case`` (the case's reader) -> ``Loaded``;
``prepare_case`` (conformance checks, background-only slices dropped, native
preprocessing) -> ``Prepared``; the engine's outputs collected in ``CaseOutputs``;
``finish_case`` (verdict, plausibility, the case's files, its row) -> ``Finished``.

A failure of any step becomes the case's ``Failure`` (the original exception, kept with
the step it happened in) and never an exception: one bad file must not stop an archive.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ubc.bundle import Bundle, Preprocessing
from ubc.errors import OutputFault, UBCInputError, is_environment_fault
from ubc.io import Volume, save_mask
from ubc.io.conformance import Thresholds, check_output, check_volume
from ubc.io.readers import NO_IDENTITY, DicomSeries, Identity
from ubc.provenance import TrainingData, trained_on
from ubc.scoring.aggregate import (
    DEFAULT_MIN_LESION_ML,
    CaseAccumulator,
    Verdict,
    decide,
    p_hgg_of,
)
from ubc.scoring.discover import Case
from ubc.scoring.options import CaseOptions
from ubc.scoring.outputs import CaseFiles, OutputSpec
from ubc.scoring.packer import Batch, Inferred, Segment
from ubc.scoring.result import ERROR, NO_LESION, OK, CaseResult

if TYPE_CHECKING:
    from ubc.io.dicom import InstanceHeader

__all__ = ["RunContext", "Failure", "Loaded", "Prepared", "CaseOutputs", "Finished",
           "load_case", "prepare_case", "hand_back", "finish_case", "original_grid_mask",
           "source_headers"]


@dataclass(frozen=True)
class RunContext:
    """What every case of a run shares: the model's settings and the engine's name."""

    model: str
    bundle_sha256: str
    backend: str
    precision: str
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    top_k: int
    min_lesion_ml: float = DEFAULT_MIN_LESION_ML
    preprocess_threads: int = 1
    conformance: Thresholds = field(default_factory=Thresholds)
    training: TrainingData | None = None  # the bundle's record of its training data

    @classmethod
    def create(cls, bundle: Bundle, backend: str, precision: str,
               options: CaseOptions | None = None) -> RunContext:
        options = options or CaseOptions()
        return cls(model=bundle.name, bundle_sha256=bundle.weights_sha256, backend=backend,
                   precision=precision, preprocessing=bundle.preprocessing,
                   class_names=tuple(bundle.class_names),
                   top_k=bundle.top_k if options.top_k is None else options.top_k,
                   min_lesion_ml=options.min_lesion_ml,
                   preprocess_threads=options.preprocess_threads,
                   training=TrainingData.of_bundle(bundle))

    @property
    def trained_on(self) -> str:
        return trained_on(self.training)

    @property
    def hgg_index(self) -> int:
        names = [n.upper() for n in self.class_names]
        return names.index("HGG") if "HGG" in names else len(names) - 1

    @property
    def pixel_area_mm2(self) -> float:
        return float(self.preprocessing.target_spacing[0] * self.preprocessing.target_spacing[1])


@dataclass(frozen=True)
class Failure:
    """The first failure of a case: the step, the exception it raised, and the row's
    ``error``: an input fault's own words, else the step and the exception's type."""

    step: str
    error: BaseException
    message: str

    @classmethod
    def of(cls, step: str, error: BaseException) -> Failure:
        if isinstance(error, UBCInputError):
            return cls(step, error, str(error))
        return cls(step, error, f"{step} failed ({type(error).__name__}: {error})")


@dataclass(frozen=True)
class Loaded:
    """A case read by its reader: the volume, or the failure."""

    case: Case
    identity: Identity
    volume: Volume | None
    failure: Failure | None
    seconds: float


@dataclass(frozen=True, eq=False)
class Prepared:
    """A case after preprocessing. ``slices`` [S, 1, H, W] float32: the model-ready slices
    holding foreground (axial indices ``indices``), dropped once packed; ``grid``: the
    volume with its voxels dropped (what the mask and the SEG need)."""

    case: Case
    identity: Identity = NO_IDENTITY
    flags: tuple[str, ...] = ()
    grid: Volume | None = None
    slices_total: int | None = None
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    brain_ml: float | None = None
    slices: np.ndarray | None = None
    failure: Failure | None = None
    seconds: float = 0.0

    @property
    def n_scored(self) -> int:
        return len(self.indices)

    def failed(self, step: str, exc: BaseException) -> Prepared:
        """This case failed at ``step`` (a first failure is kept: later ones follow from
        it); its slices are dropped."""
        return dataclasses.replace(self, failure=self.failure or Failure.of(step, exc),
                                   slices=None)


def load_case(case: Case) -> Loaded:
    """Read the case's volume with its reader (canonical RAS)."""
    start = time.perf_counter()
    identity = case.reader.identity()  # unreadable files: the loader names the problem
    try:
        volume, failure = case.reader.load(), None
    except Exception as exc:  # every failure is this case's, see the module docstring
        volume, failure = None, Failure.of("load", exc)
    return Loaded(case, identity, volume, failure, time.perf_counter() - start)


class _SliceForeground:
    """The conformance check's foreground count, kept per axial slice (which slices to
    score) from the one pass of the native core over the data checked."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.counts = np.zeros(0, np.int64)

    def __call__(self, data: np.ndarray) -> int:
        from ubc import preprocess

        self.counts = preprocess.foreground_counts(data, threads=self.threads)
        return int(self.counts.sum())


def prepare_case(loaded: Loaded, context: RunContext) -> Prepared:
    """Check the volume and make the model-ready slices of the slices holding foreground."""
    from ubc import preprocess

    start = time.perf_counter()
    case, volume = loaded.case, loaded.volume
    record = Prepared(case, loaded.identity, flags=case.reader.flags, failure=loaded.failure)
    if volume is None:
        return dataclasses.replace(record, seconds=loaded.seconds)
    prep = context.preprocessing
    try:
        record = dataclasses.replace(record, slices_total=int(volume.data.shape[2]))
        foreground = _SliceForeground(context.preprocess_threads)
        checked = check_volume(volume, target_spacing=prep.target_spacing,
                               name=str(case.image), thresholds=context.conformance,
                               trained=context.training.spacing if context.training else None,
                               foreground=foreground)
        volume = checked.volume
        record = dataclasses.replace(record, flags=record.flags + tuple(checked.flags))
        counts = foreground.counts
        indices = np.flatnonzero(counts)
        if len(indices) == 0:
            raise UBCInputError(f"{case.image}: empty volume (every voxel is 0)")
        try:
            slices = preprocess.slices(
                volume.data, volume.spacing, size=prep.size,
                target_spacing=prep.target_spacing, norm=prep.norm, slice_indices=indices,
                threads=context.preprocess_threads)
        except ValueError as exc:  # the bundle's settings were checked at open: the input's
            raise UBCInputError(f"{case.image}: {exc}") from exc
        record = dataclasses.replace(record, grid=volume.header_only(), indices=indices,
                                     brain_ml=checked.brain_ml, slices=slices)
    except Exception as exc:
        record = record.failed("preprocess", exc)
    seconds = loaded.seconds + time.perf_counter() - start
    return dataclasses.replace(record, seconds=seconds)


class CaseOutputs:
    """A case between the engine and its row: its record (replaced, never changed, when it
    fails), the files it will write, and its engine outputs as batches come back (two
    floats per slice, plus what its files need: float16 mask probabilities and images)."""

    def __init__(self, record: Prepared, context: RunContext, files: CaseFiles, *,
                 keep_masks: bool | None = None,
                 accumulator: CaseAccumulator | None = None) -> None:
        self.record, self.context, self.files = record, context, files
        self._keep_masks = files.keep_masks if keep_masks is None else keep_masks
        self._accumulator = accumulator
        self.seconds = 0.0
        self.stored: str | None = None  # where the SEG was stored (``--store-seg``)

    @property
    def accumulator(self) -> CaseAccumulator:
        """Made when the first outputs come back (the pipeline's memory bound counts it from
        then on)."""
        if self._accumulator is None:
            self._accumulator = CaseAccumulator(
                self.record.n_scored, self.context.preprocessing.size,
                keep_masks=self._keep_masks, keep_images=self.files.keep_images)
        return self._accumulator

    @classmethod
    def start(cls, record: Prepared, context: RunContext, spec: OutputSpec) -> CaseOutputs:
        """The case's outputs to come, with the files ``spec`` asks of it (a SEG only when
        its source is DICOM)."""
        grid = record.grid
        dicom = grid is not None and grid.source_frames is not None
        return cls(record, context, spec.files_for(record.case.case_id, dicom=dicom))

    def fail(self, step: str, exc: BaseException) -> None:
        self.record = self.record.failed(step, exc)

    def take(self, batch: Batch[CaseOutputs], segment: Segment[CaseOutputs],
             inferred: Inferred) -> None:
        """Record this case's rows of a batch's outputs (or the batch's failure)."""
        seconds = batch.share(segment, inferred.seconds)
        if segment.count == 0:
            return
        if inferred.class_logits is None or inferred.mask_logits is None:
            self.seconds += seconds
            if self.record.failure is None:
                self.fail("inference", inferred.error or RuntimeError("no engine output"))
            return
        self.add(segment.first, segment.rows(inferred.class_logits),
                 segment.rows(inferred.mask_logits), segment.rows(batch.array)[:, 0], seconds)

    def add(self, first: int, class_logits: np.ndarray, mask_logits: np.ndarray,
            images: np.ndarray, seconds: float = 0.0) -> None:
        """Record the engine's outputs for the case's slices ``first .. first + n`` (class
        logits [n, 2], mask logits [n, 1, H, W], the engine's input slices [n, H, W]) and
        its share of the engine's seconds."""
        self.seconds += seconds
        if self.record.failure is not None:
            return
        try:
            self.accumulator.add(first, p_hgg_of(class_logits, self.context.hgg_index),
                                 mask_logits, images,
                                 pixel_area_mm2=self.context.pixel_area_mm2)
        except Exception as exc:
            self.fail("aggregate", exc)


def hand_back(batch: Batch[CaseOutputs], inferred: Inferred) -> None:
    """Give every case of the batch its rows of the engine's outputs."""
    for segment in batch.segments:
        segment.owner.take(batch, segment, inferred)


@dataclass(frozen=True)
class Finished:
    """A case's row, its mask in the input's own grid when asked for, and its failure
    (None for ``ok`` and ``no_lesion`` rows)."""

    result: CaseResult
    mask: np.ndarray | None
    failure: Failure | None


def original_grid_mask(outputs: CaseOutputs) -> np.ndarray:
    """The predicted lesion mask, uint8 [X, Y, Z] on the volume's canonical RAS grid, a view
    of the file's own layout (``grid.to_original_orientation`` gives that back)."""
    from ubc import preprocess

    record, acc = outputs.record, outputs.accumulator
    if record.grid is None or acc.mask_prob is None:
        raise RuntimeError(f"{record.case.case_id}: no mask probabilities were kept")
    grid, context = record.grid, outputs.context
    return preprocess.to_original(
        acc.mask_prob, grid.data.shape, grid.spacing,
        target_spacing=context.preprocessing.target_spacing, slice_indices=record.indices,
        threads=context.preprocess_threads, threshold=0.5, out=grid.stored_layout(np.uint8))


def _verdict(outputs: CaseOutputs) -> Verdict:
    record, acc, context = outputs.record, outputs.accumulator, outputs.context
    if not acc.complete:
        raise RuntimeError(f"{record.case.case_id}: {acc.received} of {record.n_scored} "
                           "slices came back from the engine")
    assert record.grid is not None
    return decide(acc.p_hgg, acc.area_mm2, record.indices,
                  slice_thickness_mm=record.grid.spacing[2], top_k=context.top_k,
                  class_names=context.class_names, hgg_index=context.hgg_index,
                  min_lesion_ml=context.min_lesion_ml)


def _implausible(outputs: CaseOutputs, verdict: Verdict) -> None:
    """Flag a predicted lesion too large for the brain; the case becomes an error."""
    record = outputs.record
    flag = check_output(verdict.lesion_volume_ml, record.brain_ml or 0.0,
                        outputs.context.conformance)
    if flag is not None:
        outputs.record = dataclasses.replace(record, flags=record.flags + (flag,))
        raise UBCInputError(f"{record.case.image}: implausible output "
                            f"({flag.split(':', 1)[1]}): the input is probably not a "
                            "skull-stripped FLAIR like the training data; check the flags")


def _write_mask(outputs: CaseOutputs, verdict: Verdict, mask: np.ndarray | None,
                path: Path) -> None:
    assert outputs.record.grid is not None and mask is not None
    save_mask(mask, outputs.record.grid, path)


def source_headers(case: Case) -> tuple[InstanceHeader, ...]:
    """The DICOM instance headers discovery read for ``case`` (none for other inputs, or
    once dropped): what ``write_seg`` need not read again."""
    return case.reader.headers if isinstance(case.reader, DicomSeries) else ()


def _write_seg(outputs: CaseOutputs, verdict: Verdict, mask: np.ndarray | None,
               path: Path) -> None:
    from ubc.io.dicom_seg import write_seg

    grid = outputs.record.grid
    assert grid is not None and grid.source_frames is not None and mask is not None
    write_seg(grid.to_original_orientation(mask), grid.source_frames, path,
              model=outputs.context.model, version=outputs.context.bundle_sha256[:12],
              headers=source_headers(outputs.record.case))


def _write_overlay(outputs: CaseOutputs, verdict: Verdict, mask: np.ndarray | None,
                   path: Path) -> None:
    from ubc.scoring.overlays import write_overlay

    acc, record = outputs.accumulator, outputs.record
    assert acc.images is not None
    write_overlay(path, case_id=record.case.case_id, images=acc.images,
                  mask_prob=acc.mask_prob, slice_indices=record.indices,
                  area_mm2=acc.area_mm2, p_hgg=acc.p_hgg, verdict=verdict)


_WRITERS = {"mask": _write_mask, "seg": _write_seg, "overlay": _write_overlay}


def write_outputs(outputs: CaseOutputs, verdict: Verdict, mask: np.ndarray | None
                  ) -> dict[str, str]:
    """Write the case's files (``CaseFiles.to_write``), each atomically; ``mask``: the
    canonical grid mask when one was made. Returns ``{output: why}`` of those that failed:
    a failed output never discards the score. ``OutputFault`` when the disk or the folder
    is at fault (full, read-only): the run must stop, not fail every case."""
    failed = {}
    for name, path in outputs.files.to_write().items():
        try:
            _WRITERS[name](outputs, verdict, mask, path)
        except Exception as exc:
            if is_environment_fault(exc):
                raise OutputFault(f"{path}: cannot write the case's {name} "
                                  f"({getattr(exc, 'strerror', None) or exc})") from exc
            failed[name] = Failure.of("write", exc).message
    _store_seg(outputs, failed)
    return failed


def _store_seg(outputs: CaseOutputs, failed: dict[str, str]) -> None:
    """Send the case's SEG (written now, or kept from an earlier run: the same file, so
    the node holds one copy) to ``files.store``; a failure goes to ``failed["store"]``."""
    files = outputs.files
    if files.store is None or files.seg is None:
        return
    if "seg" in failed:
        failed["store"] = "no SEG to send (its writing failed)"
        return
    try:
        outputs.stored = files.store.send(files.seg)
    except Exception as exc:  # the node's fault or refusal: the score stays
        failed["store"] = Failure.of("store", exc).message


def finish_case(outputs: CaseOutputs, *, want_mask: bool = False) -> Finished:
    """The case's row; writes its files first (so that a row on disk implies its files are
    there, or says in ``output_error`` which are not). ``want_mask``: also return the mask
    in the input's own grid. ``OutputFault`` (see ``write_outputs``) is raised, not
    recorded."""
    start = time.perf_counter()
    verdict, mask, failed = None, None, {}
    if outputs.record.failure is None:
        try:
            verdict = _verdict(outputs)
            _implausible(outputs, verdict)
            if want_mask or {"mask", "seg"} & outputs.files.to_write().keys():
                mask = original_grid_mask(outputs)
        except Exception as exc:
            outputs.fail("aggregate", exc)
    if outputs.record.failure is None and verdict is not None:
        failed = write_outputs(outputs, verdict, mask)
    record = outputs.record
    seconds = record.seconds + outputs.seconds + time.perf_counter() - start
    result = _result(record, verdict, outputs.context, seconds, outputs.files, failed,
                     outputs.stored)
    if want_mask and mask is not None and record.grid is not None and record.failure is None:
        mask = np.ascontiguousarray(record.grid.to_original_orientation(mask))
    else:
        mask = None
    return Finished(result, mask, record.failure)


def _with_files(row: CaseResult, files: CaseFiles, failed: dict[str, str],
                stored: str | None) -> CaseResult:
    """``row`` with its ``<output>_file`` columns (empty for an output that failed), its
    ``output_error`` and where its SEG was stored."""
    def named(name: str) -> str | None:
        return None if name in failed else files.named(name)

    error = "; ".join(f"{name}: {why.replace(';', ',')}" for name, why in failed.items())
    return dataclasses.replace(row, mask_file=named("mask"), seg_file=named("seg"),
                               overlay_file=named("overlay"), output_error=error or None,
                               seg_stored=stored)


def _result(record: Prepared, verdict: Verdict | None, context: RunContext,
            seconds: float, files: CaseFiles, failed: dict[str, str],
            stored: str | None) -> CaseResult:
    failure = record.failure
    row = CaseResult(case_id=record.case.case_id, path=str(record.case.image), status=ERROR,
                     error=failure.message if failure is not None else "unknown failure",
                     slices_total=record.slices_total, model=context.model,
                     bundle_sha256=context.bundle_sha256, backend=context.backend,
                     trained_on=context.trained_on,
                     precision=context.precision, seconds=round(seconds, 6),
                     input_bytes=record.identity[0], input_mtime_ns=record.identity[1],
                     input_digest=record.identity[2],
                     flags=";".join(f.replace(";", ",") for f in record.flags) or None,
                     **dataclasses.asdict(record.case.reader.columns()))
    if failure is not None or verdict is None:
        return row
    return _with_files(dataclasses.replace(
        row, status=NO_LESION if verdict.no_lesion else OK, error=None, p_hgg=verdict.p_hgg,
        predicted_class=verdict.predicted_class, lesion_volume_ml=verdict.lesion_volume_ml,
        slices_scored=record.n_scored, slices_used=verdict.slices_used), files, failed,
        stored)

