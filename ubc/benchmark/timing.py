"""Timing done right: warm-up calls excluded, a monotonic nanosecond clock, the device
synchronised before the clock is read (and CUDA events beside it on a GPU), inputs rotated
among several buffers so that a small batch is not served from a warm cache, the garbage
collector paused while timing, and the spread reported beside the median.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: fewest timed calls of a measurement, whatever the time budget says
MIN_ITERATIONS = 3
#: most bytes the rotating input buffers of one measurement may hold
ROTATION_BUDGET_BYTES = 512 << 20


@dataclass(frozen=True)
class Stats:
    """Order statistics of a sample of durations in milliseconds.

    ``p99`` of fewer than 100 samples is interpolated between the largest ones (about the
    maximum); ``n`` says how many there were. ``iqr``: interquartile range, the spread.
    """

    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    stdev: float
    min: float
    max: float
    iqr: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Stats:
        """Statistics of ``samples_ms`` (at least one sample)."""
        if len(samples_ms) == 0:
            raise ValueError("no samples to summarise")
        a = np.asarray(samples_ms, dtype=np.float64)
        q25, p50, q75, p95, p99 = np.percentile(a, [25, 50, 75, 95, 99])
        return cls(n=int(a.size), p50=float(p50), p95=float(p95), p99=float(p99),
                   mean=float(a.mean()), stdev=float(a.std(ddof=1)) if a.size > 1 else 0.0,
                   min=float(a.min()), max=float(a.max()), iqr=float(q75 - q25))

    @property
    def spread(self) -> float:
        """IQR relative to the median (0.05: the middle half lies within 5 %)."""
        return self.iqr / self.p50 if self.p50 > 0 else math.nan

    def to_json(self) -> dict[str, float]:
        return asdict(self)


class Clock:
    """Host wall clock (``time.perf_counter_ns``: monotonic, the finest resolution). The
    engines return host arrays, so on the CPU a call is complete when it returns."""

    device_timing = False

    def sync(self) -> None:
        """Wait until the device has finished the work queued so far (nothing on the CPU)."""

    def start(self) -> int:
        self.sync()
        return time.perf_counter_ns()

    def stop(self, started_ns: int) -> tuple[float, float | None]:
        """(wall ms since ``start``, device ms or None), after synchronising."""
        self.sync()
        return (time.perf_counter_ns() - started_ns) / 1e6, None


class TorchCudaClock(Clock):
    """Wall clock after ``torch.cuda.synchronize``, plus CUDA events recorded on the current
    stream around each call (the GPU's own view of the same interval)."""

    device_timing = True

    def __init__(self, device: str) -> None:
        import torch

        self._torch = torch
        self._device = torch.device(device)
        self._begin = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        self._torch.cuda.synchronize(self._device)

    def start(self) -> int:
        self.sync()
        started = time.perf_counter_ns()
        self._begin.record(self._torch.cuda.current_stream(self._device))
        return started

    def stop(self, started_ns: int) -> tuple[float, float | None]:
        self._end.record(self._torch.cuda.current_stream(self._device))
        self.sync()
        wall = (time.perf_counter_ns() - started_ns) / 1e6
        return wall, float(self._begin.elapsed_time(self._end))


def clock_for(device: str) -> Clock:
    """The clock for ``device``: host on the CPU, CUDA events (torch) on a GPU; ubc-bench
    times eager PyTorch beside every backend, so torch is always there."""
    return TorchCudaClock(device) if device.startswith("cuda") else Clock()


@dataclass(frozen=True)
class Measurement:
    """Timed calls of one function: wall-clock samples (ms), device samples on a GPU, and
    how much CPU the process got meanwhile: ``cpu_seconds`` (all its threads) over
    ``wall_seconds``, and ``preemptions`` (involuntary context switches: the scheduler
    took a core away, i.e. other processes competed for it)."""

    samples_ms: tuple[float, ...]
    device_ms: tuple[float, ...] = ()
    warmup: int = 0
    buffers: int = 1
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    preemptions: int = 0

    @property
    def cores_used(self) -> float:
        """Average number of cores busy in this process during the timed calls."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def stats(self) -> Stats:
        return Stats.of(self.samples_ms)

    @property
    def device_stats(self) -> Stats | None:
        return Stats.of(self.device_ms) if self.device_ms else None


def time_calls(fn: Callable[[Any], object], inputs: Sequence[Any], *, warmup: int,
               iters: int, max_seconds: float = math.inf, clock: Clock | None = None
               ) -> Measurement:
    """Call ``fn`` on ``inputs`` in rotation: ``warmup`` untimed calls, then up to ``iters``
    timed ones, stopping early once ``max_seconds`` of timed calls have passed (never
    before ``MIN_ITERATIONS``). The garbage collector is paused while timing."""
    if not inputs:
        raise ValueError("time_calls needs at least one input")
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got {iters} and {warmup}")
    clock = clock or Clock()
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    clock.sync()
    samples: list[float] = []
    device: list[float] = []
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    usage, cpu, elapsed = _preemptions(), time.process_time(), time.perf_counter()
    try:
        spent = 0.0
        for i in range(iters):
            x = inputs[(warmup + i) % len(inputs)]
            started = clock.start()
            fn(x)
            wall, on_device = clock.stop(started)
            samples.append(wall)
            if on_device is not None:
                device.append(on_device)
            spent += wall / 1e3
            if spent >= max_seconds and len(samples) >= min(MIN_ITERATIONS, iters):
                break
    finally:
        elapsed, cpu = time.perf_counter() - elapsed, time.process_time() - cpu
        usage = _preemptions() - usage
        if was_enabled:
            gc.enable()
    return Measurement(tuple(samples), tuple(device), warmup=warmup,
                       buffers=min(len(inputs), warmup + len(samples)), wall_seconds=elapsed,
                       cpu_seconds=cpu, preemptions=usage)


def _preemptions() -> int:
    """Involuntary context switches of this process so far (all threads; 0 off Unix)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw)


def buffer_count(batch_bytes: int, calls: int, cache_bytes: int) -> int:
    """How many input buffers to rotate: enough to hold twice the last-level cache (so a
    buffer is cold when its turn comes again), no more than there are calls, at least 2,
    within ``ROTATION_BUDGET_BYTES``."""
    wanted = math.ceil(2 * cache_bytes / max(batch_bytes, 1))
    affordable = max(2, ROTATION_BUDGET_BYTES // max(batch_bytes, 1))
    return int(max(2, min(wanted, calls, affordable)))


def rotating_inputs(slices: np.ndarray, batch: int, count: int) -> list[np.ndarray]:
    """``count`` distinct C-contiguous float32 batches [batch, 1, H, W] cut from ``slices``
    (real preprocessed slices, reused cyclically with a different offset per buffer)."""
    if slices.ndim != 4 or len(slices) == 0:
        raise ValueError(f"slices must be [N>0, 1, H, W], got {slices.shape}")
    n = len(slices)
    buffers = []
    for k in range(count):
        rows = (np.arange(batch) + k * batch + k) % n
        buffers.append(np.ascontiguousarray(slices[rows], dtype=np.float32))
    return buffers
