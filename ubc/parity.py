"""Parity of every exported form with eager PyTorch fp32 on the same preprocessed slices.

Measured: max |delta| of the class logits (absolute, and relative to the largest reference
logit), max |delta P(HGG)|, max |delta| of the mask logits, Dice between the masks
thresholded at probability 0.5 (logit 0), and the share of slices whose predicted class
differs. The class-logit tolerance applies to ``max|delta| / max(1, max|reference|)``: the
plain absolute error for a trained model (|logits| of a few units) and a relative one for a
randomly initialised network, whose eval-mode logits reach thousands. Case gates on top:
no case of the held-out sets changes status or class. The caller hands in the slices and
the cases (``ubc.check_data`` makes them). ``ubc.parity_timing`` times what passed,
``ubc.export_job`` is the ``ubc-export`` run (export, check, time).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ubc.artifacts import Outputs, parity_key
from ubc.bundle import Bundle
from ubc.metrics import dice
from ubc.scoring.aggregate import p_hgg_of

MIN_SLICES = 64
#: (device kind, precision) whose failures are gates, not errors: such an artifact is
#: recorded as failing and never picked by ``backend="auto"`` (it can still be forced)
GATED = frozenset({("cpu", "bf16"), ("cpu", "int8")})


@dataclass(frozen=True)
class Tolerance:
    """Bounds a backend must meet at one precision (None: reported, not bounded)."""

    class_logits: float  # on max|delta| / max(1, max|reference logit|)
    p_hgg: float
    mask_dice: float
    class_flips: float  # share of slices whose predicted class differs


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(class_logits=1e-3, p_hgg=1e-3, mask_dice=0.999, class_flips=0.0),
    "fp16": Tolerance(class_logits=5e-2, p_hgg=2e-2, mask_dice=0.99, class_flips=0.02),
    # The CPU reduced-precision gates (issue 14), meant for trained bundles: what a user
    # sees is P(HGG), the mask and the class; logits are bounded only against blow-ups.
    # A case-level gate comes on top (``case_parity``): no case changes status or class.
    "bf16": Tolerance(class_logits=0.5, p_hgg=0.03, mask_dice=0.98, class_flips=0.01),
    "int8": Tolerance(class_logits=0.5, p_hgg=0.03, mask_dice=0.98, class_flips=0.01),
}


@dataclass(frozen=True)
class ParityResult:
    """One backend's agreement with eager PyTorch fp32 over ``slices`` slices."""

    backend: str
    device: str
    precision: str
    artifact: str
    sha256: str
    slices: int
    max_abs_class_logits: float
    max_rel_class_logits: float
    max_abs_p_hgg: float
    max_abs_mask_logits: float
    mask_dice: float
    class_flip_share: float
    tolerance: Tolerance
    passed: bool
    failures: tuple[str, ...] = ()
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return parity_key(self.backend, self.device, self.precision, self.artifact)

    def to_json(self) -> dict[str, Any]:
        entry = asdict(self)
        entry["failures"] = list(self.failures)
        return entry


def measure(reference: Outputs, got: Outputs) -> dict[str, float]:
    """The parity figures of ``got`` against ``reference`` (class logits, mask logits)."""
    ref_cls, ref_mask = (np.asarray(r, np.float64) for r in reference)
    cls, mask = (np.asarray(g, np.float64) for g in got)
    if cls.shape != ref_cls.shape or mask.shape != ref_mask.shape:
        raise ValueError(f"output shapes {cls.shape}, {mask.shape} differ from the "
                         f"reference {ref_cls.shape}, {ref_mask.shape}")
    abs_cls = float(np.abs(cls - ref_cls).max())
    return {
        "max_abs_class_logits": abs_cls,
        "max_rel_class_logits": abs_cls / max(1.0, float(np.abs(ref_cls).max())),
        "max_abs_p_hgg": float(np.abs(p_hgg_of(cls) - p_hgg_of(ref_cls)).max()),
        "max_abs_mask_logits": float(np.abs(mask - ref_mask).max()),
        "mask_dice": dice(mask > 0, ref_mask > 0),
        "class_flip_share": float((cls.argmax(1) != ref_cls.argmax(1)).mean()),
    }


