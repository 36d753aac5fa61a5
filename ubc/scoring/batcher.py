"""The batching thread behind ``Predictor``: one queue of requests (each a case's slices),
one thread that packs their rows into engine batches of at most ``max_batch``, waiting at
most ``max_wait_s`` from the oldest waiting request for a batch to fill, and hands each
request its own rows. ``max_queue`` bounds the rows waiting: past it a request is refused
with ``Overloaded`` at once. The thread is the only one that calls the engine."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ubc.engine.base import Engine
from ubc.scoring.packer import Batch, Packer, infer

__all__ = ["Overloaded", "BatcherStats", "Batcher", "Part"]


@dataclass(frozen=True)
class Part:
    """A request's rows of one engine batch: its slices ``first ..``, their class logits
    [n, 2] and mask logits [n, 1, H, W] (copies), and its share of the engine seconds."""

    first: int
    class_logits: np.ndarray
    mask_logits: np.ndarray
    seconds: float


class Overloaded(RuntimeError):
    """The predictor's queue already holds ``max_queue`` slices: retry later (an HTTP
    service answers 503 with Retry-After)."""


@dataclass(frozen=True)
class BatcherStats:
    """Counters of the batching thread since the predictor started (warm-up excluded).

    ``batch_sizes``: engine batches by size; ``mean_batch``: slices per engine call (the
    figure to watch: 1.0 means nothing was packed); ``queue_slices``: slices waiting now;
    ``engine_seconds``: time spent in ``Engine.infer``; ``overloaded``: refused requests.
    """

    requests: int
    batches: int
    slices: int
    queue_slices: int
    engine_seconds: float
    overloaded: int
    batch_sizes: dict[int, int]

    @property
    def mean_batch(self) -> float:
        return self.slices / self.batches if self.batches else 0.0


class _Request:
    def __init__(self, slices: np.ndarray, counted: bool = True) -> None:
        self.slices = slices
        self.counted = counted
        self.sent = 0  # rows handed to the engine so far
        self.parts: list[Part] = []
        self.future: concurrent.futures.Future[list[Part]] = concurrent.futures.Future()
        self.arrived = time.monotonic()


class Batcher:
    """The batching thread and its queue of requests (rows not yet sent)."""

    def __init__(self, engine: Engine, max_batch: int, max_wait_s: float,
                 max_queue: int) -> None:
        self.engine, self.max_batch = engine, max_batch
        self.max_wait_s, self.max_queue = max_wait_s, max_queue
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._pending = 0
        self._closing = False
        self._counts = dict(requests=0, batches=0, slices=0, overloaded=0)
        self._sizes: Counter[int] = Counter()
        self._engine_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="ubc-batcher", daemon=True)
        self._thread.start()

    def _refuse(self) -> Overloaded:
        """Count a refusal and make its exception (called holding the lock)."""
        self._counts["overloaded"] += 1
        return Overloaded(f"{self._pending} slices are waiting (max_queue {self.max_queue}); "
                          "retry later")

    def check_room(self) -> None:
        """Raise ``Overloaded`` (and count it) when ``max_queue`` slices wait already."""
        with self._cond:
            if self._pending >= self.max_queue:
                raise self._refuse()

    def submit(self, slices: np.ndarray, counted: bool = True) \
            -> concurrent.futures.Future[list[Part]]:
        request = _Request(slices, counted)
        with self._cond:
            if self._closing:
                raise RuntimeError("the predictor is closed")
            # a request larger than the whole queue is still taken when nothing waits
            if self._pending and self._pending + len(slices) > self.max_queue:
                raise self._refuse()
            if len(slices) == 0:
                request.future.set_result([])
                return request.future
            self._queue.append(request)
            self._pending += len(slices)
            self._counts["requests"] += counted
            self._cond.notify()
        return request.future

    def stats(self) -> BatcherStats:
        with self._cond:
            return BatcherStats(queue_slices=self._pending, engine_seconds=self._engine_seconds,
                                batch_sizes=dict(sorted(self._sizes.items())), **self._counts)

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> Batch[_Request] | None:
        """Wait for rows, then pack up to ``max_batch`` of them."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            # the tail of a request already under way does not wait for company
            deadline = self._queue[0].arrived + self.max_wait_s
            while self._pending < self.max_batch and not self._closing \
                    and self._queue[0].sent == 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            packer: Packer[_Request] = Packer(self.max_batch, self._queue[0].slices.shape[1:])
            full: list[Batch[_Request]] = []
            room = self.max_batch
            while self._queue and room:
                request = self._queue[0]
                count = min(room, len(request.slices) - request.sent)
                if not request.future.cancelled():
                    rows = request.slices[request.sent:request.sent + count]
                    full += packer.add(request, rows, first=request.sent,
                                       total=len(request.slices))
                    room -= count
                else:
                    count = len(request.slices) - request.sent
                request.sent += count
                self._pending -= count
                if request.sent == len(request.slices):
                    self._queue.popleft()
            # nothing to pack when every waiting request was cancelled
            return full[0] if full else packer.flush() or Batch(packer.empty(), ())

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception as exc:  # every request of this batch fails; the thread goes on
                self._fail(batch, exc)

    def _fail(self, batch: Batch[_Request], exc: BaseException) -> None:
        for segment in batch.segments:  # an exception each: they are raised in many threads
            error = RuntimeError(f"inference failed ({type(exc).__name__}: {exc})")
            error.__cause__ = exc
            _settle(segment.owner.future, error=error)

    def _run(self, batch: Batch[_Request]) -> None:
        if not batch.segments:
            return
        inferred = infer(self.engine, batch)
        if inferred.error is not None or inferred.class_logits is None \
                or inferred.mask_logits is None:
            self._fail(batch, inferred.error or RuntimeError("no engine output"))
            return
        for segment in batch.segments:
            request = segment.owner
            request.parts.append(Part(segment.first,
                                      np.array(segment.rows(inferred.class_logits)),
                                      np.array(segment.rows(inferred.mask_logits)),
                                      batch.share(segment, inferred.seconds)))
            if segment.last:  # batches run in order: the request's earlier rows came back
                _settle(request.future, result=request.parts)
        if any(segment.owner.counted for segment in batch.segments):
            with self._cond:
                self._counts["batches"] += 1
                self._counts["slices"] += len(batch.array)
                self._sizes[len(batch.array)] += 1
                self._engine_seconds += inferred.seconds


def _settle(future: concurrent.futures.Future[Any], *, result: Any = None,
            error: BaseException | None = None) -> None:
    if future.done():  # cancelled by its caller, or already failed
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled in between
