"""The one table of ways to run a bundle, and the ``backend="auto"`` choice derived from it.

Each backend class declares what it needs and can do (``packages``, ``devices``,
``precisions`` per device kind, ``artifact_kinds``); ``VARIANTS`` names the ways to run it
(a backend with options), fastest first on each device: the one entry a new backend adds.
The backends, the automatic order, the parity candidates and the benchmark's variants are
all read from this table.

The automatic choice is the first variant of the device's order that can run here,
skipping (and saying why) any whose artifact is missing, corrupted, built for another
machine, or recorded in meta.json as failing its parity check. On the CPU the order is the
measured one where ``ubc-export --cpu`` recorded timings for this CPU class
(``ubc.devices.cpu_class``): fastest first, the static order below for those not timed
(with a warning naming ``ubc-export --cpu --retime`` when only other classes were timed).
With ``precision="auto"`` the candidates are every checked precision of every variant; a
reduced precision (bf16, int8, fp16) is then picked only when it passed its parity gate
and was timed; without timings the choice is the static order at fp32.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ubc.artifacts import (
    artifacts_of,
    parity_key,
    parse_plan_name,
    stale_reason,
    timed_cpu_classes,
    timing_key,
    timings_of,
)
from ubc.bundle import Bundle
from ubc.engine.base import Engine
from ubc.errors import BundleError

log = logging.getLogger(__name__)

def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Variant:
    """A named way to run a bundle: ``backend`` with ``options``.

    ``devices``: a narrower set of device kinds than the backend's (None: the backend's).
    ``checked``: per device kind, the precisions that parity checks and ``auto`` consider
    (default fp32); the others the backend offers are informational (benchmarked, never
    picked by ``auto``). ``auto``: part of the automatic order. ``any_batch``: the engine
    takes any ``max_batch`` (a compiled package or plan has its own batch range).
    ``threads``: it has a host thread pool to size.
    """

    name: str
    backend: str
    description: str
    options: Mapping[str, Any] = field(default_factory=_frozen)
    devices: tuple[str, ...] | None = None
    checked: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen)
    auto: bool = True
    any_batch: bool = True
    threads: bool = True

    @property
    def engine_class(self) -> type[Engine]:
        return backend_class(self.backend)

    def runs_on(self, kind: str) -> bool:
        """Whether this variant can run on device kind ``kind`` (cpu, cuda) at all."""
        return kind in (self.devices or self.engine_class.devices)

    def offered(self, kind: str) -> tuple[str, ...]:
        """Every precision the backend offers on ``kind`` (empty if it cannot run there)."""
        return tuple(self.engine_class.precisions.get(kind, ())) if self.runs_on(kind) else ()

    def checked_precisions(self, kind: str, bundle: Bundle | None = None) -> tuple[str, ...]:
        """The precisions parity checks and ``auto`` consider on ``kind``; for a backend of
        compiled plans, those the bundle holds plans for (fp16 when it holds none)."""
        if not self.runs_on(kind):
            return ()
        if "plan" in self.engine_class.artifact_kinds and bundle is not None:
            held = sorted({(parse_plan_name(n) or {}).get("precision", "")
                           for n in artifacts_of(bundle.meta)} - {""})
            return tuple(held) or ("fp16",)
        return self.checked.get(kind, ("fp32",))

    @property
    def label(self) -> str:
        return self.name if self.name == self.backend else f"{self.backend}({self.name})"


# Fastest first on each device. CPU: measured with `ubc-bench` at 224 x 224 on the shared
# 2-core development machine (bench/RESULTS.md): ONNX Runtime and OpenVINO within 5-8% of
# each other, ONNX Runtime steadier under contention; far ahead of TorchScript and
# AOTInductor, which beat each other depending on threads and load, and of eager PyTorch.
# CUDA: a TensorRT plan, then TorchScript; the AOTInductor package after it until
# bench/gpu_check.py shows it faster.
_TORCH_GPU = MappingProxyType({"cuda": ("fp32", "fp16")})
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("tensorrt", "tensorrt", "TensorRT plan for this GPU", any_batch=False,
            threads=False),
    Variant("onnxruntime", "onnxruntime", "ONNX Runtime CPU (model.onnx, model.int8.onnx)",
            checked=_frozen({"cpu": ("fp32", "int8")})),
    Variant("openvino", "openvino", "OpenVINO CPU (model.onnx; bf16 where native; "
            "model.int8.xml)", checked=_frozen({"cpu": ("fp32", "bf16", "int8")})),
    Variant("torchscript", "torch", "TorchScript (model.ts), optimised for inference",
            _frozen({"artifact": "torchscript"}), checked=_TORCH_GPU),
    Variant("aoti", "aoti", "AOTInductor package (model.*.pt2)", any_batch=False),
    Variant("cudagraphs", "torch", "eager PyTorch replayed from CUDA graphs",
            _frozen({"artifact": "eager", "cuda_graphs": True}), devices=("cuda",),
            checked=_TORCH_GPU, auto=False),
    Variant("torch", "torch", "eager PyTorch (weights.pt + model code)",
            _frozen({"artifact": "eager"}), checked=_TORCH_GPU),
)}
#: every backend, each run by a class of ``ubc/engine/<backend>_backend.py``
BACKENDS = tuple(dict.fromkeys(v.backend for v in VARIANTS.values()))


def backend_class(name: str) -> type[Engine]:
    """The engine class of backend ``name``: the ``Engine`` of ``ubc.engine.<name>_backend``
    whose ``backend`` is ``name`` (imports its module, not its runtime)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    module = importlib.import_module(f"ubc.engine.{name}_backend")
    return next(c for _, c in inspect.getmembers(module, inspect.isclass)
                if issubclass(c, Engine) and c.backend == name)


