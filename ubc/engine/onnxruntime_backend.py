"""ONNX Runtime backend: the bundle's ``model.onnx`` on the CPU, the portable CPU path, and
its INT8 QDQ form ``model.int8.onnx`` (``ubc.export.int8_onnx``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ubc.artifacts import INPUT_NAME, INT8_ONNX, ONNX, OUTPUT_NAMES, rebuild_hint
from ubc.bundle import Bundle
from ubc.engine.base import Engine


class OnnxRuntimeEngine(Engine):
    """``model.onnx`` in an ONNX Runtime CPU session.

    ``threads``: intra-op threads (default: every core this process may use); the session
    runs one request at a time (inter-op 1, sequential), the pipeline's own threads overlap
    the rest. ``spin``: let idle ONNX Runtime threads spin between requests (lower latency,
    but they steal cores from preprocessing; off by default).
    """

    backend = "onnxruntime"
    packages = ("onnxruntime",)
    install = "pip install onnxruntime"
    devices = ("cpu",)
    precisions = {"cpu": ("fp32", "int8")}
    artifact_kinds = ("onnx", "onnx-int8")

    @classmethod
    def artifact_for(cls, bundle: Bundle, device: str, precision: str, **options: Any) -> str:
        return INT8_ONNX if precision == "int8" else ONNX

    def __init__(self, bundle: Bundle, *, device: str = "cpu", precision: str = "fp32",
                 max_batch: int = 32, threads: int | None = None, spin: bool = False) -> None:
        reason = self.unavailable(bundle, device, precision)
        if reason is not None:
            raise ValueError(f"{bundle.path}: onnxruntime backend: {reason}")
        import onnxruntime as ort

        super().__init__(bundle, device=device, precision=precision, max_batch=max_batch)
        self.artifact = self.artifact_for(bundle, device, precision)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or len(os.sched_getaffinity(0)))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # Denormal floats are many times slower on x86; values under 1e-38 change no logit.
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        options.log_severity_level = 3  # errors only: shape-inference notes are not ours
        path = bundle.file(self.artifact)
        self._session = ort.InferenceSession(str(path), sess_options=options,
                                             providers=["CPUExecutionProvider"])
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [INPUT_NAME] or set(OUTPUT_NAMES) - set(outputs):
            raise ValueError(f"{path}: expected input {INPUT_NAME!r} and outputs "
                             f"{list(OUTPUT_NAMES)}, found {inputs} -> {outputs}; re-export it "
                             f"with `{rebuild_hint(bundle.path, self.artifact)}`")
        self.check_settings(self._session.get_modelmeta().custom_metadata_map)
        self.threads = options.intra_op_num_threads

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        class_logits, mask_logits = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return class_logits, mask_logits

    def _release(self) -> None:
        self._session = None