def _failures(figures: dict[str, float], tol: Tolerance) -> tuple[str, ...]:
    checks = [
        (figures["max_rel_class_logits"] <= tol.class_logits,
         f"class logits off by {figures['max_rel_class_logits']:.3g} > {tol.class_logits:g}"),
        (figures["max_abs_p_hgg"] <= tol.p_hgg,
         f"P(HGG) off by {figures['max_abs_p_hgg']:.3g} > {tol.p_hgg:g}"),
        (figures["mask_dice"] >= tol.mask_dice,
         f"mask Dice {figures['mask_dice']:.4f} < {tol.mask_dice:g}"),
        (figures["class_flip_share"] <= tol.class_flips,
         f"{figures['class_flip_share']:.1%} of slices change class > {tol.class_flips:.0%}"),
    ]
    return tuple(message for ok, message in checks if not ok)


def gate_margin(figures: dict[str, float], tol: Tolerance) -> float:
    """How far inside its gates a result is (figures from ``measure``): 1 when it equals the
    reference, 0 at the nearest tolerance, negative past it; the smallest of the four
    figures' margins, each relative to its tolerance."""
    flips = figures["class_flip_share"]
    return min(1 - figures["max_rel_class_logits"] / tol.class_logits,
               1 - figures["max_abs_p_hgg"] / tol.p_hgg,
               1 - (1 - figures["mask_dice"]) / (1 - tol.mask_dice),
               1 - flips / tol.class_flips if tol.class_flips else 1.0 - 2 * (flips > 0))


def margin_at(precision: str) -> Callable[[Outputs, Outputs], float]:
    """``gate_margin`` of ``got`` against ``reference`` under ``precision``'s tolerances:
    what the choice of INT8 layer groups (``ubc.export.int8_openvino``) keeps above
    its ``MIN_MARGIN``."""
    tol = TOLERANCES[precision]
    return lambda reference, got: gate_margin(measure(reference, got), tol)


def reference_outputs(bundle: Bundle, slices: np.ndarray, *, batch: int = 16
                      ) -> Outputs:
    """Eager PyTorch fp32 on the CPU: the reference every backend is compared with."""
    from ubc.engine.torch_backend import TorchEngine

    with TorchEngine(bundle, device="cpu", artifact="eager", max_batch=batch) as engine:
        return engine.infer(_checked_slices(bundle, slices, minimum=1))


def _checked_slices(bundle: Bundle, slices: np.ndarray, *, minimum: int) -> np.ndarray:
    expected = (1, *bundle.preprocessing.size)
    if not isinstance(slices, np.ndarray) or slices.ndim != 4 or slices.shape[1:] != expected:
        raise ValueError(f"slices must be float32 [N, {', '.join(map(str, expected))}] for "
                         f"{bundle.path}, got {getattr(slices, 'shape', type(slices))}")
    if len(slices) < minimum:
        raise ValueError(f"parity needs at least {minimum} slices, got {len(slices)}; make "
                         "them with ubc.check_data.phantom_slices or volume_slices")
    return np.ascontiguousarray(slices, dtype=np.float32)


def compare(bundle: Bundle | str | os.PathLike[str], backend: str, slices: np.ndarray, *,
            device: str = "cpu", precision: str = "fp32",
            reference: Outputs | None = None, record: bool = False,
            min_slices: int = MIN_SLICES, source: str = "", **options: Any) -> ParityResult:
    """Run ``backend`` (see ``ubc.engine.BACKENDS``) on ``slices`` (float32 [N, 1, H, W],
    preprocessed, N >= ``min_slices``) and compare with eager PyTorch fp32 (``reference``,
    computed when not given); ``options`` go to the engine. Measures only: ``record=True``
    (or ``record_parity``) writes the result into meta.json, so a read-only deployed bundle
    can be measured."""
    from ubc.engine import load

    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {', '.join(TOLERANCES)}, got {precision!r}")
    slices = _checked_slices(bundle, slices, minimum=min_slices)
    if reference is None:
        reference = reference_outputs(bundle, slices)
    with load(bundle, backend=backend, device=device, precision=precision,
              **options) as engine:
        got = engine.infer(slices)
        artifact = engine.artifact
    figures: dict[str, Any] = measure(reference, got)
    tol = TOLERANCES[precision]
    failures = _failures(figures, tol)
    result = ParityResult(backend=backend, device=device, precision=precision,
                          artifact=artifact, sha256=bundle.meta["files"].get(artifact, ""),
                          slices=len(slices), tolerance=tol, passed=not failures,
                          failures=failures, source=source, **figures)
    if record:
        record_parity(bundle, [result])
    return result