#: eager PyTorch: the baseline every benchmark row is compared with, and on the CPU at
#: fp32 the parity reference itself
BASELINE = "torch"


def device_kind(device: str) -> str:
    """``cuda:1`` -> ``cuda``."""
    return device.partition(":")[0]


def auto_order(device: str) -> list[Variant]:
    """The variants ``auto`` tries on ``device``, fastest first."""
    kind = device_kind(device)
    return [v for v in VARIANTS.values() if v.auto and v.runs_on(kind)]


def is_reference(variant: Variant, device: str, precision: str) -> bool:
    """Eager fp32 on the CPU is the parity reference itself: it passes by definition."""
    return (variant.name, device_kind(device), precision) == (BASELINE, "cpu", "fp32")


def parity_candidates(bundle: Bundle, device: str) -> list[tuple[Variant, str]]:
    """(variant, precision) pairs a parity check of ``bundle`` on ``device`` covers: every
    automatic variant at each of its checked precisions, the reference excepted."""
    kind = device_kind(device)
    return [(v, p) for v in auto_order(device) for p in v.checked_precisions(kind, bundle)
            if not is_reference(v, device, p)]


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
    variant: str = ""

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


def _rejection(variant: Variant, bundle: Bundle, device: str, precision: str,
               require_parity: bool) -> tuple[str | None, str, str]:
    """(why ``variant`` cannot be chosen or None, its artifact, its parity state)."""
    cls = variant.engine_class
    reason = cls.unavailable(bundle, device, precision, **variant.options)
    if reason is not None:
        return reason, "", "unchecked"
    artifact = cls.artifact_for(bundle, device, precision, **variant.options)
    try:
        bundle.file(artifact)  # verifies the sha256 (cached per size and mtime)
        reason = stale_reason(bundle, artifact)
    except BundleError as exc:
        log.warning("not using %s: %s", variant.label, exc)
        reason = f"corrupted: {exc}"
    if reason is not None:
        return reason, artifact, "unchecked"
    state = parity_state(bundle, variant, device, precision, artifact)
    if state == "failed":
        return "failed its parity check (meta.json 'parity'; re-export it)", artifact, state
    if state == "unchecked" and require_parity:
        return f"no parity record (run `ubc-export {bundle.path} --check`)", artifact, state
    return None, artifact, state


def parity_state(bundle: Bundle, variant: Variant, device: str, precision: str,
                 artifact: str) -> str:
    """passed, failed or unchecked: what meta.json records for this artifact's parity."""
    if is_reference(variant, device, precision):
        return "passed"
    return _parity_state(bundle, parity_key(variant.backend, device, precision, artifact))


