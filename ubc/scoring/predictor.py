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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Union

import numpy as np

from ubc.bundle import Bundle
from ubc.engine.base import Engine
from ubc.io import Volume
from ubc.io.readers import IN_MEMORY, ArrayVolume, LoadedVolume, VolumeBytes
from ubc.scoring.batcher import Batcher, BatcherStats, Overloaded, Part
from ubc.scoring.discover import Case, case_id_for
from ubc.scoring.options import CaseOptions
from ubc.scoring.outputs import CaseFiles
from ubc.scoring.packer import batch_size_for
from ubc.scoring.prediction import Prediction
from ubc.scoring.stages import CaseOutputs, RunContext, finish_case, load_case, prepare_case

__all__ = ["Predictor", "Overloaded", "BatcherStats", "Source", "case_for"]

#: what ``predict`` accepts: a NIfTI or NRRD path, the bytes of a .nii/.nii.gz file, a
#: loaded ``ubc.io.Volume``, a 3-D array (with ``affine=``), or a ``Case`` with its reader
#: (a DICOM study: ``ubc.io.readers.DicomSeries``)
Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Volume, np.ndarray, Case]


def case_for(source: Source, *, case_id: str | None = None,
             affine: np.ndarray | None = None) -> Case:
    """The case of an in-memory API's ``source``, with the reader of its kind; a bad
    argument raises TypeError/ValueError (a bad input fails when the case is loaded)."""
    if isinstance(source, Case):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return Case(case_id or case_id_for(path), path)
    if isinstance(source, Volume):
        path = source.path or Path(IN_MEMORY)
        return Case(case_id or case_id_for(path), path, reader=LoadedVolume(source))
    # messages name the source "<in memory>", never the case id (it may identify a patient)
    memory = Path(IN_MEMORY)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Case(case_id or IN_MEMORY, memory, reader=VolumeBytes(source))
    if not isinstance(source, np.ndarray):
        raise TypeError(f"source must be a path, bytes, a ubc.io.Volume or an array, got "
                        f"{type(source).__name__}")
    if affine is None:
        raise ValueError("an array source needs its affine (4 x 4, voxel -> world mm)")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got shape {affine.shape}")
    return Case(case_id or IN_MEMORY, memory, reader=ArrayVolume(source, affine))


@dataclass
class _Job:
    outputs: CaseOutputs
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
    preprocessing threads. ``predict`` raises the exception of a case's failure:
    ``UBCInputError`` for a bad input (``Scorer`` and the batch job return error rows).
    """

    def __init__(self, bundle: str | os.PathLike[str] | Bundle, *, backend: str = "auto",
                 device: str = "auto", precision: str = "auto", engine: Engine | None = None,
                 max_batch: int | None = None, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, options: CaseOptions | None = None) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.options = options or CaseOptions()
        self._own_engine = engine is None
        if engine is None:
            from ubc import engine as engines

            engine = engines.load(self.bundle, backend=backend, device=device,
                                  precision=precision)
        self.engine = engine
        self.context = RunContext.create(self.bundle, engine.backend, engine.precision,
                                         self.options)
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
        case = case_for(source, case_id=case_id, affine=affine)
        prepared = prepare_case(load_case(case), self.context)
        if prepared.failure is not None or prepared.slices is None:
            raise prepared.failure.error if prepared.failure is not None \
                else RuntimeError(f"{case.case_id}: nothing to score")
        outputs = CaseOutputs(dataclasses.replace(prepared, slices=None), self.context,
                              CaseFiles(), keep_masks=keep_mask)
        return _Job(outputs, prepared.slices, keep_mask)

    def _finish(self, job: _Job, parts: list[Part]) -> Prediction:
        outputs = job.outputs
        for part in parts:
            rows = job.slices[part.first:part.first + len(part.class_logits)]
            outputs.add(part.first, part.class_logits, part.mask_logits, rows[:, 0],
                        part.seconds)
        finished = finish_case(outputs, want_mask=job.keep_mask)
        if finished.failure is not None:
            raise finished.failure.error
        acc, grid = outputs.accumulator, outputs.record.grid
        assert grid is not None
        return Prediction(finished.result, mask=finished.mask, affine=grid.original_affine,
                          slice_indices=outputs.record.indices.copy(),
                          slice_area_mm2=acc.area_mm2.copy(), slice_p_hgg=acc.p_hgg.copy())
