"""The per-case steps of scoring, shared by the threaded pipeline and ``Scorer``: load
(a NIfTI file or a DICOM study's chosen series), preprocess (conformance checks first, then
background-only slices dropped), and finish (verdict, plausibility, mask, DICOM SEG,
overlay, row).

A failure of any step becomes the case's ``error`` and never an exception: one bad file must
not stop an archive.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ubc.bundle import Bundle, Preprocessing
from ubc.errors import UBCInputError
from ubc.io import Volume, load_volume, save_mask
from ubc.io.conformance import Thresholds, check_output, check_volume
from ubc.scoring.aggregate import (
    DEFAULT_MIN_LESION_ML,
    CaseAccumulator,
    Verdict,
    background_as_no_lesion,
    decide,
    slice_scores,
)
from ubc.scoring.discover import Case, case_identity, safe_path
from ubc.scoring.result import ERROR, NO_LESION, OK, CaseResult

__all__ = ["RunContext", "CaseWork", "load_case", "prepare_case", "accumulate", "finish_case",
           "original_grid_mask", "batch_size_for"]

#: slices per engine call when the caller does not say: more buys no speed on the CPU
#: runtimes and costs memory (bench/RESULTS.md, batches 8 and 32)
MAX_BATCH = 32


def batch_size_for(engine_max_batch: int, requested: int | None = None) -> int:
    """Slices per engine call: ``requested``, else the engine's max_batch, at most
    ``MAX_BATCH``."""
    return requested or min(engine_max_batch, MAX_BATCH)


@dataclass(frozen=True)
class RunContext:
    """What every case of a run shares: the model's settings, the engine, where to write."""

    model: str
    bundle_sha256: str
    backend: str
    precision: str
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    top_k: int
    min_lesion_ml: float = DEFAULT_MIN_LESION_ML
    masks: Path | None = None
    overlays: Path | None = None
    preprocess_threads: int = 1
    dicom_seg: Path | None = None
    conformance: Thresholds = field(default_factory=Thresholds)

    @classmethod
    def create(cls, bundle: Bundle, backend: str, precision: str, *, top_k: int | None = None,
               **options: object) -> RunContext:
        return cls(model=bundle.name, bundle_sha256=bundle.weights_sha256, backend=backend,
                   precision=precision, preprocessing=bundle.preprocessing,
                   class_names=tuple(bundle.class_names),
                   top_k=bundle.top_k if top_k is None else top_k, **options)  # type: ignore[arg-type]

    @property
    def hgg_index(self) -> int:
        names = [n.upper() for n in self.class_names]
        return names.index("HGG") if "HGG" in names else len(names) - 1

    @property
    def pixel_area_mm2(self) -> float:
        return float(self.preprocessing.target_spacing[0] * self.preprocessing.target_spacing[1])


class CaseWork:
    """One case on its way through the stages (internal, mutable, owned by one stage at a
    time). The volume's voxels are dropped once its slices are made."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.identity: tuple[int | None, int | None, str | None] = (None, None, None)
        self.flags: list[str] = list(case.study.flags) if case.study is not None else []
        self.sources: list[tuple[Path, int]] | None = None  # DICOM: file, frame per slice
        self.brain_ml: float | None = None
        self.volume: Volume | None = None
        self.slices_total: int | None = None
        self.indices = np.zeros(0, dtype=np.int64)
        self.slices: np.ndarray | None = None
        self.accumulator: CaseAccumulator | None = None
        self.error: str | None = None
        #: the error is the input's fault (a UBCInputError), not a step's (engine, bug)
        self.input_fault = False
        self.seconds = 0.0

    @property
    def n_scored(self) -> int:
        return len(self.indices)

    def fail(self, step: str, exc: BaseException) -> None:
        """Record the first failure of this case (later ones are consequences)."""
        if self.error is None:
            self.input_fault = isinstance(exc, UBCInputError)
            self.error = str(exc) if self.input_fault else \
                f"{step} failed ({type(exc).__name__}: {exc})"
        self.slices = None
        self.volume = None


def _header_only(volume: Volume) -> Volume:
    """The volume with its voxels replaced by a zero-byte view of the same shape."""
    empty = np.broadcast_to(np.zeros((), dtype=np.uint8), volume.data.shape)
    return dataclasses.replace(volume, data=empty)


def _load_dicom(work: CaseWork) -> Volume:
    from ubc.io.dicom import load_series

    study = work.case.study
    assert study is not None
    if study.error is not None or study.chosen is None:
        raise UBCInputError(study.error or f"{work.case.image}: no series chosen")
    volume, work.sources = load_series(study.chosen.files, name=f"{study.folder} series "
                                       f"{study.chosen.summary()}")
    return volume


def load_case(case: Case) -> tuple[CaseWork, Volume | None]:
    """Read the case's volume (canonical RAS); ``None`` and ``work.error`` on failure."""
    start = time.perf_counter()
    work = CaseWork(case)
    volume = None
    work.identity = case_identity(case)  # unreadable files: the loader names the problem
    try:
        volume = _load_dicom(work) if case.study is not None else load_volume(case.image)
    except Exception as exc:  # every failure is this case's, see the module docstring
        work.fail("load", exc)
    work.seconds += time.perf_counter() - start
    return work, volume


