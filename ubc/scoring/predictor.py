"""``Predictor``: score volumes in memory from any number of threads (or asyncio tasks),
with one batching thread that packs the slices of every waiting request into engine
batches.

    caller threads: source -> load -> preprocess (native, GIL released)  -> submit slices
    batching thread: waits <= max_wait_ms for up to max_batch slices of the waiting requests,
                     runs Engine.infer (the only thread that touches the engine, which is
                     what TensorRT's execution context needs), hands each caller its rows
    caller threads: aggregate own rows -> verdict, per-slice scores, mask -> Prediction

The knobs are named for what they bound, as in Triton and Ray Serve: ``max_batch`` slices
per engine call, ``max_wait_ms`` of queue delay measured from the oldest waiting request,
``max_queue`` slices waiting (beyond it ``predict`` raises ``Overloaded`` at once). A
request larger than a batch spans several; the last one is topped up with other requests'
slices. Every slice's outputs depend on that slice alone, so packing changes no answer
beyond the engine's own batch-size precision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Union

import numpy as np

from ubc.bundle import Bundle
from ubc.engine.base import Engine
from ubc.errors import UBCInputError
from ubc.io import Volume
from ubc.scoring.aggregate import CaseAccumulator
from ubc.scoring.archive import ScoringOptions
from ubc.scoring.batcher import Batcher, BatcherStats, Overloaded, Part
from ubc.scoring.discover import Case, case_id_for
from ubc.scoring.prediction import Prediction
from ubc.scoring.result import ERROR
from ubc.scoring.stages import (
    CaseWork,
    RunContext,
    accumulate,
    batch_size_for,
    finish_case,
    load_case,
    original_grid_mask,
    prepare_case,
)

__all__ = ["Predictor", "Overloaded", "BatcherStats", "Source", "work_for"]

#: what ``predict`` accepts: a NIfTI path, the bytes of a .nii/.nii.gz file, a loaded
#: ``ubc.io.Volume``, or a 3-D array (with ``affine=``)
Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Volume, np.ndarray]
IN_MEMORY = "<in memory>"


def _load_bytes(data: bytes | bytearray | memoryview, name: str) -> Volume:
    """``ubc.io.load_volume_bytes`` (content sniffing, the loader's checks and caps)."""
    from ubc.io import load_volume_bytes

    return load_volume_bytes(data, name=name)


def _volume_from_array(array: np.ndarray, affine: np.ndarray | None, name: str) -> Volume:
    import nibabel as nib

    if affine is None:
        raise ValueError("an array source needs its affine (4 x 4, voxel -> world mm)")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got shape {affine.shape}")
    try:
        raw = nib.Nifti1Image(np.asarray(array), affine).to_bytes()
    except Exception as exc:  # nibabel refuses some dtypes (bool, object, ...)
        raise UBCInputError(f"{name}: cannot store the array as NIfTI "
                            f"({type(exc).__name__}: {exc})") from exc
    return _load_bytes(raw, name)  # the loader's checks and canonical RAS


def work_for(source: Source, context: RunContext, *, case_id: str | None = None,
             affine: np.ndarray | None = None) -> CaseWork:
    """Load and preprocess ``source`` into a case on its way through the stages; a bad
    input file becomes ``work.error`` (never an exception); a bad argument raises
    TypeError/ValueError."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        work, volume = load_case(Case(case_id or case_id_for(path), path))
        return work if volume is None else prepare_case(work, volume, context)
    if isinstance(source, Volume):
        path = source.path or Path(IN_MEMORY)
        return prepare_case(CaseWork(Case(case_id or case_id_for(path), path)), source, context)
    if not isinstance(source, (bytes, bytearray, memoryview, np.ndarray)):
        raise TypeError(f"source must be a path, bytes, a ubc.io.Volume or an array, got "
                        f"{type(source).__name__}")
    # messages name the source "<in memory>", never the case id (it may identify a patient)
    work = CaseWork(Case(case_id or IN_MEMORY, Path(IN_MEMORY)))
    start = time.perf_counter()
    try:
        volume = _volume_from_array(source, affine, IN_MEMORY) \
            if isinstance(source, np.ndarray) else _load_bytes(source, IN_MEMORY)
    except UBCInputError as exc:
        work.fail("load", exc)
        return work
    work.seconds += time.perf_counter() - start
    return prepare_case(work, volume, context)


@dataclass
class _Job:
    work: CaseWork
    slices: np.ndarray
    keep_mask: bool


class Predictor:
    """Score volumes in memory, from any number of threads at once.

    >>> with Predictor("model.ubc") as predictor:            # doctest: +SKIP
    ...     p = predictor.predict("case_flair.nii.gz")        # or bytes, a Volume, an array
    ...     p.p_hgg, p.status, p.mask.shape, p.to_row()

    ``backend``/``device``/``precision``: as in ``ubc.engine.load`` (or pass ``engine``,
    which the caller closes). ``max_batch``: slices per engine call (default: the engine's,
    at most 32); ``max_wait_ms``: how long the batching thread waits for a batch to fill,
    from the oldest waiting request; ``max_queue``: slices waiting at most, beyond which
    ``predict`` raises ``Overloaded``. ``options``: top-k, no-lesion threshold and
    preprocessing threads (its pipeline sizes are not used). ``predict`` raises
    ``UBCInputError`` for a bad input (``Scorer`` and the batch job return error rows).
    """

    def __init__(self, bundle: str | os.PathLike[str] | Bundle, *, backend: str = "auto",
                 device: str = "auto", precision: str = "auto", engine: Engine | None = None,
                 max_batch: int | None = None, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, options: ScoringOptions | None = None) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.options = options or ScoringOptions()
        self._own_engine = engine is None
        if engine is None:
            from ubc import engine as engines

            engine = engines.load(self.bundle, backend=backend, device=device,
                                  precision=precision)
        self.engine = engine
        self.context = RunContext.create(
            self.bundle, engine.backend, engine.precision, top_k=self.options.top_k,
            min_lesion_ml=self.options.min_lesion_ml,
            preprocess_threads=self.options.preprocess_threads)
        self.max_batch = batch_size_for(engine.max_batch, max_batch)
        self.max_wait_ms, self.max_queue = float(max_wait_ms), int(max_queue)
        self._batcher = Batcher(engine, self.max_batch, self.max_wait_ms / 1000.0,
                                 self.max_queue)
        self._closed = False

    # -- the API ----------------------------------------------------------------------------
    def predict(self, source: Source, *, affine: np.ndarray | None = None,
                case_id: str | None = None, mask: bool = True) -> Prediction:
        """Score one volume (see ``Source``; an array needs ``affine``). ``mask``: also
        return the lesion mask in the input's grid (costs one resampling of the volume).
        Raises ``UBCInputError`` for a bad input, ``Overloaded`` when the queue is full."""
        job = self._prepare(source, affine, case_id, mask)
        parts = self._batcher.submit(job.slices).result()
        return self._finish(job, parts)

    async def predict_async(self, source: Source, *, affine: np.ndarray | None = None,
                            case_id: str | None = None, mask: bool = True) -> Prediction:
        """``predict`` for asyncio: loading, preprocessing and the mask run in worker
        threads; waiting for the engine holds no thread."""
        job = await asyncio.to_thread(self._prepare, source, affine, case_id, mask)
        parts = await asyncio.wrap_future(self._batcher.submit(job.slices))
        return await asyncio.to_thread(self._finish, job, parts)

    def check_room(self) -> None:
        """Raise ``Overloaded`` at once when ``max_queue`` slices wait already: a service
        calls it before reading an upload (``predict`` calls it before loading)."""
        self._batcher.check_room()

    def stats(self) -> BatcherStats:
        """The batching thread's counters (mean batch size, queue depth, engine time)."""
        return self._batcher.stats()

    def warm_up(self) -> None:
        """Run one full batch through the engine (not counted in ``stats``)."""
        size = (self.max_batch, 1, *self.context.preprocessing.size)
        self._batcher.submit(np.zeros(size, np.float32), counted=False).result()

    def close(self) -> None:
        """Finish the queued requests, stop the batching thread, close an owned engine."""
        if not self._closed:
            self._closed = True
            self._batcher.close()
            if self._own_engine:
                self.engine.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the caller's side of a request -----------------------------------------------------
    def _prepare(self, source: Source, affine: np.ndarray | None, case_id: str | None,
                 keep_mask: bool) -> _Job:
        if self._closed:
            raise RuntimeError("the predictor is closed")
        self._batcher.check_room()  # refuse before spending a load and a preprocess on it
        work = work_for(source, self.context, case_id=case_id, affine=affine)
        if work.error is not None or work.slices is None:
            raise UBCInputError(work.error or f"{work.case.case_id}: nothing to score")
        slices, work.slices = work.slices, None
        work.accumulator = CaseAccumulator(work.n_scored, self.context.preprocessing.size,
                                           keep_masks=keep_mask)
        return _Job(work, slices, keep_mask)

    def _finish(self, job: _Job, parts: list[Part]) -> Prediction:
        start = time.perf_counter()
        work, context = job.work, self.context
        for first, class_logits, mask_logits, seconds in parts:
            accumulate(work, first, class_logits, mask_logits,
                       job.slices[first:first + len(class_logits), 0], context)
            work.seconds += seconds
        acc, volume = work.accumulator, work.volume
        assert acc is not None and volume is not None
        arrays = dict(slice_indices=work.indices.copy(), slice_area_mm2=acc.area_mm2.copy(),
                      slice_p_hgg=acc.p_hgg.copy())
        mask = None
        if job.keep_mask and acc.complete:
            mask = np.ascontiguousarray(
                volume.to_original_orientation(original_grid_mask(work, context)))
        work.seconds += time.perf_counter() - start
        result = finish_case(work, dataclasses.replace(context, masks=None, overlays=None))
        if result.status == ERROR:
            error = result.error or "unknown failure"
            raise UBCInputError(error) if work.input_fault else RuntimeError(error)
        return Prediction(result, mask=mask, affine=volume.original_affine, **arrays)


