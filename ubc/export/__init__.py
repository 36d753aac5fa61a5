"""Exporters: one module per format, each writing one artifact into the bundle atomically
and recording its sha256 and description in meta.json. The formats are declared in
``ubc.artifacts.FORMATS`` (what each writes and needs, how ``ubc-export`` makes it).

>>> from ubc.export import export
>>> export(Bundle("model.ubc"), ("torchscript", "onnx"))
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ubc.artifacts import FORMATS
from ubc.bundle import Bundle
from ubc.devices import missing
from ubc.export.common import ExportResult

__all__ = ["ExportResult", "export", "exporter"]

log = logging.getLogger(__name__)


def exporter(fmt: str) -> Callable[..., ExportResult]:
    """The export function of format ``fmt`` (one of ``ubc.artifacts.FORMATS``); ImportError
    naming the install command when a package it needs is missing."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    declared = FORMATS[fmt]
    reason = missing(declared.packages, declared.install)
    if reason is not None:
        raise ImportError(reason)
    module, _, name = declared.exporter.partition(":")
    function: Callable[..., ExportResult] = getattr(importlib.import_module(module), name)
    return function


def export(bundle: Bundle, formats: Sequence[str], *,
           say: Callable[[str], None] = log.debug, **options: Any) -> list[ExportResult]:
    """Export ``formats`` in order (TensorRT needs the ONNX first; ``options`` such as
    ``example`` go to every exporter that takes them); ``say`` is told of each."""
    import inspect

    results = []
    for fmt in formats:
        say(f"exporting {fmt} ...")
        function = exporter(fmt)
        accepted = inspect.signature(function).parameters
        result = function(bundle, **{k: v for k, v in options.items() if k in accepted})
        say(f"  wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB, "
            f"{result.seconds:.1f} s)")
        results.append(result)
    return results