def record_parity(bundle: Bundle, results: Sequence[ParityResult | Skipped]) -> None:
    """Write ``results`` into meta.json under ``parity[<backend>:<device>:<precision>:
    <artifact>]`` (where ``ubc.engine.load`` reads them); skipped ones are not recorded."""
    entries = dict(bundle.meta.get("parity", {}))
    entries.update({r.key: r.to_json() for r in results if isinstance(r, ParityResult)})
    bundle.update_meta(parity=entries)


@dataclass(frozen=True)
class Skipped:
    """A backend ``check_bundle`` could not run here, and why."""

    backend: str
    device: str
    precision: str
    reason: str


def check_bundle(bundle: Bundle, slices: np.ndarray, *, device: str = "cpu",
                 source: str = "", held_out: HeldOut = (), record: bool = False
                 ) -> list[ParityResult | Skipped]:
    """``compare`` every variant and precision ``ubc.engine.registry.parity_candidates``
    lists for ``device`` against one eager reference; those that cannot run here are
    returned as ``Skipped``. ``held_out``: (name, [(case id, image file)]) sets whose cases
    must keep their status and class in each (``case_parity``). ``record`` writes the
    results into meta.json."""
    from ubc.engine.registry import parity_candidates

    reference = reference_outputs(bundle, slices)
    expected = _reference_verdicts(bundle, held_out)
    results: list[ParityResult | Skipped] = []
    for variant, precision in parity_candidates(bundle, device):
        reason = variant.engine_class.unavailable(bundle, device, precision, **variant.options)
        if reason is not None:
            results.append(Skipped(variant.backend, device, precision, reason))
            continue
        result = compare(bundle, variant.backend, slices, device=device, precision=precision,
                         reference=reference, source=source, **variant.options)
        if held_out:
            result = with_case_parity(result, _case_gates(bundle, result, variant.options,
                                                          expected, held_out))
        results.append(result)
    if record:
        record_parity(bundle, results)
    return results


def _verdict(result: ParityResult) -> str:
    if result.passed:
        return "pass"
    gated = (result.device.partition(":")[0], result.precision) in GATED
    return ("below gate (auto never picks it): " if gated else "FAIL: ") + \
        "; ".join(result.failures)


def format_table(results: Sequence[ParityResult | Skipped]) -> str:
    """A plain-text table of parity results (skipped backends listed below it)."""
    header = ("backend", "device", "prec", "artifact", "n", "|dlogit|", "rel", "|dP(HGG)|",
              "Dice", "flips", "result")
    rows = [header]
    for r in results:
        if isinstance(r, ParityResult):
            rows.append((r.backend, r.device, r.precision, r.artifact, str(r.slices),
                         f"{r.max_abs_class_logits:.2e}", f"{r.max_rel_class_logits:.2e}",
                         f"{r.max_abs_p_hgg:.2e}", f"{r.mask_dice:.5f}",
                         f"{r.class_flip_share:.1%}",
                         _verdict(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True))
             + "  " + row[-1] for row in rows]
    lines += [f"skipped {s.backend} ({s.device}, {s.precision}): {s.reason}"
              for s in results if isinstance(s, Skipped)]
    return "\n".join(lines)


@dataclass(frozen=True)
class CaseParity:
    """Case-level agreement on one set of volumes: each case's status (ok, no_lesion) and
    predicted class from an engine against eager PyTorch fp32, through the scoring path
    (``ubc.scoring.Predictor``: preprocessing, top-k slices, P(HGG), no-lesion rule)."""

    source: str
    cases: int
    changed: tuple[str, ...]  # "case: ok/HGG -> ok/LGG", one per case that changed
    max_abs_p_hgg: float

    @property
    def passed(self) -> bool:
        return not self.changed


