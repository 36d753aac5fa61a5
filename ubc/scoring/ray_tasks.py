"""The worker side of ``ubc-infer --ray`` (see ``ubc.scoring.ray_runner``): the load task,
the engine actor and the finish task, all built on the per-case steps of
``ubc.scoring.stages``, and how a case's state travels between them. Imports no Ray."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ubc.bundle import Bundle
from ubc.engine.base import Engine
from ubc.io import Volume
from ubc.io.readers import DicomSeries
from ubc.scoring.aggregate import CaseAccumulator
from ubc.scoring.discover import Case
from ubc.scoring.outputs import OutputSpec
from ubc.scoring.packer import Batch, Packer, batch_size_for, infer
from ubc.scoring.stages import (
    CaseOutputs,
    Failure,
    Prepared,
    RunContext,
    finish_case,
    hand_back,
    load_case,
    prepare_case,
)

__all__ = ["EngineActor", "load_and_prepare", "finish", "TIMES"]


# --- what travels: a case's record without slices or voxels, converted explicitly ---------
def _portable(failure: Failure | None) -> Failure | None:
    """The failure with an exception that survives pickling (its row's message is kept)."""
    if failure is None:
        return None
    try:
        pickle.loads(pickle.dumps(failure.error))
    except Exception:  # an exception type that cannot be rebuilt from its args
        return dataclasses.replace(failure, error=RuntimeError(failure.message))
    return failure


def _record_to_wire(record: Prepared) -> dict[str, Any]:
    """The record without its slices, its grid as header fields (the next stages need no
    voxels: the verdict and the mask's grid come from the header), a DICOM study without
    the instance headers its loading used."""
    grid = record.grid
    header = None if grid is None else (
        tuple(grid.data.shape),
        {f.name: getattr(grid, f.name) for f in dataclasses.fields(grid) if f.name != "data"})
    case = record.case
    if isinstance(case.reader, DicomSeries):  # its series is loaded: the headers are done
        case = dataclasses.replace(case, reader=DicomSeries(case.reader.study.without_headers()))
    bare = dataclasses.replace(record, case=case, grid=None, slices=None,
                               failure=_portable(record.failure))
    return {"record": bare, "header": header}


def _record_from_wire(wire: dict[str, Any]) -> Prepared:
    record: Prepared = wire["record"]
    if wire["header"] is None:
        return record
    shape, fields = wire["header"]
    voxels = np.broadcast_to(np.zeros((), np.uint8), shape)  # as prepare_case leaves it
    return dataclasses.replace(record, grid=Volume(data=voxels, **fields))


def _dump(record: Prepared, **extra: Any) -> bytes:
    return pickle.dumps({**_record_to_wire(record), **extra})


def _load(blob: bytes) -> tuple[Prepared, dict[str, Any]]:
    """The inverse of ``_dump``: the record and the extra values."""
    meta = pickle.loads(blob)
    return _record_from_wire(meta), {k: v for k, v in meta.items()
                                     if k not in ("record", "header")}


def load_and_prepare(row: dict[str, Any], *, cases: list[Case],
                     context: RunContext) -> dict[str, Any]:
    """CPU task 1 (one case, ``row["index"]`` into ``cases``): its slices [S, 1, H, W] and
    its record. Never raises for a bad case (the steps turn failures into its failure)."""
    loaded = load_case(cases[int(row["index"])])
    load_s = loaded.seconds
    prepared = prepare_case(loaded, context)
    del loaded
    slices = prepared.slices if prepared.slices is not None else \
        np.zeros((0, 1, *context.preprocessing.size), np.float32)
    return {"work": _dump(prepared, load_s=load_s, prep_s=prepared.seconds - load_s),
            "slices": slices}
#: the seconds and counts each row carries to the driver (its RunSummary); ``actor_s``: the
#: actor's own work besides the engine (unpacking, packing batches, accumulating), as CPU
#: seconds of its thread (what sizing needs: its wall time counts the waits of a busy host)
TIMES = ("load_s", "prep_s", "engine_s", "actor_s", "finish_s", "slices", "batch")


#: the accumulator's per-pixel arrays, which leave the actor as columns of their own
PIXEL_ARRAYS = ("mask_prob", "images")


def _pixel_columns(cases: list[CaseOutputs], size: tuple[int, int]
                   ) -> dict[str, np.ndarray]:
    """Each case's float16 [S, H, W] mask probabilities and images as columns (no rows where
    it keeps none): Ray stores them as they are, where pickling them into the record would
    copy them once more."""
    columns = {}
    for name in PIXEL_ARRAYS:
        column = np.empty(len(cases), dtype=object)
        for i, case in enumerate(cases):
            kept = None if case.record.failure else getattr(case.accumulator, name)
            column[i] = np.zeros((0, *size), np.float16) if kept is None else kept
        columns[name] = column
    return columns


def _without_pixels(case: CaseOutputs) -> dict[str, Any]:
    """The case's accumulator as it travels in its record: a shallow copy without the
    per-pixel arrays, and the names of those it kept (None for a failed case)."""
    if case.record.failure:
        return {"accumulator": None, "pixels": ()}
    bare = copy.copy(case.accumulator)
    for name in PIXEL_ARRAYS:
        setattr(bare, name, None)
    return {"accumulator": bare, "pixels": tuple(
        n for n in PIXEL_ARRAYS if getattr(case.accumulator, n) is not None)}


def _with_pixels(meta: dict[str, Any], row: dict[str, Any]) -> CaseAccumulator | None:
    """The inverse of ``_without_pixels``, the arrays taken from the row's columns."""
    accumulator = meta["accumulator"]
    for name in meta["pixels"]:
        setattr(accumulator, name, row[name])
    return accumulator


def finish(row: dict[str, Any], *, context: RunContext) -> dict[str, Any]:
    """CPU task 3 (one case): verdict, mask, overlay, SEG (``finish_case``, atomic writes)
    and the row as JSON, with the seconds of each stage."""
    record, meta = _load(row["work"])
    start = time.perf_counter()
    context = dataclasses.replace(context, backend=meta["backend"], precision=meta["precision"])
    outputs = CaseOutputs(record, context, meta["files"], accumulator=_with_pixels(meta, row))
    outputs.seconds = meta["engine_share_s"]
    result = finish_case(outputs).result
    meta["finish_s"] = time.perf_counter() - start
    return {"row": json.dumps(result.to_row(), allow_nan=False),
            **{k: meta[k] for k in TIMES}}


# --- the engine actor ---------------------------------------------------------------------
class EngineActor:
    """One engine, loaded once per actor; ``__call__`` runs a Ray Data batch of prepared
    cases through it (their slices packed into engine batches) and accumulates each case's
    outputs; what leaves is each case's record with its accumulator (two floats per slice,
    plus float16 mask probabilities and images when its files need them)."""

    def __init__(self, bundle: str, backend: str, device: str, batch_size: int | None,
                 threads: int | None, context: RunContext, outputs: OutputSpec,
                 engine: Engine | None = None) -> None:
        from ubc import engine as engines

        options: dict[str, Any] = {} if threads is None else {"threads": threads}
        self.engine = engine or engines.load(Bundle(bundle), backend=backend, device=device,
                                             **options)
        self.context = dataclasses.replace(context, backend=self.engine.backend,
                                           precision=self.engine.precision)
        self.outputs = outputs
        self.batch_size = batch_size_for(self.engine.max_batch, batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.thread_time()
        items = [_load(blob) for blob in batch["work"]]
        cases = [CaseOutputs.start(record, self.context, self.outputs) for record, _ in items]
        engine_s = engine_cpu_s = 0.0
        for packed in self._packed(cases, batch["slices"]):
            seconds, cpu_s = self._run(packed)
            engine_s, engine_cpu_s = engine_s + seconds, engine_cpu_s + cpu_s
        scored = sum(case.record.n_scored for case in cases if case.record.failure is None)
        share = (time.thread_time() - start - engine_cpu_s) / max(len(cases), 1)
        blobs = [_dump(case.record, **meta, files=case.files,
                       **_without_pixels(case),
                       engine_share_s=case.seconds,
                       engine_s=engine_s * case.record.n_scored / max(scored, 1),
                       actor_s=share,
                       slices=case.record.n_scored if case.record.failure is None else 0,
                       batch=self.batch_size, backend=self.engine.backend,
                       precision=self.engine.precision)
                 for case, (_, meta) in zip(cases, items, strict=True)]
        return {"work": np.array(blobs, dtype=object),
                **_pixel_columns(cases, self.context.preprocessing.size)}

    def _packed(self, cases: list[CaseOutputs], slices: np.ndarray
                ) -> Iterator[Batch[CaseOutputs]]:
        """The engine batches of the cases' slices (failed cases have none)."""
        packer: Packer[CaseOutputs] = Packer(self.batch_size,
                                             (1, *self.context.preprocessing.size))
        for case, rows in zip(cases, slices, strict=True):
            if case.record.failure is None:
                yield from packer.add(case, np.asarray(rows, np.float32).reshape(
                    -1, 1, *rows.shape[-2:]))
        last = packer.flush()
        if last is not None:
            yield last

    def _run(self, packed: Batch[CaseOutputs]) -> tuple[float, float]:
        """Infer one packed batch and hand its cases their rows: the engine's seconds, and
        this thread's CPU seconds in the engine."""
        cpu = time.thread_time()
        inferred = infer(self.engine, packed)
        cpu_s = time.thread_time() - cpu
        hand_back(packed, inferred)
        return (inferred.seconds if inferred.error is None else 0.0), cpu_s
