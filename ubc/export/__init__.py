"""Exporters: one module per format, each writing one artifact into the bundle atomically
and recording its sha256 and description in meta.json.

>>> from ubc.export import export
>>> export(Bundle("model.ubc"), ("torchscript", "onnx"))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from ubc.bundle import Bundle
from ubc.export.common import ExportResult

__all__ = ["EXPORTERS", "ExportResult", "export", "exporter"]

#: format -> "module:function", imported on first use (TensorRT's needs tensorrt)
EXPORTERS: dict[str, str] = {
    "torchscript": "ubc.export.torchscript:to_torchscript",
    "onnx": "ubc.export.onnx:to_onnx",
    "aoti": "ubc.export.aoti:to_aoti",
    "tensorrt": "ubc.export.tensorrt:to_tensorrt",
    "int8-onnx": "ubc.export.int8_onnx:to_int8_onnx",
    "int8-openvino": "ubc.export.int8_openvino:to_int8_openvino",
}


def exporter(fmt: str) -> Callable[..., ExportResult]:
    """The export function of format ``fmt`` (one of ``EXPORTERS``)."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORTERS)}")
    module, _, name = EXPORTERS[fmt].partition(":")
    function: Callable[..., ExportResult] = getattr(importlib.import_module(module), name)
    return function


def export(bundle: Bundle, formats: Sequence[str], **options: Any) -> list[ExportResult]:
    """Export ``formats`` in order (TensorRT needs the ONNX first; ``options`` such as
    ``example`` go to every exporter that takes them)."""
    import inspect

    results = []
    for fmt in formats:
        function = exporter(fmt)
        accepted = inspect.signature(function).parameters
        results.append(function(bundle, **{k: v for k, v in options.items() if k in accepted}))
    return results