def prepare_case(work: CaseWork, volume: Volume, context: RunContext) -> CaseWork:
    """Make the model-ready slices [S, 1, H, W] of the slices holding any foreground."""
    from ubc import preprocess

    start = time.perf_counter()
    prep = context.preprocessing
    try:
        work.slices_total = int(volume.data.shape[2])
        checked = check_volume(volume, target_spacing=prep.target_spacing,
                               name=str(work.case.image), thresholds=context.conformance)
        volume = checked.volume
        work.flags.extend(checked.flags)
        counts = preprocess.foreground_counts(volume.data, threads=context.preprocess_threads)
        work.brain_ml = float(counts.sum()) * float(np.prod(volume.spacing)) / 1000.0
        indices = np.flatnonzero(counts)
        if len(indices) == 0:
            raise UBCInputError(f"{work.case.image}: empty volume (every voxel is 0)")
        work.slices = preprocess.slices(
            volume.data, volume.spacing, size=prep.size, target_spacing=prep.target_spacing,
            norm=prep.norm, slice_indices=indices, threads=context.preprocess_threads)
        work.indices = indices
        work.volume = _header_only(volume)
    except Exception as exc:
        work.fail("preprocess", exc)
    work.seconds += time.perf_counter() - start
    return work


def accumulate(work: CaseWork, start: int, class_logits: np.ndarray, mask_logits: np.ndarray,
               images: np.ndarray, context: RunContext) -> None:
    """Record engine outputs for the case's scored slices ``start .. start + len``
    (``images``: the engine's input slices [n, H, W])."""
    if work.accumulator is None:
        keep_images = context.overlays is not None
        work.accumulator = CaseAccumulator(
            work.n_scored, context.preprocessing.size,
            keep_masks=keep_images or context.masks is not None or context.dicom_seg is not None,
            keep_images=keep_images)
    lesion_logits = background_as_no_lesion(mask_logits, images)
    p_hgg, area = slice_scores(class_logits, lesion_logits, hgg_index=context.hgg_index,
                               pixel_area_mm2=context.pixel_area_mm2)
    work.accumulator.add(start, p_hgg, area, lesion_logits, images)


def original_grid_mask(work: CaseWork, context: RunContext) -> np.ndarray:
    """The predicted lesion mask, uint8 [X, Y, Z] on the volume's canonical RAS grid
    (``work.volume.to_original_orientation`` maps it to the file's own axes). Needs the
    case's mask probabilities (``keep_masks``) and its header (``work.volume``)."""
    from ubc import preprocess

    if work.volume is None or work.accumulator is None or work.accumulator.mask_prob is None:
        raise RuntimeError(f"{work.case.case_id}: no mask probabilities were kept")
    volume = work.volume
    prob = preprocess.to_original(
        work.accumulator.mask_prob.astype(np.float32), volume.data.shape, volume.spacing,
        target_spacing=context.preprocessing.target_spacing, slice_indices=work.indices,
        threads=context.preprocess_threads)
    return (prob > 0.5).astype(np.uint8)


def _write_masks(work: CaseWork, context: RunContext, path: Path | None,
                 seg_path: Path | None) -> None:
    """The NIfTI mask at ``path`` and the DICOM SEG at ``seg_path`` (either may be None)."""
    assert work.volume is not None
    mask = original_grid_mask(work, context)
    if path is not None:
        save_mask(mask, work.volume, path)
    if seg_path is not None:
        from ubc.io.dicom_seg import write_seg

        assert work.sources is not None
        stored = work.volume.to_original_orientation(mask)
        write_seg(stored, work.sources, seg_path, model=context.model,
                  version=context.bundle_sha256[:12])


