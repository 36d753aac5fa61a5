"""One cell of a benchmark (a variant at one precision, every batch size), run in this
process or in a fresh one (``python -m ubc.benchmark.cell SPEC.json RESULT.json``).

A fresh process per variant is the default of ``ubc-bench``: no runtime inherits another's
thread pool, allocator or warm caches, and each one's peak memory is its own (an ONNX
Runtime process never imports torch, as in a deployment that uses only it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ubc.atomic import atomic_write_text
from ubc.benchmark import memory
from ubc.benchmark.machine import load_average
from ubc.benchmark.results import EngineRow, Parity
from ubc.benchmark.timing import (
    Measurement,
    Stats,
    buffer_count,
    clock_for,
    rotating_inputs,
    time_calls,
)

Progress = Callable[[str], None]
#: stderr lines of a child process starting with this are progress, not errors
PROGRESS_MARK = "@ubc-bench "


@dataclass(frozen=True)
class CellSpec:
    """Everything a (possibly separate) process needs to time one cell. ``inputs``: an .npz
    with ``slices`` float32 [N, 1, H, W] and the reference outputs ``class_logits`` and
    ``mask_logits`` (eager fp32 on the CPU) for parity."""

    bundle: str
    variant: str
    backend: str
    engine_options: dict[str, Any]
    device: str
    precision: str
    batch_sizes: tuple[int, ...]
    warmup: int
    iters: int
    max_seconds: float
    inputs: str
    cache_bytes: int
    parity: bool = True
    reference: bool = False
    baseline: bool = False
    isolated: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> CellSpec:
        entry = dict(entry, batch_sizes=tuple(entry["batch_sizes"]))
        return cls(**entry)


@dataclass(frozen=True)
class _Timed:
    batch: int
    measurement: Measurement
    host_peak_mib: float
    device_peak_mib: float | None
    load_average: tuple[float, ...]


def _time_batches(engine: Any, spec: CellSpec, slices: np.ndarray,
                  device_memory: memory.DeviceMemory | None, progress: Progress
                  ) -> list[_Timed]:
    clock = clock_for(spec.device)
    timed = []
    for batch in spec.batch_sizes:
        progress(f"{spec.variant} {spec.precision}: batch {batch}: timing")
        count = buffer_count(batch * slices[0].nbytes, spec.warmup + spec.iters,
                             spec.cache_bytes)
        inputs = rotating_inputs(slices, batch, count)
        loads = tuple(load_average())
        memory.reset_host_peak()
        if device_memory is not None:
            device_memory.reset()
        measurement = time_calls(engine.infer, inputs, warmup=spec.warmup, iters=spec.iters,
                                 max_seconds=spec.max_seconds, clock=clock)
        timed.append(_Timed(batch, measurement, memory.host_peak_mib(),
                            device_memory.peak_mib() if device_memory else None, loads))
        stats = measurement.stats
        progress(f"{spec.variant} {spec.precision}: batch {batch}: "
                 f"{batch * 1e3 / stats.p50:.1f} slices/s (p50 {stats.p50:.1f} ms, "
                 f"{stats.n} calls)")
        del inputs
    return timed


def _parity(spec: CellSpec, slices: np.ndarray,
            reference: tuple[np.ndarray, np.ndarray] | None, progress: Progress
            ) -> Parity | None:
    if not spec.parity or reference is None:
        return None
    if spec.reference:
        return Parity.of_reference(len(slices))
    from ubc import parity

    progress(f"{spec.variant} {spec.precision}: parity on {len(slices)} slices")
    result = parity.compare(spec.bundle, spec.backend, slices, device=spec.device,
                            precision=spec.precision, reference=reference, record=False,
                            min_slices=min(parity.MIN_SLICES, len(slices)),
                            **spec.engine_options)
    return Parity.of(result)


def run_cell(spec: CellSpec, progress: Progress | None = None) -> list[EngineRow]:
    """Load the engine, time every batch size, then check parity; one row per batch size
    (speed-ups are filled in later, against the baseline's rows)."""
    from ubc.engine import load

    progress = progress or (lambda message: None)
    data = np.load(spec.inputs)
    slices = np.ascontiguousarray(data["slices"], dtype=np.float32)
    reference = (data["class_logits"], data["mask_logits"]) if spec.parity else None
    base = memory.rss_mib()
    device_memory = memory.DeviceMemory(spec.device) if spec.device.startswith("cuda") \
        else None  # its baseline is taken before the engine exists
    progress(f"{spec.variant} {spec.precision}: loading")
    started = time.perf_counter()
    engine = load(spec.bundle, backend=spec.backend, device=spec.device,
                  precision=spec.precision, **spec.engine_options)
    load_seconds = time.perf_counter() - started
    with engine:
        timed = _time_batches(engine, spec, slices, device_memory, progress)
        artifact, max_batch = engine.artifact, engine.max_batch
    parity = _parity(spec, slices, reference, progress)
    threads = spec.engine_options.get("threads") or getattr(engine, "threads", None)
    if threads is None and spec.backend in ("torch", "aoti"):
        import torch

        threads = torch.get_num_threads()
    rows = []
    for t in timed:
        stats = t.measurement.stats
        device_stats: Stats | None = t.measurement.device_stats
        rows.append(EngineRow(
            variant=spec.variant, backend=spec.backend, artifact=artifact, device=spec.device,
            precision=spec.precision, batch=t.batch, latency=stats,
            throughput=t.batch * 1e3 / stats.p50, host_peak_mib=round(t.host_peak_mib, 1),
            host_base_mib=round(base, 1), load_seconds=round(load_seconds, 3),
            warmup=t.measurement.warmup, buffers=t.measurement.buffers, threads=threads,
            device_latency=device_stats,
            device_peak_mib=None if t.device_peak_mib is None else round(t.device_peak_mib, 1),
            parity=parity, baseline=spec.baseline, isolated=spec.isolated,
            load_average=t.load_average, calls_per_batch=math.ceil(t.batch / max_batch),
            cores_used=round(t.measurement.cores_used, 2),
            preemptions_per_call=round(t.measurement.preemptions / stats.n, 1),
            samples_ms=tuple(round(x, 4) for x in t.measurement.samples_ms),
            device_samples_ms=tuple(round(x, 4) for x in t.measurement.device_ms)))
    return rows


def _row_from_json(entry: dict[str, Any]) -> EngineRow:
    entry = dict(entry)
    entry["latency"] = Stats(**entry["latency"])
    if entry.get("device_latency"):
        entry["device_latency"] = Stats(**entry["device_latency"])
    if entry.get("parity"):
        p = dict(entry["parity"], failures=tuple(entry["parity"]["failures"]))
        entry["parity"] = Parity(**p)
    for key in ("load_average", "samples_ms", "device_samples_ms"):
        entry[key] = tuple(entry.get(key, ()))
    return EngineRow(**entry)


def rows_from_json(entries: list[dict[str, Any]]) -> list[EngineRow]:
    """Rows written by a child process back as ``EngineRow``."""
    return [_row_from_json(e) for e in entries]


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: run the cell of SPEC.json, write its rows to RESULT.json."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m ubc.benchmark.cell SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = CellSpec.from_json(json.loads(Path(args[0]).read_text()))

    def progress(message: str) -> None:
        print(PROGRESS_MARK + message, file=sys.stderr, flush=True)

    rows = run_cell(spec, progress)
    doc = [dataclasses.asdict(row) for row in rows]
    atomic_write_text(args[1], json.dumps(doc))
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a child process
    sys.exit(main())