#: (status, predicted class, P(HGG)) of each case, by case id
Verdicts = dict[str, tuple[str, str | None, float | None]]
#: named sets of (case id, image file) whose cases must not change status or class
HeldOut = Sequence[tuple[str, Sequence[tuple[str, Path]]]]


def case_volumes(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[str, Path]]:
    """(case id, image file) of an archive folder (``ubc.scoring.discover`` layouts) or of
    NIfTI files (named by their file name)."""
    files = [Path(p) for p in paths]
    if len(files) == 1 and files[0].is_dir():
        from ubc.scoring.discover import discover_cases

        return [(case.case_id, case.image) for case in discover_cases(files[0])]
    return [(f.name.split(".nii")[0], f) for f in files]


def case_verdicts(bundle: Bundle, engine: Any, volumes: Sequence[tuple[str, Path]]
                  ) -> Verdicts:
    """Score ``volumes`` with ``engine`` (the caller closes it) as ``ubc-infer`` would."""
    from ubc.scoring.predictor import Predictor

    out: Verdicts = {}
    with Predictor(bundle, engine=engine) as predictor:
        for case_id, path in volumes:
            row = predictor.predict(path, case_id=case_id, mask=False).result
            out[case_id] = (row.status, row.predicted_class, row.p_hgg)
    return out


def case_parity(reference: Verdicts, got: Verdicts, source: str) -> CaseParity:
    """Which cases changed status or predicted class between ``reference`` and ``got``."""
    changed, worst = [], 0.0
    for case_id, (status, grade, p) in reference.items():
        status2, grade2, p2 = got[case_id]
        if (status, grade) != (status2, grade2):
            changed.append(f"{case_id}: {status}/{grade} -> {status2}/{grade2}")
        if p is not None and p2 is not None:
            worst = max(worst, abs(p - p2))
    return CaseParity(source=source, cases=len(reference), changed=tuple(changed),
                      max_abs_p_hgg=worst)


def with_case_parity(result: ParityResult, cases: Sequence[CaseParity]) -> ParityResult:
    """``result`` with the case-level gates added: it fails when any case changed."""
    from dataclasses import replace

    failures = [*result.failures, *(f"{c.source}: {len(c.changed)} of {c.cases} cases "
                                    f"changed ({'; '.join(c.changed[:3])})"
                                    for c in cases if not c.passed)]
    extra = {**result.extra, "cases": [{**asdict(c), "changed": list(c.changed),
                                        "passed": c.passed} for c in cases]}
    return replace(result, passed=not failures, failures=tuple(failures), extra=extra)


def _reference_verdicts(bundle: Bundle, held_out: HeldOut) -> dict[str, Verdicts]:
    """Eager PyTorch fp32's verdicts on each held-out set, by set name."""
    if not held_out:
        return {}
    from ubc.engine.torch_backend import TorchEngine

    with TorchEngine(bundle, device="cpu", artifact="eager") as reference:
        return {name: case_verdicts(bundle, reference, volumes) for name, volumes in held_out}


def _case_gates(bundle: Bundle, result: ParityResult, options: Mapping[str, Any],
                expected: dict[str, Verdicts], held_out: HeldOut) -> list[CaseParity]:
    """The case parity of each held-out set for the engine ``result`` measured."""
    from ubc.engine import load

    with load(bundle, backend=result.backend, device=result.device,
              precision=result.precision, **options) as engine:
        return [case_parity(expected[name], case_verdicts(bundle, engine, volumes), name)
                for name, volumes in held_out]


def fatal_failures(results: Sequence[ParityResult | Skipped]) -> list[ParityResult]:
    """The failed results that mean a broken export (fp32 anywhere, GPU reduced
    precisions), not a reduced CPU precision that its gate keeps out of ``auto``."""
    return [r for r in results if isinstance(r, ParityResult) and not r.passed
            and (r.device.partition(":")[0], r.precision) not in GATED]