def _implausible(work: CaseWork, verdict: Verdict, context: RunContext) -> None:
    """Flag a predicted lesion too large for the brain; the case becomes an error."""
    flag = check_output(verdict.lesion_volume_ml, work.brain_ml or 0.0, context.conformance)
    if flag is not None:
        work.flags.append(flag)
        raise UBCInputError(f"{work.case.image}: implausible output ({flag.split(':', 1)[1]}): "
                            "the input is probably not a skull-stripped FLAIR like the "
                            "training data; check the flags")


def _write_overlay(work: CaseWork, verdict: Verdict, path: Path) -> None:
    from ubc.scoring.overlays import write_overlay

    acc = work.accumulator
    assert acc is not None and acc.images is not None
    write_overlay(path, case_id=work.case.case_id,
                  images=acc.images, mask_prob=acc.mask_prob, slice_indices=work.indices,
                  area_mm2=acc.area_mm2, p_hgg=acc.p_hgg, verdict=verdict)


def _verdict(work: CaseWork, context: RunContext) -> Verdict:
    acc = work.accumulator
    if acc is None or not acc.complete:
        raise RuntimeError(f"{work.case.case_id}: {0 if acc is None else acc.received} of "
                           f"{work.n_scored} slices came back from the engine")
    assert work.volume is not None
    return decide(acc.p_hgg, acc.area_mm2, work.indices,
                  slice_thickness_mm=work.volume.spacing[2], top_k=context.top_k,
                  class_names=context.class_names, hgg_index=context.hgg_index,
                  min_lesion_ml=context.min_lesion_ml)


def finish_case(work: CaseWork, context: RunContext, *, mask_path: Path | None = None,
                overlay_path: Path | None = None) -> CaseResult:
    """The case's row; writes its mask and overlay first when asked (so that a row on disk
    implies its files are there). Paths default to the context's folders + the safe name of
    the case id."""
    start = time.perf_counter()
    verdict = None
    case_id = work.case.case_id
    if mask_path is None and context.masks is not None:
        mask_path = safe_path(context.masks, case_id, ".nii.gz")
    if overlay_path is None and context.overlays is not None:
        overlay_path = safe_path(context.overlays, case_id, ".png")
    seg_path = None
    if context.dicom_seg is not None and work.sources is not None:
        seg_path = safe_path(context.dicom_seg, case_id, ".dcm")
    if work.error is None:
        try:
            verdict = _verdict(work, context)
            _implausible(work, verdict, context)
            if mask_path is not None or seg_path is not None:
                _write_masks(work, context, mask_path, seg_path)
            if overlay_path is not None:
                _write_overlay(work, verdict, overlay_path)
        except Exception as exc:
            work.fail("aggregate" if verdict is None else "write", exc)
    work.seconds += time.perf_counter() - start
    result = _result(work, verdict, context)
    work.accumulator = None
    work.volume = None
    return result


def _with_inputs(row: CaseResult, work: CaseWork) -> CaseResult:
    """``row`` with the input's digest, the flags and the DICOM study/series columns."""
    study = work.case.study
    chosen = study.chosen if study is not None else None
    return dataclasses.replace(
        row, input_digest=work.identity[2] if len(work.identity) > 2 else None,
        flags=";".join(f.replace(";", ",") for f in work.flags) or None,
        study_uid=(study.study_uid or None) if study is not None else None,
        series_uid=chosen.series_uid if chosen is not None else None,
        series_description=chosen.description if chosen is not None else None)


def _result(work: CaseWork, verdict: Verdict | None, context: RunContext) -> CaseResult:
    base = CaseResult(case_id=work.case.case_id, path=str(work.case.image), status=ERROR,
                      error=work.error or "unknown failure", slices_total=work.slices_total,
                      model=context.model, bundle_sha256=context.bundle_sha256,
                      backend=context.backend, precision=context.precision,
                      seconds=round(work.seconds, 6), input_bytes=work.identity[0],
                      input_mtime_ns=work.identity[1])
    base = _with_inputs(base, work)
    if work.error is not None or verdict is None:
        return base
    return dataclasses.replace(
        base, status=NO_LESION if verdict.no_lesion else OK, error=None, p_hgg=verdict.p_hgg,
        predicted_class=verdict.predicted_class, lesion_volume_ml=verdict.lesion_volume_ml,
        slices_scored=work.n_scored, slices_used=verdict.slices_used)
