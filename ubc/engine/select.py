"""The ``backend="auto"`` choice: the fastest backend this machine can run among the bundle's
artifacts, skipping (and saying why) any that is missing, corrupted, built for another
machine, or recorded in meta.json as failing its parity check."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from ubc.bundle import Bundle
from ubc.engine.artifacts import WEIGHTS, artifacts_of, rebuild_hint
from ubc.engine.base import Engine
from ubc.errors import BundleError

log = logging.getLogger(__name__)

#: backend name -> "module:class", imported on first use only
BACKENDS: dict[str, str] = {
    "torch": "ubc.engine.torch_backend:TorchEngine",
    "onnxruntime": "ubc.engine.onnxruntime_backend:OnnxRuntimeEngine",
    "openvino": "ubc.engine.openvino_backend:OpenVinoEngine",
    "aoti": "ubc.engine.aoti_backend:AotiEngine",
    "tensorrt": "ubc.engine.tensorrt_backend:TensorRTEngine",
}

# Fastest first. CPU: measured with bench/cpu_engines.py at 224 x 224 on the shared 2-core
# development machine (engines issue note): ONNX Runtime 6.6 / 7.4 / 7.6 slices/s at batch
# 1 / 8 / 32 against OpenVINO 5.8 / 6.5 / 6.8 (2 threads, best of 5 interleaved rounds), and
# far ahead of TorchScript and AOTInductor, which beat each other depending on threads and
# load, and of eager PyTorch. CUDA: a TensorRT plan, then TorchScript as the engines issue
# asks; the AOTInductor package comes after it until bench/gpu_check.py shows it faster.
CPU_ORDER: tuple[tuple[str, dict[str, Any]], ...] = (
    ("onnxruntime", {}),
    ("openvino", {}),
    ("torch", {"artifact": "torchscript"}),
    ("aoti", {}),
    ("torch", {"artifact": "eager"}),
)
CUDA_ORDER: tuple[tuple[str, dict[str, Any]], ...] = (
    ("tensorrt", {}),
    ("torch", {"artifact": "torchscript"}),
    ("aoti", {}),
    ("torch", {"artifact": "eager"}),
)


def backend_class(name: str) -> type[Engine]:
    """The engine class of backend ``name`` (imports its module, not its runtime)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    module_name, _, class_name = BACKENDS[name].partition(":")
    cls: type[Engine] = getattr(importlib.import_module(module_name), class_name)
    return cls


def parity_key(backend: str, device: str, precision: str, artifact: str) -> str:
    """Key of a parity record in ``meta["parity"]``, e.g. ``onnxruntime:cpu:fp32:model.onnx``."""
    return f"{backend}:{device.partition(':')[0]}:{precision}:{artifact}"


@dataclass(frozen=True)
class Choice:
    """What ``load`` picked and why the candidates before it were passed over."""

    backend: str
    device: str
    precision: str
    artifact: str
    options: dict[str, Any] = field(default_factory=dict)
    parity: str = "unchecked"  # "passed" | "unchecked" (failed ones are never chosen)
    rejected: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        lines = [f"{self.backend} on {self.device} ({self.precision}, {self.artifact}, "
                 f"parity {self.parity})"]
        lines += [f"  skipped {label}: {reason}" for label, reason in self.rejected]
        return "\n".join(lines)


def _parity_state(bundle: Bundle, key: str) -> str:
    record = bundle.meta.get("parity", {}).get(key)
    if not isinstance(record, dict):
        return "unchecked"
    sha = record.get("sha256")
    if sha is not None and sha != bundle.meta["files"].get(record.get("artifact", "")):
        return "unchecked"  # the record is about an older export of this artifact
    return "passed" if record.get("passed") else "failed"


def stale_reason(bundle: Bundle, artifact: str) -> str | None:
    """Why ``artifact`` no longer matches the bundle's weights (None when it does)."""
    entry = artifacts_of(bundle.meta).get(artifact, {})
    made_from = entry.get("weights_sha256")
    if made_from is not None and made_from != bundle.meta["files"].get(WEIGHTS):
        return (f"{artifact} was exported from other weights than the bundle's weights.pt; "
                f"rebuild it: `{rebuild_hint(bundle.path, artifact)}`")
    return None


def _label(backend: str, options: dict[str, Any]) -> str:
    return f"{backend}({options['artifact']})" if "artifact" in options else backend


def choose(bundle: Bundle, device: str, precision: str, *,
           require_parity: bool = False) -> Choice:
    """The first candidate of the device's order that can run; BundleError if none can."""
    order = CUDA_ORDER if device.startswith("cuda") else CPU_ORDER
    rejected: list[tuple[str, str]] = []
    for backend, options in order:
        label = _label(backend, options)
        cls = backend_class(backend)
        reason = cls.unavailable(bundle, device, precision, **options)
        if reason is None:
            artifact = cls.artifact_for(bundle, device, precision, **options)
            try:
                bundle.file(artifact)  # verifies the sha256 (cached per size and mtime)
                reason = stale_reason(bundle, artifact)
            except BundleError as exc:
                log.warning("not using %s: %s", label, exc)
                reason = f"corrupted: {exc}"
        if reason is None:
            # Eager fp32 on the CPU is the reference itself: it passes by definition.
            reference = (artifact, precision, device) == (WEIGHTS, "fp32", "cpu")
            state = "passed" if reference else \
                _parity_state(bundle, parity_key(backend, device, precision, artifact))
            if state == "failed":
                reason = "failed its parity check (meta.json 'parity'; re-export it)"
            elif state == "unchecked" and require_parity:
                reason = f"no parity record (run `ubc-export {bundle.path} --check`)"
        if reason is not None:
            rejected.append((label, reason))
            continue
        return Choice(backend=backend, device=device, precision=precision, artifact=artifact,
                      options=dict(options), parity=state, rejected=tuple(rejected))
    details = "; ".join(f"{label}: {reason}" for label, reason in rejected)
    raise BundleError(f"{bundle.path}: no backend can run it on {device} at {precision} "
                      f"({details})")
