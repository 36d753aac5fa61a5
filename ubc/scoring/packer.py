"""The one packer of slices into engine batches, and the one place in ``ubc.scoring`` that
calls ``Engine.infer``. The threaded pipeline, ``Predictor``'s batching thread, the Ray
engine actors and ``Scorer`` all pack with it.

Slices of several owners (cases, requests) are copied into batches of at most
``batch_size`` rows, except that a whole batch of one owner's contiguous float32 slices is a
view of them (no copy: the owner must not change its slices while the batch is in flight);
each batch carries a ``Segment`` per run of rows, which hands every owner its rows of the
engine's outputs back. Every slice's outputs depend on that slice
alone, so packing changes no answer beyond the engine's own batch-size precision.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from ubc.engine.base import Engine

__all__ = ["MAX_BATCH", "batch_size_for", "Segment", "Batch", "Inferred", "Packer", "infer"]

#: slices per engine call when the caller does not say: more buys no speed on the CPU
#: runtimes and costs memory (bench/RESULTS.md, batches 8 and 32)
MAX_BATCH = 32

Owner = TypeVar("Owner")


def batch_size_for(engine_max_batch: int, requested: int | None = None) -> int:
    """Slices per engine call: ``requested``, else the engine's max_batch, at most
    ``MAX_BATCH``."""
    return requested or min(engine_max_batch, MAX_BATCH)


@dataclass(frozen=True)
class Segment(Generic[Owner]):
    """``count`` rows of a batch from ``row`` on: the owner's slices ``first ..``;
    ``last``: they end the owner's slices. An owner with no slices rides in a batch as a
    segment of 0 rows, so that it leaves in order with its neighbours."""

    owner: Owner
    row: int
    first: int
    count: int
    last: bool

    def rows(self, array: np.ndarray) -> np.ndarray:
        """This segment's rows of a batch-shaped array (a view)."""
        return array[self.row:self.row + self.count]


@dataclass(frozen=True)
class Inferred:
    """The engine's outputs for one batch (class logits [B, 2], mask logits [B, 1, H, W]),
    or the exception it raised; ``seconds`` spent in ``Engine.infer``."""

    class_logits: np.ndarray | None
    mask_logits: np.ndarray | None
    error: BaseException | None
    seconds: float


@dataclass(frozen=True)
class Batch(Generic[Owner]):
    """An engine batch [B, 1, H, W] (B may be 0: only owners without slices ride in it) and
    whose rows it holds."""

    array: np.ndarray
    segments: tuple[Segment[Owner], ...]

    def share(self, segment: Segment[Owner], seconds: float) -> float:
        """The segment's share of ``seconds`` spent on the batch, by rows."""
        return seconds * segment.count / max(len(self.array), 1)


class Packer(Generic[Owner]):
    """Copy owners' slices into batches of ``batch_size`` rows of ``slice_shape``."""

    def __init__(self, batch_size: int, slice_shape: tuple[int, ...]) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.slice_shape = batch_size, slice_shape
        self._array = np.empty((batch_size, *slice_shape), np.float32)
        self._fill = 0
        self._segments: list[Segment[Owner]] = []

    def add(self, owner: Owner, slices: np.ndarray, *, first: int = 0,
            total: int | None = None) -> Iterator[Batch[Owner]]:
        """Take ``slices`` [n, *slice_shape], the owner's slices ``first .. first + n`` of
        ``total`` (default: ``first + n``), yielding every batch that fills. An owner with no
        slices joins the batch being filled, or leaves at once in a batch of its own when
        none is."""
        total = first + len(slices) if total is None else total
        if len(slices) == 0:
            self._segments.append(Segment(owner, self._fill, first, 0, first == total))
            if self._fill == 0:
                yield self._pop()
            return
        done = 0
        while done < len(slices):
            start = first + done
            if self._fill == 0 and len(slices) - done >= self.batch_size \
                    and self._borrowable(slices):
                stop = done + self.batch_size
                yield Batch(slices[done:stop], (Segment(owner, 0, start, self.batch_size,
                                                        first + stop == total),))
                done = stop
                continue
            take = min(self.batch_size - self._fill, len(slices) - done)
            self._array[self._fill:self._fill + take] = slices[done:done + take]
            self._segments.append(Segment(owner, self._fill, start, take,
                                          start + take == total))
            self._fill, done = self._fill + take, done + take
            if self._fill == self.batch_size:
                yield self._pop()

    def _borrowable(self, slices: np.ndarray) -> bool:
        """Whether whole batches can be views of ``slices`` (float32, C-contiguous rows of
        ``slice_shape``) rather than copies: the engine reads them where they lie."""
        return (slices.dtype == np.float32 and slices.shape[1:] == self.slice_shape
                and slices.flags.c_contiguous)

    def empty(self) -> np.ndarray:
        """A batch-shaped array of no rows."""
        return self._array[:0]

    def flush(self) -> Batch[Owner] | None:
        """The batch being filled (fewer rows), None when it holds nothing."""
        return self._pop() if self._segments else None

    def _pop(self) -> Batch[Owner]:
        batch = Batch(self._array[:self._fill], tuple(self._segments))
        if self._fill:  # the batch keeps its rows; the next one gets a buffer of its own
            self._array = np.empty_like(self._array)
        self._fill, self._segments = 0, []
        return batch


def infer(engine: Engine, batch: Batch[Owner]) -> Inferred:
    """Run the engine on the batch; its exception is returned, not raised, so that only
    the owners of this batch fail."""
    if len(batch.array) == 0:
        return Inferred(None, None, None, 0.0)
    start = time.perf_counter()
    try:
        class_logits, mask_logits = engine.infer(batch.array)
    except Exception as exc:
        return Inferred(None, None, exc, time.perf_counter() - start)
    return Inferred(class_logits, mask_logits, None, time.perf_counter() - start)
