"""What a benchmark run measures: its options, and the expansion of the variants of
``ubc.engine.registry.VARIANTS`` x precisions into cells, each either runnable here or
unavailable with the backend's own reason.

By default a variant is timed at every precision its backend offers on the device that the
backend says it can run here; the precisions parity checks and ``backend="auto"`` consider
(``Variant.checked_precisions``) are the ones that count, the others are informational:
timed and parity-checked, marked, never a reason for ``ubc-bench`` to fail.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ubc.benchmark.results import Unavailable
from ubc.bundle import Bundle
from ubc.engine.registry import BASELINE, VARIANTS, Variant, device_kind, is_reference

DEFAULT_BATCH_SIZES = (1, 8, 32)


@dataclass(frozen=True)
class BenchOptions:
    """Options of a run (``ubc-bench`` arguments).

    ``variants``/``precisions``: None means every variant / every precision its backend
    offers on the device and can run here (see the module doc). ``max_seconds``:
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
    """One variant at one precision, timed at every batch size of the run.
    ``informational``: not something ``backend="auto"`` could pick (see the module doc)."""

    variant: Variant
    precision: str
    device: str
    informational: bool = False

    @property
    def is_baseline(self) -> bool:
        return self.variant.name == BASELINE and self.precision == "fp32"

    @property
    def is_reference(self) -> bool:
        return is_reference(self.variant, self.device, self.precision)

    def engine_options(self, options: BenchOptions) -> dict[str, Any]:
        """Keyword options for ``ubc.engine.load``."""
        kwargs = dict(self.variant.options)
        if self.variant.any_batch:
            kwargs["max_batch"] = max(options.batch_sizes)
        if self.variant.threads and options.threads is not None:
            kwargs["threads"] = options.threads
        return kwargs


def _why_not(cell: Cell, bundle: Bundle, options: BenchOptions) -> str | None:
    try:
        return cell.variant.engine_class.unavailable(bundle, cell.device, cell.precision,
                                                     **cell.engine_options(options))
    except Exception as exc:  # e.g. a GPU query failing: report it, do not abort the run
        return f"cannot tell ({type(exc).__name__}: {exc})"


def _cells(variant: Variant, bundle: Bundle, device: str, options: BenchOptions
           ) -> tuple[list[Cell], list[Unavailable]]:
    kind = device_kind(device)
    if not variant.runs_on(kind):
        where = " or ".join(variant.devices or variant.engine_class.devices)
        return [], [Unavailable("engine", variant.name, f"{variant.label} runs on {where} "
                                f"only, not {kind}", device=device)]
    checked = variant.checked_precisions(kind, bundle) if variant.auto else ()
    precisions: Sequence[str] = options.precisions or variant.offered(kind)
    if variant.name == BASELINE and "fp32" not in precisions:
        precisions = ["fp32", *precisions]
    cells, unavailable = [], []
    for precision in precisions:
        cell = Cell(variant, precision, device, informational=precision not in checked)
        reason = _why_not(cell, bundle, options)
        if reason is None:
            cells.append(cell)
        else:
            unavailable.append(Unavailable("engine", variant.name, reason, device=device,
                                           precision=precision))
    return cells, unavailable


def plan(bundle: Bundle, device: str, options: BenchOptions
         ) -> tuple[list[Cell], list[Unavailable]]:
    """The cells to time (the baseline first) and those that cannot run here, with why."""
    names = sorted({BASELINE, *(options.variants or VARIANTS)},
                   key=lambda n: (n != BASELINE, list(VARIANTS).index(n)))
    runnable: list[Cell] = []
    unavailable: list[Unavailable] = []
    for name in names:
        cells, missing = _cells(VARIANTS[name], bundle, device, options)
        runnable += cells
        unavailable += missing
    return runnable, unavailable
