"""One cell of a benchmark (a variant at one precision, every batch size), run in this
process (``run_cell``) or in a fresh one (``run_isolated``: ``python -m ubc.benchmark.cell
SPEC.pickle ROWS.pickle``, both files in the run's private temporary folder).

A fresh process per variant is the default of ``ubc-bench``: no runtime inherits another's
thread pool, allocator or warm caches, and each one's peak memory is its own (an ONNX
Runtime process never imports torch, as in a deployment that uses only it).
"""

from __future__ import annotations

import collections
import math
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ubc.benchmark import memory
from ubc.benchmark.machine import load_average
from ubc.benchmark.results import EngineRow
from ubc.benchmark.timing import (
    Measurement,
    Stats,
    buffer_count,
    clock_for,
    rotating_inputs,
    time_calls,
)
from ubc.parity import ParityResult

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
    informational: bool = False


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


def reference_parity(artifact: str, sha256: str, slices: int) -> ParityResult:
    """The parity of the reference itself (eager fp32 on the CPU): zero by definition."""
    from ubc.engine.registry import BASELINE
    from ubc.parity import TOLERANCES

    return ParityResult(
        backend=BASELINE, device="cpu", precision="fp32", artifact=artifact, sha256=sha256,
        slices=slices, max_abs_class_logits=0.0, max_rel_class_logits=0.0, max_abs_p_hgg=0.0,
        max_abs_mask_logits=0.0, mask_dice=1.0, class_flip_share=0.0,
        tolerance=TOLERANCES["fp32"], passed=True, source="the reference itself",
        extra={"reference": True})


def _parity(spec: CellSpec, slices: np.ndarray, artifact: tuple[str, str],
            reference: tuple[np.ndarray, np.ndarray] | None, progress: Progress
            ) -> ParityResult | None:
    if not spec.parity or reference is None:
        return None
    if spec.reference:
        return reference_parity(*artifact, len(slices))
    from ubc import parity

    progress(f"{spec.variant} {spec.precision}: parity on {len(slices)} slices")
    return parity.compare(spec.bundle, spec.backend, slices, device=spec.device,
                          precision=spec.precision, reference=reference,
                          min_slices=min(parity.MIN_SLICES, len(slices)),
                          **spec.engine_options)


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
        sha256 = engine.meta["files"].get(artifact, "")
    parity = _parity(spec, slices, (artifact, sha256), reference, progress)
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
            parity=parity, informational=spec.informational, baseline=spec.baseline,
            isolated=spec.isolated,
            load_average=t.load_average, calls_per_batch=math.ceil(t.batch / max_batch),
            cores_used=round(t.measurement.cores_used, 2),
            preemptions_per_call=round(t.measurement.preemptions / stats.n, 1),
            samples_ms=tuple(round(x, 4) for x in t.measurement.samples_ms),
            device_samples_ms=tuple(round(x, 4) for x in t.measurement.device_ms)))
    return rows


def run_isolated(spec: CellSpec, folder: Path, progress: Progress) -> list[EngineRow]:
    """``run_cell`` in a fresh interpreter; RuntimeError with the child's last stderr lines
    if it fails (an exception, a crash of the runtime, the OOM killer)."""
    name = f"{spec.variant}-{spec.precision}"
    spec_path, rows_path = folder / f"{name}.spec.pickle", folder / f"{name}.rows.pickle"
    spec_path.write_bytes(pickle.dumps(spec))
    tail: collections.deque[str] = collections.deque(maxlen=25)
    with subprocess.Popen([sys.executable, "-m", "ubc.benchmark.cell", str(spec_path),
                           str(rows_path)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, errors="replace") as child:
        assert child.stderr is not None
        for line in child.stderr:
            if line.startswith(PROGRESS_MARK):
                progress(line[len(PROGRESS_MARK):].rstrip())
            elif line.strip():
                tail.append(line.rstrip())
    if child.returncode != 0 or not rows_path.is_file():
        how = f"exit status {child.returncode}" if child.returncode >= 0 else \
            f"killed by signal {-child.returncode}"
        detail = next((t for t in reversed(tail) if not t.startswith(" ")), "") or how
        raise RuntimeError(f"{detail} ({how}; last output: {' | '.join(list(tail)[-4:])})")
    rows: list[EngineRow] = pickle.loads(rows_path.read_bytes())
    return rows


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: run the cell of SPEC.pickle, write its rows to ROWS.pickle."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m ubc.benchmark.cell SPEC.pickle ROWS.pickle", file=sys.stderr)
        return 2
    spec = pickle.loads(Path(args[0]).read_bytes())

    def progress(message: str) -> None:
        print(PROGRESS_MARK + message, file=sys.stderr, flush=True)

    Path(args[1]).write_bytes(pickle.dumps(run_cell(spec, progress)))
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a child process
    sys.exit(main())
