"""One ``ubc-export`` run: export formats (``ubc.export``), check them against eager PyTorch
(``ubc.parity``) and, for ``--cpu``, gate and time every CPU artifact
(``ubc.parity_timing``), on slices and cases the caller hands in (``ubc.check_data``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ubc.artifacts import ONNX, stale_reason
from ubc.bundle import Bundle
from ubc.export import ExportResult, export
from ubc.export.tensorrt import TensorRTOptions
from ubc.parity import HeldOut, ParityResult, Skipped, check_bundle, margin_at
from ubc.parity_timing import scoring_batch, time_passing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportJob:
    """What one run does. ``formats`` (``ubc.artifacts.FORMATS``) are exported in order, the
    ONNX first when a TensorRT plan or the Triton repository needs it and it is missing or
    stale; ``device``, ``max_batch`` and ``tensorrt`` (``ubc.export.tensorrt.TensorRTOptions``)
    go to the exporters that take them. ``triton``: a Triton model repository to write.
    ``check``: compare every backend of ``device`` with eager PyTorch fp32 and record it.
    ``cpu``: instead, write, gate (slices and held-out cases) and time every CPU artifact;
    ``retime``: with ``cpu``, only time again what passed its gates."""

    formats: tuple[str, ...] = ()
    device: str = "auto"
    max_batch: int = 32
    tensorrt: TensorRTOptions | None = None
    triton: str | None = None
    check: bool = False
    cpu: bool = False
    retime: bool = False
    timing_seconds: float = 3.0

    def formats_for(self, bundle: Bundle) -> list[str]:
        """``formats`` in the order they run: with the ONNX first where a TensorRT plan or
        the Triton repository needs it and the bundle's is missing or stale."""
        formats = list(self.formats)
        if "onnx" not in formats and (not bundle.has(ONNX) or stale_reason(bundle, ONNX)):
            if self.triton:
                formats.insert(0, "onnx")
            elif "tensorrt" in formats:
                formats.insert(formats.index("tensorrt"), "onnx")
        return formats


@dataclass
class ExportReport:
    """What a run did: artifacts written, formats skipped (and why), parity results,
    timings (timing key -> record) and, after a CPU run, what ``backend="auto"`` now picks
    on this CPU class."""

    exports: list[ExportResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    parity: list[ParityResult | Skipped] = field(default_factory=list)
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpu_class: str = ""
    auto: str = ""


def run_export(bundle: Bundle, job: ExportJob, *, slices: np.ndarray | None = None,
               source: str = "", calib: np.ndarray | None = None, held_out: HeldOut = (),
               say: Callable[[str], None] = log.info) -> ExportReport:
    """Run ``job`` on ``bundle``. ``slices``: preprocessed slices float32 [N, 1, H, W] to
    trace with and check on (>= 64 to check; ``source`` says where they come from);
    ``calib``: INT8 calibration slices; ``held_out``: the case sets of the CPU gates."""
    if job.cpu:
        from ubc.engine.registry import choose

        report = _run_cpu(bundle, job, slices, source, calib, held_out, say)
        choice = choose(bundle, "cpu", "auto")
        report.auto = f"{choice.variant} {choice.precision} ({choice.artifact})"
        return report
    from ubc.devices import resolve_device

    device = resolve_device(job.device)
    report = ExportReport(exports=export(bundle, job.formats_for(bundle), say=say,
                                         example=slices,
                                         device=device, max_batch=job.max_batch,
                                         options=job.tensorrt, calib=calib))
    if job.triton:
        from ubc.export.triton import to_triton

        for folder in to_triton(bundle, job.triton, max_batch=job.max_batch):
            say(f"  wrote Triton model {folder}")
    if job.check and slices is not None:
        say(f"checking against eager PyTorch fp32 on {source} ...")
        report.parity = check_bundle(bundle, slices, device=device, source=source,
                                     record=True)
    return report


def _run_cpu(bundle: Bundle, job: ExportJob, slices: np.ndarray | None, source: str,
             calib: np.ndarray | None, held_out: HeldOut,
             say: Callable[[str], None]) -> ExportReport:
    """``ubc-export --cpu``: write, check (slices and cases) and time every CPU artifact;
    with ``retime`` only the timing."""
    from ubc.devices import cpu_class
    from ubc.export.cpu import write_cpu_artifacts

    if slices is None:
        raise ValueError("a CPU run needs the parity slices")
    report = ExportReport(cpu_class=cpu_class())
    if not job.retime:
        if calib is None:
            raise ValueError("a CPU run needs INT8 calibration slices")
        written = write_cpu_artifacts(bundle, example=slices[:2], calib=calib,
                                      gate=margin_at("int8"), say=say)
        report.exports, report.skipped = written.exports, written.skipped
        say(f"checking against eager PyTorch fp32 on {source or 'the parity slices'} ...")
        report.parity = check_bundle(bundle, slices, device="cpu", source=source,
                                     held_out=held_out, record=True)
    say(f"timing what passed on this CPU ({report.cpu_class}) ...")
    report.timings = time_passing(bundle, slices, batch=scoring_batch(bundle),
                                  seconds=job.timing_seconds, checked=report.parity, say=say)
    return report
