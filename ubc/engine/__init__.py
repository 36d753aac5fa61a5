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
from ubc.engine.registry import BACKENDS, VARIANTS, Choice, Variant, backend_class, choose
from ubc.errors import BundleError

__all__ = ["BACKENDS", "VARIANTS", "Choice", "Engine", "Variant", "backend_class", "load"]

log = logging.getLogger(__name__)

_AUTO_OPTIONS = ("max_batch", "threads")


def load(bundle: Bundle | str | os.PathLike[str], backend: str = "auto", device: str = "auto",
         precision: str = "fp32", *, require_parity: bool = False, **options: Any) -> Engine:
    """An engine for ``bundle`` (a ``Bundle`` or its directory).

    ``backend``: "auto" or one of ``BACKENDS`` (torch, onnxruntime, openvino, aoti,
    tensorrt). "auto" picks the fastest one this machine can run among the bundle's
    artifacts (a TensorRT plan built for this GPU, else compiled/TorchScript PyTorch on CUDA,
    else the fastest CPU runtime), never one whose sha256 does not match meta.json nor one
    recorded as failing its parity check; ``require_parity`` also skips unchecked ones.
    The choice and the reasons for skipping the others are in ``engine.selection``.
    ``device``: "auto", "cpu", "cuda" or "cuda:N". ``precision``: fp32, fp16, bf16 or int8
    (what each backend offers differs). ``options`` go to the backend (see its class);
    with "auto" only ``max_batch`` and ``threads`` are accepted.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    device = resolve_device(device)
    if backend != "auto":
        cls = backend_class(backend)
        reason = cls.unavailable(bundle, device, precision, **options)
        if reason is not None:
            raise ValueError(f"{bundle.path}: backend {backend!r} cannot run on {device} at "
                             f"{precision}: {reason}")
        stale = stale_reason(bundle, cls.artifact_for(bundle, device, precision, **options))
        if stale is not None:
            raise BundleError(f"{bundle.path}: {stale}")
        return cls(bundle, device=device, precision=precision, **options)
    unknown = sorted(set(options) - set(_AUTO_OPTIONS))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} belong to one backend; name it "
                         f"(backend='torch', ...) or pass only {', '.join(_AUTO_OPTIONS)}")
    choice = choose(bundle, device, precision, require_parity=require_parity)
    kwargs = {**choice.options, **options}
    if not VARIANTS[choice.variant].threads:
        kwargs.pop("threads", None)  # e.g. TensorRT: no host thread pool to size
    engine = backend_class(choice.backend)(bundle, device=device, precision=precision, **kwargs)
    engine.selection = choice
    log.info("ubc.engine.load: %s", choice.describe())
    return engine
