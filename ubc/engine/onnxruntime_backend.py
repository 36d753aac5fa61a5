"""ONNX Runtime backend: the bundle's ``model.onnx`` on the CPU, the portable CPU path."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from ubc.artifacts import INPUT_NAME, ONNX, OUTPUT_NAMES, onnx_metadata_mismatch
from ubc.bundle import Bundle
from ubc.engine.base import Engine
from ubc.errors import BundleError

INSTALL_HINT = "pip install onnxruntime"


class OnnxRuntimeEngine(Engine):
    """``model.onnx`` in an ONNX Runtime CPU session.

    ``threads``: intra-op threads (default: every core this process may use); the session
    runs one request at a time (inter-op 1, sequential), the pipeline's own threads overlap
    the rest. ``spin``: let idle ONNX Runtime threads spin between requests (lower latency,
    but they steal cores from preprocessing; off by default).
    """

    backend = "onnxruntime"
    devices = ("cpu",)
    precisions = {"cpu": ("fp32",)}
    artifact_kinds = ("onnx",)

    @classmethod
    def artifact_for(cls, bundle: Bundle, device: str, precision: str, **options: Any) -> str:
        return ONNX

    @classmethod
    def unavailable(cls, bundle: Bundle, device: str, precision: str,
                    **options: Any) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return f"onnxruntime is not installed ({INSTALL_HINT})"
        reason = cls.unsupported(device, precision)
        if reason is not None:
            return reason
        if not bundle.has(ONNX):
            return f"the bundle has no {ONNX} (make it with `ubc-export {bundle.path} --onnx`)"
        return None

    def __init__(self, bundle: Bundle, *, device: str = "cpu", precision: str = "fp32",
                 max_batch: int = 32, threads: int | None = None, spin: bool = False) -> None:
        reason = self.unavailable(bundle, device, precision)
        if reason is not None:
            raise ValueError(f"{bundle.path}: onnxruntime backend: {reason}")
        import onnxruntime as ort

        super().__init__(bundle, device=device, precision=precision, max_batch=max_batch)
        self.artifact = ONNX
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or len(os.sched_getaffinity(0)))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # Denormal floats are many times slower on x86; values under 1e-38 change no logit.
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        options.log_severity_level = 3  # errors only: shape-inference notes are not ours
        path = bundle.file(ONNX)
        self._session = ort.InferenceSession(str(path), sess_options=options,
                                             providers=["CPUExecutionProvider"])
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [INPUT_NAME] or set(OUTPUT_NAMES) - set(outputs):
            raise ValueError(f"{path}: expected input {INPUT_NAME!r} and outputs "
                             f"{list(OUTPUT_NAMES)}, found {inputs} -> {outputs}; re-export it "
                             f"with `ubc-export {bundle.path} --onnx`")
        mismatch = onnx_metadata_mismatch(bundle.meta,
                                          self._session.get_modelmeta().custom_metadata_map)
        if mismatch is not None:
            raise BundleError(f"{path}: {mismatch}; re-export it with "
                              f"`ubc-export {bundle.path} --onnx`")
        self.threads = options.intra_op_num_threads

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        class_logits, mask_logits = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return class_logits, mask_logits

    def _release(self) -> None:
        self._session = None
