"""What ``ubc-bench`` measures, as frozen dataclasses, and their JSON form (schema
``ubc-bench/1``, checked by ``validate``). The renderers (``ubc.benchmark.report``) read the
JSON form, so a saved file renders exactly like a live run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ubc.benchmark.timing import Stats

SCHEMA = "ubc-bench/1"


@dataclass(frozen=True)
class Parity:
    """Agreement with eager PyTorch fp32 on the CPU (``ubc.parity``) over ``slices`` slices.
    ``reference``: this row *is* that reference (its deltas are zero by definition)."""

    slices: int
    max_abs_class_logits: float
    max_rel_class_logits: float
    max_abs_p_hgg: float
    max_abs_mask_logits: float
    mask_dice: float
    class_flip_share: float
    passed: bool
    failures: tuple[str, ...] = ()
    tolerance: dict[str, float] = field(default_factory=dict)
    reference: bool = False

    @classmethod
    def of(cls, result: Any) -> Parity:
        """From a ``ubc.parity.ParityResult``."""
        return cls(slices=result.slices, max_abs_class_logits=result.max_abs_class_logits,
                   max_rel_class_logits=result.max_rel_class_logits,
                   max_abs_p_hgg=result.max_abs_p_hgg,
                   max_abs_mask_logits=result.max_abs_mask_logits, mask_dice=result.mask_dice,
                   class_flip_share=result.class_flip_share, passed=result.passed,
                   failures=tuple(result.failures), tolerance=asdict(result.tolerance))

    @classmethod
    def of_reference(cls, slices: int) -> Parity:
        return cls(slices=slices, max_abs_class_logits=0.0, max_rel_class_logits=0.0,
                   max_abs_p_hgg=0.0, max_abs_mask_logits=0.0, mask_dice=1.0,
                   class_flip_share=0.0, passed=True, reference=True)


@dataclass(frozen=True)
class EngineRow:
    """One backend x precision x batch size. ``throughput``: slices/s at the median
    latency; ``speedup``: throughput over the baseline's (eager PyTorch fp32, same device,
    same batch); ``host_peak_mib``: the process's peak resident set while this batch size
    ran (``host_base_mib``: before the engine was loaded); ``load_average``: the machine's
    1/5/15-minute load when this batch size started; ``cores_used`` and
    ``preemptions_per_call`` say how much CPU the process actually got (see
    ``ubc.benchmark.timing.Measurement``): on a shared machine, read them before the speed."""

    variant: str
    backend: str
    artifact: str
    device: str
    precision: str
    batch: int
    latency: Stats
    throughput: float
    host_peak_mib: float
    host_base_mib: float
    load_seconds: float
    warmup: int
    buffers: int
    threads: int | None = None
    device_latency: Stats | None = None
    device_peak_mib: float | None = None
    parity: Parity | None = None
    speedup: float | None = None
    baseline: bool = False
    isolated: bool = False
    load_average: tuple[float, ...] = ()
    calls_per_batch: int = 1  # > 1: the engine's max_batch split the batch
    cores_used: float | None = None  # process CPU time / wall time while timed
    preemptions_per_call: float | None = None  # involuntary context switches per call
    samples_ms: tuple[float, ...] = ()  # every timed call, in order (wall clock)
    device_samples_ms: tuple[float, ...] = ()  # the same calls seen by CUDA events
    rounds: int = 1  # > 1: the samples of that many interleaved rounds (``merged``)

    @property
    def label(self) -> str:
        return f"{self.variant} {self.precision}"

    @classmethod
    def merged(cls, rounds: list[EngineRow]) -> EngineRow:
        """One row from the same cell and batch timed in several rounds: statistics over
        all samples, the peak memory of the worst round, the CPU share averaged over the
        calls, the parity of the round that checked it."""
        first = rounds[0]
        samples = tuple(x for r in rounds for x in r.samples_ms)
        device = tuple(x for r in rounds for x in r.device_samples_ms)
        latency = Stats.of(samples)
        calls = [r.latency.n for r in rounds]

        def mean(values: list[float | None]) -> float | None:
            if any(v is None for v in values):
                return None
            return round(sum(v * n for v, n in zip(values, calls, strict=True))  # type: ignore
                         / sum(calls), 2)

        peaks = [r.device_peak_mib for r in rounds if r.device_peak_mib is not None]
        return replace(
            first, latency=latency, throughput=first.batch * 1e3 / latency.p50,
            samples_ms=samples, device_samples_ms=device,
            device_latency=Stats.of(device) if device else None,
            host_peak_mib=max(r.host_peak_mib for r in rounds),
            device_peak_mib=max(peaks) if peaks else None,
            load_seconds=round(sum(r.load_seconds for r in rounds) / len(rounds), 3),
            parity=next((r.parity for r in rounds if r.parity is not None), None),
            cores_used=mean([r.cores_used for r in rounds]),
            preemptions_per_call=mean([r.preemptions_per_call for r in rounds]),
            rounds=len(rounds))


@dataclass(frozen=True)
class Unavailable:
    """Something that was not measured, and why. ``failed``: it should have run here but
    raised or crashed (the reason holds the error); otherwise the machine, the installed
    packages or the bundle cannot run it (the reason says what to install or export)."""

    stage: str  # "engine" | "preprocessing" | "pipeline"
    name: str
    reason: str
    device: str = ""
    precision: str = ""
    failed: bool = False


@dataclass(frozen=True)
class PrepRow:
    """Preparing one volume. ``group``: "preprocess" (in memory -> [S, 1, H, W]) or "load +
    preprocess" (from the .nii.gz file). ``ratio``: this time / ours in the same group
    (> 1: slower than ours). ``max_abs_diff``: against the NumPy reference's output."""

    group: str
    name: str
    latency: Stats
    slices: int
    ratio: float
    ours: bool
    threads: int | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None


