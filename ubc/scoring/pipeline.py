"""The staged scoring pipeline: threads joined by bounded queues, so that reading and
preprocessing the next volumes overlap the engine's work on this batch.

    cases -> [todo] -> loader threads (read, gunzip, nibabel; ``workers`` of them)
          -> [loaded]   -> preprocess thread (native, GIL released; background slices dropped)
          -> [prepared] -> batcher thread (``ubc.scoring.packer``: slices of several cases
                           packed into engine batches, each with the segments that hand
                           every case its rows back)
          -> [batches]  -> engine thread (``Engine.infer``)
          -> [results]  -> the caller's thread: per-case aggregation, masks, overlays, rows

Memory bound (independent of the archive's size), with V the largest volume in memory (as
loaded, plus its compressed bytes while it is decoded), P the largest preprocessed case
(scored slices x H x W x 4 bytes) and B one batch (batch size x H x W x 4 bytes): at most
``workers + prefetch + 1`` volumes, ``prefetch + 2`` preprocessed cases, ``2 * batch_queue
+ 3`` input batches and ``batch_queue + 2`` output batches are alive at once. Cases leave
the engine in order, so the aggregator holds at most one unfinished case plus those ending
in the current batch; with masks or overlays asked for, each keeps 4 bytes per scored pixel
(float16 mask + image), at most K + B in all (K: one case's kept bytes); ``--dicom-seg``
keeps masks as ``--masks`` does. The conformance checks may hold one float32 copy of a
volume in the preprocessing thread (volumes with non-finite or shifted background).
``memory_bound`` computes it. Only the list of cases (a few hundred bytes each) grows with
the archive; a test checks that peak allocation does not otherwise grow with it.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ubc.engine.base import Engine
from ubc.errors import OutputFault
from ubc.scoring.discover import Case
from ubc.scoring.options import PipelineOptions
from ubc.scoring.outputs import OutputSpec
from ubc.scoring.packer import Batch, Inferred, Packer, batch_size_for, infer
from ubc.scoring.result import CaseResult
from ubc.scoring.stages import (
    CaseOutputs,
    Prepared,
    RunContext,
    finish_case,
    hand_back,
    load_case,
    prepare_case,
)

__all__ = ["PipelineOptions", "PipelineStats", "Pipeline", "PipelineError", "memory_bound",
           "max_cases_in_flight", "STAGES"]

STAGES = ("load", "preprocess", "batch", "engine", "aggregate", "write")
_DONE = object()


def memory_bound(options: PipelineOptions, *, volume_bytes: int, case_bytes: int,
                 batch_bytes: int, keep_bytes: int = 0) -> int:
    """Upper bound in bytes of the data the pipeline holds at once (see the module doc).

    ``volume_bytes``: the largest volume (decoded array + compressed file); ``case_bytes``:
    the largest preprocessed case; ``batch_bytes``: one input batch; ``keep_bytes``: what the
    aggregator keeps for the largest case (0 without masks and overlays).
    """
    volumes = options.workers + options.prefetch + 1
    cases = options.prefetch + 2
    batches = (2 * options.batch_queue + 3) + (options.batch_queue + 2)
    kept = keep_bytes + batch_bytes if keep_bytes else 0
    return volumes * volume_bytes + cases * case_bytes + batches * batch_bytes + kept


def max_cases_in_flight(options: PipelineOptions, batch_size: int) -> int:
    """Most cases loaded but not yet reported at once: the volumes and preprocessed cases of
    the bound above, plus the cases whose slices ride in the batches alive (at most one new
    case per slice)."""
    return options.workers + 2 * options.prefetch + 3 \
        + (2 * options.batch_queue + 3) * batch_size


@dataclass
class PipelineStats:
    """What a run did: seconds per stage (busy time, summed over a stage's threads), slices
    sent to the engine, and the most cases alive at once."""

    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    slices_scored: int = 0
    batches: int = 0
    cases: int = 0
    peak_in_flight: int = 0
    wall_seconds: float = 0.0


class PipelineError(RuntimeError):
    """The run stopped on a failure that is not one case's (a bug, a full disk); the rows
    written so far stay valid and a re-run resumes after them."""


class _Stopped(Exception):
    """Raised inside a stage thread when the run is being torn down."""


@dataclass
class _Inferred:
    """A batch on its way from the engine thread to the caller's: the batch, the engine's
    outputs, and the cases whose rows are complete with it (in the order they came)."""

    batch: Batch[CaseOutputs]
    inferred: Inferred


class Pipeline:
    """Score cases with ``engine``; ``run`` calls ``on_result`` once per case, in the
    caller's thread, in completion order."""

    def __init__(self, engine: Engine, context: RunContext,
                 options: PipelineOptions | None = None,
                 outputs: OutputSpec | None = None) -> None:
        self.engine = engine
        self.context = context
        self.options = options or PipelineOptions()
        self.outputs = outputs or OutputSpec()
        self.batch_size = batch_size_for(engine.max_batch, self.options.batch_size)
        self.stats = PipelineStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._crash: BaseException | None = None
        self._in_flight = 0
        o = self.options
        self._todo: queue.Queue[Any] = queue.Queue(maxsize=o.workers)
        self._loaded: queue.Queue[Any] = queue.Queue(maxsize=o.prefetch)
        self._prepared: queue.Queue[Any] = queue.Queue(maxsize=o.prefetch)
        self._batches: queue.Queue[Any] = queue.Queue(maxsize=o.batch_queue)
        self._results: queue.Queue[Any] = queue.Queue(maxsize=o.batch_queue)

    # -- plumbing ---------------------------------------------------------------------------
    def _put(self, q: queue.Queue[Any], item: Any) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _get(self, q: queue.Queue[Any]) -> Any:
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stopped from None

    def _add_time(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.stats.stage_seconds[stage] += seconds

    def _guard(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except _Stopped:
            pass
        except BaseException as exc:  # a bug, not a bad case: stop the run and re-raise
            self._crash = exc
            self._stop.set()

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=self._guard, args=(target, *args),
                                  name=f"ubc-{name}", daemon=True)
        thread.start()
        return thread

    # -- stages -----------------------------------------------------------------------------
    def _feed(self, cases: Iterable[Case]) -> None:
        for case in cases:
            self._put(self._todo, case)
        for _ in range(self.options.workers):
            self._put(self._todo, _DONE)

    def _load(self) -> None:
        while (case := self._get(self._todo)) is not _DONE:
            with self._lock:
                self._in_flight += 1
                self.stats.peak_in_flight = max(self.stats.peak_in_flight, self._in_flight)
            start = time.perf_counter()
            item = load_case(case)
            self._add_time("load", time.perf_counter() - start)
            self._put(self._loaded, item)
            del item
        self._put(self._loaded, _DONE)

    def _preprocess(self) -> None:
        finished = 0
        while finished < self.options.workers:
            loaded = self._get(self._loaded)
            if loaded is _DONE:
                finished += 1
                continue
            start = time.perf_counter()
            prepared = prepare_case(loaded, self.context)
            del loaded  # the voxels go as soon as the slices are made
            self._add_time("preprocess", time.perf_counter() - start)
            self._put(self._prepared, prepared)
            del prepared
        self._put(self._prepared, _DONE)

    def _start(self, prepared: Prepared) -> tuple[CaseOutputs, np.ndarray]:
        """The case's outputs to come and its slices (none when it failed)."""
        slices = prepared.slices
        if slices is None or prepared.failure is not None:
            slices = np.zeros((0, 1, *self.context.preprocessing.size), np.float32)
        record = dataclasses.replace(prepared, slices=None)
        return CaseOutputs.start(record, self.context, self.outputs), slices

    def _batch(self) -> None:
        packer: Packer[CaseOutputs] = Packer(self.batch_size,
                                             (1, *self.context.preprocessing.size))
        while (prepared := self._get(self._prepared)) is not _DONE:
            start = time.perf_counter()
            case, slices = self._start(prepared)
            del prepared
            for batch in packer.add(case, slices):
                self._add_time("batch", time.perf_counter() - start)
                self._put(self._batches, batch)
                start = time.perf_counter()
            del slices
            self._add_time("batch", time.perf_counter() - start)
        last = packer.flush()
        if last is not None:
            self._put(self._batches, last)
        self._put(self._batches, _DONE)

    def _infer(self) -> None:
        while (batch := self._get(self._batches)) is not _DONE:
            inferred = infer(self.engine, batch)
            self._add_time("engine", inferred.seconds)
            self._put(self._results, _Inferred(batch, inferred))
        self._put(self._results, _DONE)

    def _aggregate(self, item: _Inferred, on_result: Callable[[CaseResult], None]) -> None:
        start = time.perf_counter()
        batch = item.batch
        hand_back(batch, item.inferred)
        self.stats.slices_scored += len(batch.array)
        self.stats.batches += len(batch.array) > 0
        for segment in batch.segments:
            if not segment.last:
                continue
            result = finish_case(segment.owner).result
            written = time.perf_counter()
            on_result(result)
            self._add_time("write", time.perf_counter() - written)
            with self._lock:
                self._in_flight -= 1
            self.stats.cases += 1
        self._add_time("aggregate", time.perf_counter() - start)

    def run(self, cases: Iterable[Case], on_result: Callable[[CaseResult], None]) \
            -> PipelineStats:
        """Score every case; returns the stats (also kept in ``self.stats``)."""
        started = time.perf_counter()
        threads = [self._spawn("feed", self._feed, cases)]
        threads += [self._spawn(f"load{i}", self._load) for i in range(self.options.workers)]
        threads += [self._spawn("preprocess", self._preprocess), self._spawn("batch", self._batch),
                    self._spawn("engine", self._infer)]
        try:
            while (batch := self._get(self._results)) is not _DONE:
                self._aggregate(batch, on_result)
        except _Stopped:
            pass
        except Exception as exc:  # e.g. the results file cannot be written (disk full)
            self._crash = self._crash or exc
        finally:
            self._stop.set()
            for thread in threads:  # the engine's batch must end before it may be closed
                thread.join(timeout=None if thread.name == "ubc-engine" else 5.0)
            self.stats.wall_seconds = time.perf_counter() - started
        if self._crash is not None:
            crash = self._crash
            if isinstance(crash, OutputFault):  # the disk, not the pipeline: say so as it is
                raise crash
            raise PipelineError(f"the scoring pipeline stopped ({type(crash).__name__}: "
                                f"{crash})") from crash
        # "aggregate" includes "write"; report them apart
        self.stats.stage_seconds["aggregate"] -= self.stats.stage_seconds["write"]
        return self.stats
