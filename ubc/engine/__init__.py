"""Inference engines: one interface (``Engine.infer``), one module per backend, imported
only when used, so that a CPU-only or TensorRT-only deployment needs only its own packages.

>>> from ubc.engine import load
>>> with load("model.ubc") as engine:           # fastest backend this machine can run
...     class_logits, mask_logits = engine.infer(batch)   # float32 [B, 1, H, W]
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ubc.artifacts import PRECISIONS, stale_reason
from ubc.bundle import Bundle
from ubc.devices import resolve_device
from ubc.engine.base import Engine
from ubc.engine.registry import (
    BACKENDS,
    VARIANTS,
    Choice,
    Variant,
    backend_class,
    choose,
    parity_state,
)
from ubc.errors import BundleError

__all__ = ["BACKENDS", "VARIANTS", "Choice", "Engine", "Variant", "backend_class", "load"]

log = logging.getLogger(__name__)

_AUTO_OPTIONS = ("max_batch", "threads")


def load(bundle: Bundle | str | os.PathLike[str], backend: str = "auto", device: str = "auto",
         precision: str = "auto", *, require_parity: bool = False, **options: Any) -> Engine:
    """An engine for ``bundle`` (a ``Bundle`` or its directory).

    ``backend``: "auto" or one of ``BACKENDS`` (torch, onnxruntime, openvino, aoti,
    tensorrt). "auto" picks the fastest one this machine can run among the bundle's
    artifacts (a TensorRT plan built for this GPU, else compiled/TorchScript PyTorch on CUDA,
    else the fastest CPU runtime), never one whose sha256 does not match meta.json nor one
    recorded as failing its parity check; ``require_parity`` also skips unchecked ones.
    The choice and the reasons for skipping the others are in ``engine.selection``.
    On the CPU, where ``ubc-export --cpu`` timed the variants on this CPU class, the
    fastest timed one is tried first (``ubc.engine.registry.candidates``).
    ``device``: "auto", "cpu", "cuda" or "cuda:N". ``precision``: "auto" (with
    ``backend="auto"``: any precision whose artifact passed its parity gate and was timed
    fastest, else fp32; with a named backend: fp32), fp32, fp16, bf16 or int8 (what each
    backend offers differs). A named backend runs even an artifact recorded as failing its
    parity gate, with a logged warning. ``options`` go to the backend (see its class);
    with "auto" only ``max_batch`` and ``threads`` are accepted.
    """
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}, got "
                         f"{precision!r}")
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    # a named backend is asked which devices it runs on: an ONNX Runtime engine's "auto"
    # is the CPU without asking any driver or framework (issue 26)
    device = resolve_device(device, backend_class(backend).devices if backend != "auto"
                            else ("cpu", "cuda"))
    if backend != "auto":
        return _load_named(bundle, backend, device,
                           "fp32" if precision == "auto" else precision, options)
    unknown = sorted(set(options) - set(_AUTO_OPTIONS))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} belong to one backend; name it "
                         f"(backend='torch', ...) or pass only {', '.join(_AUTO_OPTIONS)}")
    choice = choose(bundle, device, precision, require_parity=require_parity)
    kwargs = {**choice.options, **options}
    if not VARIANTS[choice.variant].threads:
        kwargs.pop("threads", None)  # e.g. TensorRT: no host thread pool to size
    engine = backend_class(choice.backend)(bundle, device=device, precision=choice.precision,
                                           **kwargs)
    engine.selection = choice
    log.info("ubc.engine.load: %s", choice.describe())
    return engine


def _load_named(bundle: Bundle, backend: str, device: str, precision: str,
                options: dict[str, Any]) -> Engine:
    """The engine of a named backend: refused when it cannot run, warned about when its
    artifact failed its parity gate (forcing it is the caller's decision)."""
    cls = backend_class(backend)
    reason = cls.unavailable(bundle, device, precision, **options)
    if reason is not None:
        raise ValueError(f"{bundle.path}: backend {backend!r} cannot run on {device} at "
                         f"{precision}: {reason}")
    artifact = cls.artifact_for(bundle, device, precision, **options)
    stale = stale_reason(bundle, artifact)
    if stale is not None:
        raise BundleError(f"{bundle.path}: {stale}")
    variant = next((v for v in VARIANTS.values() if v.backend == backend), None)
    if variant is not None and parity_state(bundle, variant, device, precision,
                                            artifact) == "failed":
        log.warning("%s: %s %s (%s) failed its parity gate (meta.json 'parity'); running it "
                    "because backend=%r was named", bundle.path, backend, precision, artifact,
                    backend)
    return cls(bundle, device=device, precision=precision, **options)