@dataclass(frozen=True)
class PipelineRow:
    """``ubc-infer``'s pipeline (``ubc.scoring.score_archive``) over a generated archive."""

    cases: int
    failed: int
    slices: int
    wall_seconds: float
    volumes_per_second: float
    slices_per_second: float
    backend: str
    precision: str
    batch_size: int
    volume_shape: tuple[int, int, int]
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchReport:
    """A whole ``ubc-bench`` run."""

    created: str
    command: str
    bundle: dict[str, Any]
    options: dict[str, Any]
    machine: dict[str, Any]
    rows: tuple[EngineRow, ...]
    unavailable: tuple[Unavailable, ...] = ()
    preprocessing: tuple[PrepRow, ...] = ()
    pipeline: PipelineRow | None = None
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    load_average_end: tuple[float, ...] = ()
    auto_choice: str | None = None  # the variant ubc.engine.load(backend="auto") picks

    def to_json(self) -> dict[str, Any]:
        """The JSON document (schema ``SCHEMA``)."""
        doc = asdict(self)
        doc["schema"] = SCHEMA
        return _plain(doc)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (``asdict`` keeps tuples; JSON has lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_TOP = {"schema": str, "created": str, "command": str, "bundle": dict, "options": dict,
        "machine": dict, "rows": list, "unavailable": list, "preprocessing": list,
        "notes": list, "seconds": (int, float)}
_STATS = {"n": int, "p50": (int, float), "p95": (int, float), "p99": (int, float),
          "mean": (int, float), "iqr": (int, float), "min": (int, float), "max": (int, float)}
_ROW = {"variant": str, "backend": str, "artifact": str, "device": str, "precision": str,
        "batch": int, "latency": dict, "throughput": (int, float),
        "host_peak_mib": (int, float), "baseline": bool}
_PARITY = {"slices": int, "max_abs_p_hgg": (int, float), "mask_dice": (int, float),
           "max_rel_class_logits": (int, float), "passed": bool, "reference": bool}
_UNAVAILABLE = {"stage": str, "name": str, "reason": str, "failed": bool}
_PREP = {"group": str, "name": str, "latency": dict, "slices": int, "ratio": (int, float),
         "ours": bool}
_MACHINE = {"cpu": dict, "gpus": list, "libraries": dict, "load_average": list}


def _check(obj: Any, spec: dict[str, Any], where: str, problems: list[str]) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return
    for key, kind in spec.items():
        if key not in obj:
            problems.append(f"{where}: missing {key!r}")
        elif isinstance(obj[key], bool) and kind in ((int, float), int):
            problems.append(f"{where}.{key}: expected a number, got a boolean")
        elif not isinstance(obj[key], kind):
            problems.append(f"{where}.{key}: expected {kind}, got {type(obj[key]).__name__}")


def validate(doc: Any) -> list[str]:
    """Problems with a ``ubc-bench`` JSON document (empty: it follows ``SCHEMA``)."""
    problems: list[str] = []
    _check(doc, _TOP, "report", problems)
    if problems:
        return problems
    if doc["schema"] != SCHEMA:
        problems.append(f"report.schema: expected {SCHEMA!r}, got {doc['schema']!r}")
    _check(doc["machine"], _MACHINE, "machine", problems)
    for i, row in enumerate(doc["rows"]):
        _check(row, _ROW, f"rows[{i}]", problems)
        if isinstance(row, dict) and isinstance(row.get("latency"), dict):
            _check(row["latency"], _STATS, f"rows[{i}].latency", problems)
        if isinstance(row, dict) and row.get("parity") is not None:
            _check(row["parity"], _PARITY, f"rows[{i}].parity", problems)
    for i, item in enumerate(doc["unavailable"]):
        _check(item, _UNAVAILABLE, f"unavailable[{i}]", problems)
    for i, prep in enumerate(doc["preprocessing"]):
        _check(prep, _PREP, f"preprocessing[{i}]", problems)
    return problems
