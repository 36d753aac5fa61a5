"""Every CPU artifact this machine can run, gated and timed (``ubc-export BUNDLE --cpu``).

1. export what is missing or stale: ``model.ts``, ``model.onnx``; INT8 calibrated on the
   calibration slices: ``model.int8.onnx`` (ONNX Runtime QDQ) and ``model.int8.xml``
   (OpenVINO through NNCF, where nncf is installed); bf16 needs no artifact (OpenVINO
   converts ``model.onnx`` at compile time, offered where the CPU has native bf16);
2. parity of every CPU candidate (``ubc.engine.registry.parity_candidates``) against eager
   PyTorch fp32: the slice gates (``ubc.parity.TOLERANCES``) and the case gates
   (``ubc.parity.case_parity``: no case of the held-out sets changes status or class);
3. a short timing of each one that passed, at the bundle's scoring batch size, in
   interleaved rounds (``time_engines``), recorded in meta.json under this CPU's class
   (``ubc.devices.cpu_class``), from which ``ubc.engine.load(backend="auto")`` picks the
   fastest. ``time_passing`` alone (``ubc-export --cpu --retime``) times again what passed,
   on a new CPU or at a quieter moment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ubc.artifacts import ONNX, TORCHSCRIPT, stale_reason, timing_key
from ubc.bundle import Bundle
from ubc.export.common import ExportResult

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CpuExport:
    """What ``export_cpu`` did: artifacts written, formats skipped (and why), parity
    results (``ubc.parity.ParityResult`` / ``Skipped``) and timings (timing key -> record)."""

    cpu_class: str
    exports: list[ExportResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    parity: list[Any] = field(default_factory=list)
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)


def scoring_batch(bundle: Bundle) -> int:
    """The batch size the bundle is scored at (and timed at): what its meta.json records
    under scoring.batch_size, else the scoring stages' ``MAX_BATCH``."""
    from ubc.scoring.stages import MAX_BATCH

    return int(bundle.meta.get("scoring", {}).get("batch_size", MAX_BATCH))


#: rounds of interleaved timing (``time_engines``)
TIMING_ROUNDS = 3


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


def _fresh(bundle: Bundle, name: str) -> bool:
    return bundle.has(name) and stale_reason(bundle, name) is None


def _write_artifacts(bundle: Bundle, report: CpuExport, example: np.ndarray,
                     calib: np.ndarray, say: Callable[[str], None]) -> None:
    from ubc.export import exporter

    steps: list[tuple[str, dict[str, Any], str | None]] = [
        ("torchscript", {"example": example}, None if not _fresh(bundle, TORCHSCRIPT) else ""),
        ("onnx", {"example": example}, None if not _fresh(bundle, ONNX) else ""),
        ("int8-onnx", {"calib": calib}, None),
        ("int8-openvino", {"calib": calib},
         None if importlib.util.find_spec("nncf") and importlib.util.find_spec("openvino")
         else "nncf or openvino is not installed (pip install ubc[openvino] nncf)"),
    ]
    for fmt, options, skip in steps:
        if skip == "":
            continue  # up to date
        if skip is not None:
            report.skipped.append((fmt, skip))
            say(f"skipped {fmt}: {skip}")
            continue
        say(f"exporting {fmt} ...")
        try:
            result = exporter(fmt)(bundle, **options)
        except ImportError as exc:
            report.skipped.append((fmt, str(exc)))
            say(f"skipped {fmt}: {exc}")
            continue
        report.exports.append(result)
        say(f"  wrote {result.path.name} ({result.path.stat().st_size / 1e6:.1f} MB, "
            f"{result.seconds:.1f} s)")


def _gate_cases(bundle: Bundle, results: list[Any],
                held_out: Sequence[tuple[str, Sequence[tuple[str, Path]]]]) -> list[Any]:
    """The parity results with the case gates of every held-out set added."""
    from ubc.engine import load
    from ubc.engine.torch_backend import TorchEngine
    from ubc.parity import ParityResult, case_parity, case_verdicts, with_case_parity

    if not held_out:
        return results
    with TorchEngine(bundle, device="cpu", artifact="eager") as reference:
        expected = {name: case_verdicts(bundle, reference, volumes)
                    for name, volumes in held_out}
    gated = []
    for result in results:
        if isinstance(result, ParityResult):
            options = _variant_options(result.backend, result.artifact)
            with load(bundle, backend=result.backend, device="cpu",
                      precision=result.precision, **options) as engine:
                cases = [case_parity(expected[name], case_verdicts(bundle, engine, volumes),
                                     name) for name, volumes in held_out]
            result = with_case_parity(result, cases)
        gated.append(result)
    return gated


