"""What a benchmark run measures: the options, the variants a user can name (a backend of
``ubc.engine`` with its options), and the expansion of variants x precisions into cells,
each either runnable here or unavailable with the backend's own reason."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ubc.benchmark.results import Unavailable
from ubc.bundle import Bundle

DEFAULT_BATCH_SIZES = (1, 8, 32)


@dataclass(frozen=True)
class Variant:
    """A named way to run the bundle: ``backend`` of ``ubc.engine`` with ``options``.
    ``devices``: where it can run at all. ``any_batch``: the engine takes any ``max_batch``
    (a compiled AOTInductor package or TensorRT plan has its own batch range)."""

    name: str
    backend: str
    description: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    devices: tuple[str, ...] = ("cpu", "cuda")
    any_batch: bool = True
    threads: bool = True


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("torch", "torch", "eager PyTorch (weights.pt + model code)",
            MappingProxyType({"artifact": "eager"})),
    Variant("torchscript", "torch", "TorchScript (model.ts), optimised for inference",
            MappingProxyType({"artifact": "torchscript"})),
    Variant("cudagraphs", "torch", "eager PyTorch replayed from CUDA graphs",
            MappingProxyType({"artifact": "eager", "cuda_graphs": True}), devices=("cuda",)),
    Variant("aoti", "aoti", "AOTInductor package (model.*.pt2)", any_batch=False),
    Variant("onnxruntime", "onnxruntime", "ONNX Runtime CPU (model.onnx)"),
    Variant("openvino", "openvino", "OpenVINO CPU (model.onnx)"),
    Variant("tensorrt", "tensorrt", "TensorRT plan for this GPU", any_batch=False,
            threads=False),
)}
#: the choice a user would otherwise make; every run measures it, every row is compared to it
BASELINE = "torch"


@dataclass(frozen=True)
class BenchOptions:
    """Options of a run (``ubc-bench`` arguments).

    ``variants``/``precisions``: None means every variant / the precisions that matter on
    the device (fp32 on the CPU, plus OpenVINO bf16 where the CPU has bf16 units; fp32 and
    fp16 on CUDA, plus each TensorRT plan precision the bundle holds). ``max_seconds``:
    time budget of one batch size's timed calls (at least ``MIN_ITERATIONS`` are made).
    ``rounds``: split each variant's calls (and budget) into this many rounds run in turn
    (variant A, B, ..., then A, B, ... again), so that a machine whose load drifts treats
    them alike; the rounds' samples are merged. ``isolate``: each variant in a fresh
    process (no thread pool, allocator or cache left by another runtime; its own peak
    memory). ``parity_slices``: 0 skips parity.
    ``pipeline_cases``: 0 skips the ``ubc-infer`` row. ``volume_shape``: the generated
    volumes (None: a BraTS-like field of view for the bundle's geometry). ``volume``: a
    NIfTI file to time the preprocessing on instead of the first generated volume.
    """

    variants: tuple[str, ...] | None = None
    precisions: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    device: str = "auto"
    warmup: int = 3
    iters: int = 20
    max_seconds: float = 20.0
    rounds: int = 1
    threads: int | None = None
    parity_slices: int = 64
    isolate: bool = True
    preprocessing: bool = True
    peer: bool = True
    pipeline_cases: int = 4
    pipeline_backend: str = "auto"
    volume_shape: tuple[int, int, int] | None = None
    volume: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.warmup < 0 or self.iters < 1:
            raise ValueError(f"--warmup must be >= 0 and --iters >= 1, got {self.warmup} "
                             f"and {self.iters}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if self.max_seconds <= 0:
            raise ValueError(f"--max-seconds must be > 0, got {self.max_seconds}")
        if self.parity_slices < 0 or self.pipeline_cases < 0:
            raise ValueError("--parity-slices and --pipeline-cases must be >= 0")
        if self.volume is not None and not os.path.isfile(self.volume):
            raise FileNotFoundError(f"--volume {self.volume}: no such file")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        unknown = sorted(set(self.variants or ()) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from auto, "
                             f"{', '.join(VARIANTS)}")
        from ubc.parity import TOLERANCES

        bad = sorted(set(self.precisions or ()) - set(TOLERANCES))
        if bad:
            raise ValueError(f"unknown precision(s) {', '.join(bad)}; choose from "
                             f"{', '.join(TOLERANCES)}")


@dataclass(frozen=True)
class Cell:
    """One variant at one precision, timed at every batch size of the run."""

    variant: Variant
    precision: str
    device: str

    @property
    def is_baseline(self) -> bool:
        return self.variant.name == BASELINE and self.precision == "fp32"

    @property
    def is_reference(self) -> bool:
        """Eager fp32 on the CPU is the parity reference itself."""
        return self.is_baseline and self.device == "cpu"

    def engine_options(self, options: BenchOptions) -> dict[str, Any]:
        """Keyword options for ``ubc.engine.load``."""
        kwargs = dict(self.variant.options)
        if self.variant.any_batch:
            kwargs["max_batch"] = max(options.batch_sizes)
        if self.variant.threads and options.threads is not None:
            kwargs["threads"] = options.threads
        return kwargs


def _cpu_has_bf16() -> bool:
    from ubc.benchmark.machine import cpu_facts

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_facts()["flags"]))


def _plan_precisions(bundle: Bundle) -> list[str]:
    from ubc.artifacts import artifacts_of, parse_plan_name

    found = {(parse_plan_name(n) or {}).get("precision") for n in artifacts_of(bundle.meta)}
    return sorted(p for p in found if p) or ["fp16"]


def default_precisions(variant: Variant, device: str, bundle: Bundle) -> list[str]:
    """The precisions worth timing for ``variant`` on ``device`` (see ``BenchOptions``)."""
    if device == "cpu":
        if variant.name == "openvino" and _cpu_has_bf16():
            return ["fp32", "bf16"]
        return ["fp32"]
    if variant.name == "tensorrt":
        return _plan_precisions(bundle)
    if variant.backend == "torch":
        return ["fp32", "fp16"]
    return ["fp32"]


def _why_not(cell: Cell, bundle: Bundle, options: BenchOptions) -> str | None:
    from ubc.engine import backend_class

    kind = cell.device.partition(":")[0]
    if kind not in cell.variant.devices:
        return f"runs on {' or '.join(cell.variant.devices)} only, not {kind}"
    cls = backend_class(cell.variant.backend)
    try:
        return cls.unavailable(bundle, cell.device, cell.precision,
                               **cell.engine_options(options))
    except Exception as exc:  # e.g. a GPU query failing: report it, do not abort the run
        return f"cannot tell ({type(exc).__name__}: {exc})"


def plan(bundle: Bundle, device: str, options: BenchOptions
         ) -> tuple[list[Cell], list[Unavailable]]:
    """The cells to time (the baseline first) and those that cannot run here, with why."""
    names = list(options.variants or VARIANTS)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    names.sort(key=lambda n: n != BASELINE)
    runnable: list[Cell] = []
    unavailable: list[Unavailable] = []
    for name in names:
        variant = VARIANTS[name]
        precisions: Sequence[str] = options.precisions or \
            default_precisions(variant, device, bundle)
        if name == BASELINE and "fp32" not in precisions:
            precisions = ["fp32", *precisions]
        for precision in precisions:
            cell = Cell(variant, precision, device)
            reason = _why_not(cell, bundle, options)
            if reason is None:
                runnable.append(cell)
            else:
                unavailable.append(Unavailable("engine", name, reason, device=device,
                                               precision=precision))
    return runnable, unavailable
