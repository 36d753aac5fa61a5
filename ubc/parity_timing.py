"""Timing of the CPU artifacts that passed their gates, for ``ubc.engine.load(backend=
"auto")``: each one at the bundle's scoring batch size, in interleaved rounds
(``time_engines``), recorded in meta.json under this CPU's class (``ubc.devices.cpu_class``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np

from ubc.artifacts import timing_key
from ubc.bundle import Bundle
from ubc.engine.registry import BASELINE, VARIANTS, Variant, parity_state
from ubc.parity import ParityResult, Skipped

log = logging.getLogger(__name__)

#: rounds of interleaved timing (``time_engines``)
TIMING_ROUNDS = 3


def scoring_batch(bundle: Bundle) -> int:
    """The batch size the bundle is scored at (and timed at): what its meta.json records
    under scoring.batch_size, else the scoring stages' ``MAX_BATCH``."""
    from ubc.scoring.packer import MAX_BATCH

    return int(bundle.meta.get("scoring", {}).get("batch_size", MAX_BATCH))


def time_engine(engine: Any, slices: np.ndarray, batch: int, seconds: float) -> float:
    """Slices/s of ``engine.infer`` at ``batch`` (host in, host out), after 2 warm-up calls,
    over at least 3 calls and ``seconds``."""
    data = _batch_of(slices, batch)
    for _ in range(2):
        engine.infer(data)
    return _speed(engine, data, seconds, min_calls=3)


def time_engines(engines: dict[str, Any], slices: np.ndarray, batch: int,
                 seconds: float) -> dict[str, list[float]]:
    """Slices/s of each engine per round: ``TIMING_ROUNDS`` rounds in which every engine in
    turn runs for ``seconds / TIMING_ROUNDS`` (at least one call), after 2 warm-up calls
    each. Interleaved, so that a host whose speed drifts during the run (a neighbour's
    load, turbo) biases no engine against another."""
    data = _batch_of(slices, batch)
    for engine in engines.values():
        for _ in range(2):
            engine.infer(data)
    rounds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(TIMING_ROUNDS):
        for name, engine in engines.items():
            rounds[name].append(_speed(engine, data, seconds / TIMING_ROUNDS, min_calls=1))
    return rounds


def _speed(engine: Any, data: np.ndarray, seconds: float, min_calls: int) -> float:
    """Slices/s of ``engine.infer(data)`` over at least ``min_calls`` calls and ``seconds``."""
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        engine.infer(data)
        calls += 1
    return calls * len(data) / (time.perf_counter() - start)


def _batch_of(slices: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` slices, ``slices`` repeated as often as needed (C-contiguous)."""
    reps = -(-batch // len(slices))
    return np.ascontiguousarray(np.concatenate([slices] * reps)[:batch])


def _timed_runs(bundle: Bundle, checked: Sequence[ParityResult | Skipped]
                ) -> list[tuple[Variant, str]]:
    """(variant, precision) of the reference and of every candidate whose artifact passed
    its gates (in ``checked``, this run's results, when it has any, and in meta.json)."""
    runs = [(VARIANTS[BASELINE], "fp32")]
    passed = {(r.backend, r.precision, r.artifact) for r in checked
              if isinstance(r, ParityResult) and r.passed}
    for variant in VARIANTS.values():
        for precision in variant.checked_precisions("cpu", bundle):
            if (variant.name, precision) in {(v.name, p) for v, p in runs}:
                continue
            cls = variant.engine_class
            if cls.unavailable(bundle, "cpu", precision, **variant.options) is not None:
                continue
            artifact = cls.artifact_for(bundle, "cpu", precision, **variant.options)
            if (checked and (variant.backend, precision, artifact) not in passed) or \
                    parity_state(bundle, variant, "cpu", precision, artifact) != "passed":
                continue
            runs.append((variant, precision))
    return runs


def time_passing(bundle: Bundle, slices: np.ndarray, *, batch: int, seconds: float,
                 threads: int | None = None, checked: Sequence[ParityResult | Skipped] = (),
                 say: Callable[[str], None] = log.info) -> dict[str, dict[str, Any]]:
    """Time the reference and every candidate that passed its gates, interleaved
    (``time_engines``); record the median round of each in meta.json under this CPU class
    and return the records (timing key -> slices/s, rounds, batch, threads, artifact,
    sha256, CPU, load average, when)."""
    from ubc.devices import cpu_class, cpu_model
    from ubc.engine import load

    runs = _timed_runs(bundle, checked)
    load_average = [round(x, 2) for x in os.getloadavg()]
    timings: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        engines = {}
        for variant, precision in runs:
            kwargs = dict(variant.options)
            if variant.threads and threads is not None:
                kwargs["threads"] = threads
            if variant.any_batch:
                kwargs["max_batch"] = batch
            engines[timing_key(variant.name, precision)] = stack.enter_context(
                load(bundle, backend=variant.backend, device="cpu", precision=precision,
                     **kwargs))
        rounds = time_engines(engines, slices, batch, seconds)
        for (variant, precision), (key, engine) in zip(runs, engines.items(), strict=True):
            speed = float(np.median(rounds[key]))
            timings[key] = {
                "slices_per_s": round(speed, 2), "rounds": [round(r, 2) for r in rounds[key]],
                "batch": batch, "threads": threads, "artifact": engine.artifact,
                "sha256": bundle.meta["files"].get(engine.artifact, ""), "cpu": cpu_model(),
                "load_average": load_average,
                "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            say(f"  {variant.label} {precision}: {speed:.1f} slices/s at batch {batch} "
                f"(rounds: {', '.join(f'{r:.1f}' for r in rounds[key])})")
    entries = dict(bundle.meta.get("timing", {}))
    entries[cpu_class()] = timings
    bundle.update_meta(timing=entries)
    return timings