def _variant_options(backend: str, artifact: str) -> dict[str, Any]:
    """The engine options of the variant that ran ``artifact`` (the torch backend's two)."""
    if backend != "torch":
        return {}
    return {"artifact": "torchscript" if artifact == TORCHSCRIPT else "eager"}


def _timed_runs(bundle: Bundle, report: CpuExport) -> list[tuple[Any, str]]:
    """(variant, precision) of the reference and of every candidate whose artifact passed
    its gates (in this run's ``report.parity`` when it has any, and in meta.json)."""
    from ubc.engine.registry import BASELINE, VARIANTS, parity_state
    from ubc.parity import ParityResult

    runs = [(VARIANTS[BASELINE], "fp32")]
    passed = {(r.backend, r.precision, r.artifact) for r in report.parity
              if isinstance(r, ParityResult) and r.passed}
    for variant in VARIANTS.values():
        for precision in variant.checked_precisions("cpu", bundle):
            if (variant.name, precision) in {(v.name, p) for v, p in runs}:
                continue
            cls = variant.engine_class
            if cls.unavailable(bundle, "cpu", precision, **variant.options) is not None:
                continue
            artifact = cls.artifact_for(bundle, "cpu", precision, **variant.options)
            if (report.parity and (variant.backend, precision, artifact) not in passed) or \
                    parity_state(bundle, variant, "cpu", precision, artifact) != "passed":
                continue
            runs.append((variant, precision))
    return runs


def time_passing(bundle: Bundle, report: CpuExport, slices: np.ndarray, batch: int,
                 seconds: float, threads: int | None, say: Callable[[str], None]) -> None:
    """Time the reference and every candidate that passed its gates, interleaved
    (``time_engines``); record the median round of each under this CPU class."""
    from contextlib import ExitStack

    from ubc.devices import cpu_model
    from ubc.engine import load

    runs = _timed_runs(bundle, report)
    load_average = [round(x, 2) for x in os.getloadavg()]
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
            report.timings[key] = {
                "slices_per_s": round(speed, 2), "rounds": [round(r, 2) for r in rounds[key]],
                "batch": batch, "threads": threads, "artifact": engine.artifact,
                "sha256": bundle.meta["files"].get(engine.artifact, ""), "cpu": cpu_model(),
                "load_average": load_average,
                "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            say(f"  {variant.label} {precision}: {speed:.1f} slices/s at batch {batch} "
                f"(rounds: {', '.join(f'{r:.1f}' for r in rounds[key])})")
    entries = dict(bundle.meta.get("timing", {}))
    entries[report.cpu_class] = report.timings
    bundle.update_meta(timing=entries)


def export_cpu(bundle: Bundle, *, calib: np.ndarray, slices: np.ndarray, source: str = "",
               held_out: Sequence[tuple[str, Sequence[tuple[str, Path]]]] = (),
               batch: int | None = None, threads: int | None = None, seconds: float = 3.0,
               say: Callable[[str], None] = log.info) -> CpuExport:
    """Write, gate and time every CPU artifact (see the module docstring). ``calib``:
    preprocessed calibration slices float32 [N, 1, H, W] for INT8; ``slices``: parity
    slices (>= 64, not the calibration ones); ``held_out``: (name, [(case id, image
    file)]) sets for the case gates; ``batch``: timing batch (default the scoring batch);
    ``seconds``: timing per variant. Parity and timings are recorded in meta.json."""
    from ubc.devices import cpu_class
    from ubc.parity import check_bundle, record_parity

    report = CpuExport(cpu_class=cpu_class())
    _write_artifacts(bundle, report, slices[:2], calib, say)
    say(f"checking against eager PyTorch fp32 on {source or 'the parity slices'} ...")
    results = check_bundle(bundle, slices, device="cpu", source=source)
    results = _gate_cases(bundle, results, held_out)
    record_parity(bundle, results)
    report.parity.extend(results)
    say(f"timing what passed on this CPU ({report.cpu_class}) ...")
    time_passing(bundle, report, slices, batch or scoring_batch(bundle), seconds, threads,
                 say)
    return report