def recorded_speed(bundle: Bundle, variant: Variant, precision: str,
                   cpu_class: str) -> float | None:
    """Slices/s ``ubc-export --cpu`` measured for ``variant`` at ``precision`` on this CPU
    class, None when not measured or measured on an older export of its artifact."""
    record = timings_of(bundle.meta, cpu_class).get(timing_key(variant.name, precision))
    if not isinstance(record, dict) or "slices_per_s" not in record:
        return None
    if record.get("sha256") != bundle.meta["files"].get(str(record.get("artifact", ""))):
        return None
    return float(record["slices_per_s"])


#: (bundle, CPU class) pairs already warned about in this process
_WARNED_UNTIMED: set[tuple[str, str]] = set()


def _warn_timed_elsewhere(bundle: Bundle, here: str) -> None:
    """Say so when the bundle was timed on other CPU classes only (exported on an AVX-512
    machine, run on an AVX2 one): ``auto`` then falls back to the static order."""
    elsewhere = [c for c in timed_cpu_classes(bundle.meta) if c != here]
    if elsewhere and (str(bundle.path), here) not in _WARNED_UNTIMED:
        _WARNED_UNTIMED.add((str(bundle.path), here))
        log.warning("%s: CPU timings recorded for %s only, not for this CPU (%s): backend "
                    "'auto' falls back to the static order; `ubc-export %s --cpu --retime` "
                    "times the gated artifacts here (seconds each) so that it picks the "
                    "fastest", bundle.path, ", ".join(elsewhere), here, bundle.path)


def candidates(bundle: Bundle, device: str, precision: str) -> list[tuple[Variant, str]]:
    """(variant, precision) pairs ``choose`` tries, in order: on the CPU the ones timed on
    this CPU class fastest first, then the static order (at fp32 only, for "auto")."""
    kind = device_kind(device)
    pairs = [(v, p) for v in auto_order(device)
             for p in (v.checked_precisions(kind, bundle) if precision == "auto"
                       else (precision,))]
    if kind != "cpu":
        return [(v, p) for v, p in pairs if precision != "auto" or p == "fp32"]
    from ubc.devices import cpu_class

    here = cpu_class()
    speeds = {(v.name, p): recorded_speed(bundle, v, p, here) for v, p in pairs}
    timed = sorted((pair for pair in pairs if speeds[pair[0].name, pair[1]] is not None),
                   key=lambda pair: -(speeds[pair[0].name, pair[1]] or 0.0))
    if not timed:
        _warn_timed_elsewhere(bundle, here)
    rest = [(v, p) for v, p in pairs if speeds[v.name, p] is None
            and (precision != "auto" or p == "fp32")]
    return timed + rest


def choose(bundle: Bundle, device: str, precision: str, *,
           require_parity: bool = False) -> Choice:
    """The first of ``candidates`` that can run; BundleError if none can. With
    ``precision="auto"`` a reduced precision needs a passed parity record."""
    rejected: list[tuple[str, str]] = []
    for variant, wanted in candidates(bundle, device, precision):
        reason, artifact, state = _rejection(variant, bundle, device, wanted,
                                             require_parity or (precision == "auto"
                                                                and wanted != "fp32"))
        label = variant.label if wanted == "fp32" or precision != "auto" else \
            f"{variant.label} {wanted}"
        if reason is not None:
            rejected.append((label, reason))
            continue
        return Choice(backend=variant.backend, device=device, precision=wanted,
                      artifact=artifact, options=dict(variant.options), parity=state,
                      rejected=tuple(rejected), variant=variant.name)
    details = "; ".join(f"{label}: {reason}" for label, reason in rejected)
    raise BundleError(f"{bundle.path}: no backend can run it on {device} at {precision} "
                      f"({details})")


__all__ = ["BACKENDS", "BASELINE", "VARIANTS", "Choice", "Variant", "auto_order",
           "backend_class", "candidates", "choose", "device_kind", "is_reference",
           "parity_candidates", "parity_state", "recorded_speed"]
