"""The CPU artifacts of ``ubc-export --cpu``: every format declared a CPU step
(``ubc.artifacts.FORMATS``), in order: ``model.ts`` and ``model.onnx`` where missing or
stale, and the INT8 forms calibrated on the given slices (``model.int8.onnx`` for ONNX
Runtime, ``model.int8.xml`` for OpenVINO where nncf is installed, its INT8 layer groups
chosen to keep the INT8 gates). bf16 needs no artifact (OpenVINO converts ``model.onnx``
at compile time). Gating and timing them is
``ubc.parity``'s part of that command.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ubc.artifacts import FORMATS, ExportFormat, artifacts_of, stale_reason
from ubc.bundle import Bundle
from ubc.export import exporter
from ubc.export.common import ExportResult
from ubc.export.int8_openvino import Gate


@dataclass(frozen=True)
class CpuArtifacts:
    """What ``write_cpu_artifacts`` did: artifacts written, formats skipped and why."""

    exports: list[ExportResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _up_to_date(bundle: Bundle, fmt: ExportFormat) -> bool:
    """Whether the bundle holds artifacts of ``fmt``, none stale. A calibrated format never
    is: its calibration slices may be new."""
    if "calib" in fmt.inputs:
        return False
    names = [n for n in artifacts_of(bundle.meta) if re.fullmatch(fmt.files, n)]
    return bool(names) and all(bundle.has(n) and stale_reason(bundle, n) is None
                               for n in names)


def write_cpu_artifacts(bundle: Bundle, *, example: np.ndarray, calib: np.ndarray,
                        gate: Gate, say: Callable[[str], None]) -> CpuArtifacts:
    """Export every CPU step's format that is not up to date; ``example``: slices to trace
    with, ``calib``: preprocessed calibration slices float32 [N, 1, H, W] for INT8,
    ``gate``: the INT8 gates' margin, which the choice of INT8 layer groups keeps."""
    report = CpuArtifacts()
    inputs = {"example": example, "calib": calib, "gate": gate}
    for fmt in (f for f in FORMATS.values() if f.cpu and not _up_to_date(bundle, f)):
        try:
            function = exporter(fmt.name)
            say(f"exporting {fmt.name} ...")
            result = function(bundle, **{k: inputs[k] for k in fmt.inputs})
        except ImportError as exc:
            report.skipped.append((fmt.name, str(exc)))
            say(f"skipped {fmt.name}: {exc}")
            continue
        report.exports.append(result)
        say(f"  wrote {result.path.name} ({result.path.stat().st_size / 1e6:.1f} MB, "
            f"{result.seconds:.1f} s)")
    return report
