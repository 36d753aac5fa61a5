"""OpenVINO backend: the bundle's ``model.onnx`` compiled for the CPU at fp32 or bf16, and its
INT8 IR ``model.int8.xml`` (``ubc.export.int8_openvino``; optional extra)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ubc.artifacts import INT8_OPENVINO, ONNX, OUTPUT_NAMES, artifacts_of
from ubc.bundle import EMBEDDED_SETTINGS, Bundle
from ubc.devices import native_bf16
from ubc.engine.base import Engine

# OpenVINO picks bf16 by itself on CPUs that have it; we say which precision we want. The
# INT8 IR's floating-point ops run as its export chose them (``float_ops``: bf16 where the
# CPU computes it natively, which the export measured its gate margin with), else fp32.
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def _hint(bundle: Bundle, precision: str) -> str:
    if precision != "int8":
        return _HINTS[precision]
    chosen = artifacts_of(bundle.meta).get(INT8_OPENVINO, {}).get("float_ops")
    return "bf16" if chosen == "bf16" and native_bf16() else "f32"


def model_settings(model: Any) -> dict[str, str]:
    """The ``ubc.*`` metadata of a model OpenVINO read: an ONNX file's ``metadata_props``
    (rt_info ``framework``) or what ``ubc.export.int8_openvino`` set (rt_info ``ubc``)."""
    found = {}
    for setting in EMBEDDED_SETTINGS:
        key = f"ubc.{setting}"
        for path in (["ubc", setting], ["framework", key]):
            if model.has_rt_info(path):
                found[key] = str(model.get_rt_info(path).astype(str))
                break
    return found


class OpenVinoEngine(Engine):
    """``model.onnx`` read and compiled by OpenVINO for its CPU plugin.

    ``threads``: inference threads (default: every core this process may use).
    ``precision``: fp32; bf16 on CPUs that compute it natively (AVX512-BF16 or AMX, read
    from the CPU flags, confirmed by OpenVINO's OPTIMIZATION_CAPABILITIES; OpenVINO's own
    choice otherwise drifts to bf16 on such CPUs, so fp32 is asked for explicitly); int8
    (the NNCF IR, its floating-point ops in bf16 where its export chose so and the CPU
    computes bf16 natively). ``hint``: OpenVINO's performance hint, LATENCY (one request at a time,
    our use) or THROUGHPUT.
    """

    backend = "openvino"
    packages = ("openvino",)
    install = "pip install ubc[openvino]"
    devices = ("cpu",)
    precisions = {"cpu": ("fp32", "bf16", "int8")}
    artifact_kinds = ("onnx", "openvino-int8")

    @classmethod
    def artifact_for(cls, bundle: Bundle, device: str, precision: str, **options: Any) -> str:
        return INT8_OPENVINO if precision == "int8" else ONNX

    @classmethod
    def unfit(cls, bundle: Bundle, name: str, device: str, precision: str) -> str | None:
        if precision == "bf16" and native_bf16() is False:
            return "this CPU has no native bf16 (AVX512-BF16 or AMX); use fp32 or int8"
        return None

    def __init__(self, bundle: Bundle, *, device: str = "cpu", precision: str = "fp32",
                 max_batch: int = 32, threads: int | None = None,
                 hint: str = "LATENCY") -> None:
        reason = self.unavailable(bundle, device, precision)
        if reason is not None:
            raise ValueError(f"{bundle.path}: openvino backend: {reason}")
        if hint not in ("LATENCY", "THROUGHPUT"):
            raise ValueError(f"hint must be 'LATENCY' or 'THROUGHPUT', got {hint!r}")
        import openvino as ov

        super().__init__(bundle, device=device, precision=precision, max_batch=max_batch)
        self.artifact = self.artifact_for(bundle, device, precision)
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU",
                                                                   "OPTIMIZATION_CAPABILITIES"):
            raise ValueError("this CPU has no bf16 support; use precision='fp32'")
        self.threads = int(threads or len(os.sched_getaffinity(0)))
        self.config = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": self.threads,
                       "INFERENCE_PRECISION_HINT": _hint(bundle, precision)}
        model = self.read_model(core)
        self.check_settings(model_settings(model))
        self._compiled = core.compile_model(model, "CPU", self.config)
        self._request = self._compiled.create_infer_request()
        self._outputs = [self._compiled.output(name) for name in OUTPUT_NAMES]

    def read_model(self, core: Any) -> Any:
        """The artifact as an ``openvino.Model`` (graph + weights file where it has one)."""
        weights = artifacts_of(self.bundle.meta).get(self.artifact, {}).get("weights_file")
        return core.read_model(str(self.bundle.file(self.artifact)),
                               *([str(self.bundle.file(weights))] if weights else []))

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = self._request.infer([batch])
        # The request reuses its output memory: copy before the next call overwrites it.
        class_logits, mask_logits = (np.array(results[o], copy=True) for o in self._outputs)
        return class_logits, mask_logits

    def _release(self) -> None:
        self._request = None
        self._compiled = None
